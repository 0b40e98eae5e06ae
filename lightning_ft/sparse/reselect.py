"""Dynamic re-selection of sparse masks, SpIEL-style (Ansell et al., 2024): drop small deltas, grow by gradient.

Every ``every`` optimizer steps, each layer drops the ``fraction`` of its entries with the smallest ``|delta|`` and
grows as many new ones where the gradient accumulated over the last ``window`` steps is largest (among entries not
kept), so each layer keeps exactly its budget. The fraction anneals to zero over training (cosine or linear). Dropped
deltas go back to zero (delta mode: the value is discarded; mask mode: the weight returns to its pretrained value);
grown entries start at zero delta with zero optimizer state. Optimizer state tensors are edited in place, so the
optimizer keeps working with the same parameter objects.

Memory: during the ``window`` steps before a re-selection, a dense float32 gradient accumulator per targeted weight
exists (delta mode fills it from each layer's backward pass; mask mode from the dense gradients). Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_ft.sparse.calibration import all_reduce_sum_
from lightning_ft.sparse.layer import SparseLinear

Schedule = Literal["cosine", "linear"]
SCHEDULES = ("cosine", "linear")


def drop_fraction(step: int, total_steps: int, initial: float, schedule: Schedule = "cosine") -> float:
    """The share of each layer's entries to replace at ``step``: ``initial`` annealed to 0 at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown drop schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    t = min(1.0, max(0.0, step / max(1, total_steps)))
    return initial * (0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1 - t)


@dataclass
class ReselectStats:
    """What one re-selection did, summed over layers (``+`` adds two)."""

    nnz: int = 0
    numel: int = 0
    replaced: int = 0
    common: int = 0  # entries in both the old and the new mask
    grad_sq_in_mask: float = 0.0  # squared accumulated gradient on the old mask
    grad_sq_total: float = 0.0

    def __add__(self, other: ReselectStats) -> ReselectStats:
        return ReselectStats(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))

    def as_dict(self) -> dict[str, float]:
        return {
            "density": self.nnz / max(self.numel, 1),
            "mask_overlap": self.common / max(self.nnz, 1),
            "grad_norm_share": math.sqrt(self.grad_sq_in_mask / self.grad_sq_total) if self.grad_sq_total else 0.0,
            "replaced": float(self.replaced),
        }


def _param_states(param: Tensor, optimizers: Iterable[torch.optim.Optimizer]) -> list[Tensor]:
    """The optimizer state tensors of ``param`` shaped like it (Adam's moments, SGD's momentum, ...)."""
    return [
        t
        for opt in optimizers
        for t in opt.state.get(param, {}).values()
        if isinstance(t, Tensor) and t.shape == param.shape
    ]


@torch.no_grad()
def reselect_layer(
    layer: SparseLinear, grad: Tensor, fraction: float, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> ReselectStats:
    """Replace ``round(fraction * nnz)`` entries of ``layer`` in place; ``grad`` is the accumulated dense gradient,
    shaped like the stored weight. Optimizer state follows its entries; new and dropped entries get zero state."""
    optimizers = list(optimizers)
    old = layer.indices.clone()
    k, g = old.numel(), grad.reshape(-1).float()
    stats = ReselectStats(nnz=k, numel=layer.numel, common=k)
    stats.grad_sq_in_mask, stats.grad_sq_total = float(g[old].square().sum()), float(g.square().sum())
    n = min(round(fraction * k), k)
    if n == 0:
        return stats
    drop_pos = torch.topk(layer.delta_values().abs(), n, largest=False).indices
    keep = torch.ones(k, dtype=torch.bool, device=old.device)
    keep[drop_pos] = False
    keep_pos = keep.nonzero().squeeze(1)
    kept = old[keep_pos]
    score = g.abs()
    score[kept] = -math.inf
    grown = torch.topk(score, n).indices
    new, order = torch.sort(torch.cat([kept, grown]))
    # old position of each new entry's value and state; -1 for grown entries
    source = torch.where(order < kept.numel(), keep_pos[order.clamp(max=max(kept.numel() - 1, 0))], -1)
    stats.replaced, stats.common = n, int(torch.isin(new, old).sum())
    if layer.values is not None:
        for t in [layer.values.data, *_param_states(layer.values, optimizers)]:
            t.copy_(torch.where(source >= 0, t[source.clamp(min=0)], torch.zeros((), dtype=t.dtype, device=t.device)))
        layer.indices.copy_(new)
        return stats
    weight = layer.base_layer.weight
    flat = weight.view(-1)
    flat[old[drop_pos]] = layer.base_values[drop_pos].to(weight.dtype)  # dropped entries: back to pretrained
    changed = torch.cat([old[drop_pos], grown])
    for t in _param_states(weight, optimizers):
        t.view(-1)[changed] = 0
    layer.base_values = torch.where(source >= 0, layer.base_values[source.clamp(min=0)], flat[new])
    layer.indices.copy_(new)
    return stats


class DynamicReselection:
    """Schedules SpIEL-style re-selection over training and keeps the gradient accumulators it needs.

    Steps are counted from 1 (the step in progress is ``global_step + 1``). Re-selection happens after steps
    ``every, 2 * every, ...`` before ``total_steps``, from the gradients of the ``window`` steps before it.
    ``every``, ``fraction``, ``schedule`` and ``window`` are ``SparseConfig``'s ``reselect_every``, ``drop_fraction``,
    ``drop_schedule`` and ``grow_window`` (validated there).
    """

    def __init__(
        self,
        layers: Mapping[str, SparseLinear],
        every: int,
        total_steps: int,
        fraction: float,
        schedule: Schedule,
        window: int,
    ) -> None:
        self.layers, self.every, self.total_steps = dict(layers), every, total_steps
        self.fraction, self.schedule, self.window = fraction, schedule, min(window, every)
        self.accumulators: dict[str, Tensor] = {}  # mask mode: summed dense gradients; delta mode: the layers hold them

    def in_window(self, step: int) -> bool:
        return (step - 1) % self.every >= self.every - self.window and self.due(step + (-step) % self.every)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0 and step < self.total_steps

    def start(self) -> None:
        """Begin accumulating gradients (idempotent)."""
        for name, layer in self.layers.items():
            acc = self.accumulators.get(name)
            if acc is None:
                w = layer.base_layer.weight
                acc = self.accumulators[name] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            if layer.values is not None:
                layer.grad_accumulator = acc

    def add_dense_gradients(self) -> None:
        """Mask mode: add the dense weight gradients (before masking) to the accumulators."""
        for name, acc in self.accumulators.items():
            layer = self.layers[name]
            if layer.values is None and layer.base_layer.weight.grad is not None:
                acc.add_(layer.base_layer.weight.grad)

    def stop(self) -> None:
        for layer in self.layers.values():
            layer.grad_accumulator = None
        self.accumulators = {}

    def reselect(self, step: int, optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, float]:
        """Re-select every layer from the accumulated gradients; returns density, mask overlap, gradient-norm share
        (of the old mask) and the drop fraction used. Frees the accumulators."""
        optimizers = list(optimizers)
        fraction = drop_fraction(step, self.total_steps, self.fraction, self.schedule)
        if any(layer.values is not None for layer in self.layers.values()):
            all_reduce_sum_(self.accumulators.values())  # delta mode captured this rank's gradients only
        total = ReselectStats()
        for name, layer in self.layers.items():
            grad = self.accumulators.get(name)
            if grad is None:
                grad = torch.zeros_like(layer.base_layer.weight, dtype=torch.float32)
            total = total + reselect_layer(layer, grad, fraction, optimizers)
        self.stop()
        return {**total.as_dict(), "drop_fraction": fraction}

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.clone() for n, t in self.accumulators.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.stop()
        if state:
            self.start()
            for name, t in state.items():
                self.accumulators[name].copy_(t)
