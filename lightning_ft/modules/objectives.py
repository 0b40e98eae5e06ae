"""Pure-torch losses shared by the modules: next-token sums at the target positions.

Causal-LM losses work on the *target positions* only: the positions t whose next token t + 1 has a label. With prompt
masking that is a small share of all positions, so the model is asked for logits there alone (transformers'
``logits_to_keep``), which skips most of the vocabulary projection and its backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def target_mask(labels: Tensor) -> Tensor:
    """(B, T) bool: True at position t when ``labels[:, t + 1]`` is a target (position t predicts it)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def next_token_targets(labels: Tensor) -> Tensor:
    """(N,) the target token ids, in the row-major order of ``target_mask(labels)``'s True positions."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def token_sums(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(nll_sum, num_tokens, num_correct)`` of (N, V) logits against (N,) targets; NLL in float32."""
    logits = logits.float()
    nll_sum = F.cross_entropy(logits, targets, reduction="sum")
    num_correct = (logits.argmax(-1) == targets).sum()
    return nll_sum, torch.tensor(targets.numel(), device=targets.device), num_correct


def causal_lm_sums(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``token_sums`` from full (B, T, V) logits and (B, T) labels (-100 where no loss is taken)."""
    return token_sums(logits[target_mask(labels)], next_token_targets(labels))


def count_targets(labels: Tensor) -> Tensor:
    """The number of loss terms of a batch, as a 0-dim long tensor on ``labels``' device.

    (B, T) causal-LM labels: the next-token targets (``labels[:, 1:] != -100``), exactly the terms ``token_sums``
    adds up; (B,) class labels: the rows whose label is not -100.
    """
    if labels.ndim == 1:
        return (labels != IGNORE_INDEX).sum()
    return (labels[:, 1:] != IGNORE_INDEX).sum()


@torch.no_grad()
def scale_gradients(params, factor: float | Tensor) -> None:
    """Multiply every existing ``.grad`` of ``params`` by ``factor`` in place: a number, or a 0-dim tensor on the
    gradients' device (no host sync). DTensor gradients (FSDP2) take the tensor as replicated on every rank."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication

    for p in params:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor) and isinstance(factor, Tensor):
            with implicit_replication():
                p.grad.mul_(factor.to(p.grad.dtype))
        else:
            p.grad.mul_(factor.to(p.grad.dtype) if isinstance(factor, Tensor) else factor)
