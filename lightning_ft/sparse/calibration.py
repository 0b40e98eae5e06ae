"""Gradient statistics of calibration batches, and making them (and masks) identical on every rank (pure torch).

The statistics are summed while the backward pass runs (a post-accumulate-grad hook per weight adds the fresh
gradient to the statistic and frees it), so calibration holds one float32 statistic per targeted weight plus one
layer's gradient at a time, not a full set of gradients besides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def gradient_statistics(
    model: nn.Module,
    names: Iterable[str],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], Tensor],
    squared: bool = False,
) -> tuple[dict[str, Tensor], int]:
    """``({module name: sum over batches of its weight gradient (or of its square)}, batches seen)``.

    Only the named modules' weights get gradients during calibration; every ``requires_grad`` flag and ``.grad`` of
    ``model`` is restored afterwards. Statistics are float32, shaped like the weights (the stored layout).
    """
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    stats = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}

    def hook(name: str):
        def add(p: Tensor) -> None:
            g = p.grad.float()
            stats[name].add_(g * g if squared else g)
            p.grad = None

        return add

    handles = []
    seen = 0
    try:
        model.requires_grad_(False)
        for n, w in weights.items():
            w.requires_grad_(True)
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(hook(n)))
        for batch in batches:
            loss_fn(batch).backward()
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = grads[p]
    return stats, seen


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Sum each tensor over all ranks, in place (a no-op without an initialised process group)."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_indices(indices: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rank 0's indices on every rank (the same names on every rank; sizes may differ before the broadcast).

    All-reduced statistics are already equal everywhere; broadcasting the (small) result as well makes the masks
    identical even where a reduction or a top-k could round differently on different ranks.
    """
    if not is_distributed() or not indices:
        return dict(indices)
    names = list(indices)
    device = indices[names[0]].device
    sizes = torch.tensor([indices[n].numel() for n in names], dtype=torch.int64, device=device)
    dist.broadcast(sizes, src=0)
    flat = torch.cat([indices[n].reshape(-1).to(device) for n in names])
    if dist.get_rank() != 0:
        flat = flat.new_empty(int(sizes.sum()))
    dist.broadcast(flat, src=0)
    return dict(zip(names, torch.split(flat, sizes.tolist())))
