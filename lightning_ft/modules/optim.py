"""AdamW parameter groups and warm-up + decay learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from torch import nn

SCHEDULES = ("linear", "cosine", "constant")


def decay_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (matrices) and an undecayed one (biases, norm weights).

    Every parameter with fewer than 2 dimensions (biases, LayerNorm / RMSNorm weights) gets no weight decay.
    """
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def loraplus_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr: float, ratio: float
) -> list[dict]:
    """LoRA+ (Hayou et al., 2024): the ``lora_B`` matrices learn ``ratio`` times faster than everything else.

    Groups: matrices at ``lr`` with weight decay, ``lora_B`` at ``lr * ratio`` with weight decay, and parameters
    with fewer than 2 dimensions (biases, norms, DoRA magnitudes) at ``lr`` without weight decay. Each group has a
    ``name`` (``LearningRateMonitor`` shows it).
    """
    if ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be positive, got {ratio}")
    decay, lora_b, no_decay = [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] == "lora_B":
            lora_b.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr": lr},
        {"name": "lora_B", "params": lora_b, "weight_decay": weight_decay, "lr": lr * ratio},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


def warmup_decay(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then linear / cosine decay to ``min_ratio``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown scheduler {schedule!r}; choose one of {list(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * shape

    return factor
