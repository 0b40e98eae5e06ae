"""Counting what DDP all-reduces (pure torch): a communication hook that measures bytes per step.

DDP builds its gradient buckets from the parameters that require grad, so with a frozen base only the adapters
travel. ``AllReduceCounter`` checks that: register it as the DDP communication hook (``AdapterDDPStrategy(
measure_communication=True)`` does), run some steps, then compare ``bytes / steps`` with ``trainable_bytes(model)``.
"""

# no ``from __future__ import annotations``: DDP checks the hook's annotations against the real types

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def trainable_bytes(module: nn.Module) -> int:
    """Bytes of the parameters that require grad: what DDP all-reduces each step."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


@dataclass
class AllReduceCounter:
    """State of ``count_allreduce_hook``: bytes and buckets all-reduced since the last ``reset``."""

    process_group: Any = None
    bytes: int = 0
    buckets: int = 0

    def reset(self) -> None:
        self.bytes = self.buckets = 0


def count_allreduce_hook(state: AllReduceCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (mean over ranks), counting the bucket's bytes first.

    ``ddp_model.register_comm_hook(AllReduceCounter(), count_allreduce_hook)``.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    state.bytes += buffer.numel() * buffer.element_size()
    state.buckets += 1
    return allreduce_hook(state.process_group, bucket)
