"""Which weight entries to train: criteria (scores), budgets (how many per matrix) and allocation (pure torch).

Criteria score every entry of a targeted weight; the highest scores are selected:

- ``random``: uniform random scores from a seeded generator (identical on every rank);
- ``magnitude``: ``|W|``;
- ``gradient``: ``|sum_b g_b|`` over calibration batches ``b``;
- ``fisher``: ``sum_b g_b**2``, the empirical Fisher information of each entry (FISH mask);
- ``movement``: ``-W * sum_b g_b``, the first-order movement score (Sanh et al., 2020): high where a gradient step
  moves the weight away from zero;
- ``bitfit``: no weight entries at all; the biases of the targeted layers train (Ben Zaken et al., 2022).

Budgets: ``density`` (a share of each targeted matrix, at least one entry) or ``lora_equivalent_rank=r``
(``r * (m + n)`` entries of an m x n matrix, the parameter count of a rank-r LoRA adapter). Allocation:
``per_matrix`` (each matrix gets its own budget) or ``global`` (the summed budget goes to the highest scores of all
matrices together, so matrices may get more or fewer than their share, or none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ft.method_config import config_from_kwargs, takes_config
from lightning_ft.sparse.calibration import all_reduce_sum_, broadcast_indices, gradient_statistics
from lightning_ft.sparse.config import ALLOCATIONS, CRITERIA, GRADIENT_CRITERIA, Allocation, SparseConfig
from lightning_ft.targets import select_modules


def budget(shape: torch.Size | tuple[int, ...], density: float = 0.01, lora_equivalent_rank: int | None = None) -> int:
    """Entries to train in a weight of ``shape``: ``r * (m + n)`` (at most all) or ``round(density * m * n)``
    (at least 1)."""
    numel = math.prod(shape)
    if lora_equivalent_rank is not None:
        m, n = shape
        return min(numel, lora_equivalent_rank * (m + n))
    return min(numel, max(1, round(density * numel)))


def criterion_scores(
    criterion: str, weight: Tensor, grad_stat: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Scores (float32, ``weight``'s shape) of one weight; higher is selected first.

    ``grad_stat`` is the calibration statistic: ``sum_b g_b`` for ``gradient`` / ``movement``, ``sum_b g_b**2`` for
    ``fisher`` (see ``lightning_ft.sparse.calibration``). ``generator`` seeds ``random`` (a CPU generator).
    """
    if criterion == "random":
        return torch.rand(weight.shape, generator=generator).to(weight.device)
    if criterion == "magnitude":
        return weight.detach().float().abs()
    if criterion in GRADIENT_CRITERIA:
        if grad_stat is None:
            raise ValueError(f"criterion {criterion!r} needs calibration gradient statistics")
        stat = grad_stat.float()
        if criterion == "gradient":
            return stat.abs()
        if criterion == "fisher":
            return stat
        return -weight.detach().float() * stat
    raise ValueError(f"criterion {criterion!r} does not score weight entries; choose one of {list(CRITERIA[:-1])}")


def allocate(
    scores: Mapping[str, Tensor], budgets: Mapping[str, int], allocation: Allocation = "per_matrix"
) -> dict[str, Tensor]:
    """Sorted int64 indices into each flattened score tensor: the top ``budgets[name]`` of each (``per_matrix``), or
    the top ``sum(budgets)`` of all scores together (``global``)."""
    if allocation == "per_matrix":
        return {n: _top(s.reshape(-1), budgets[n]) for n, s in scores.items()}
    if allocation != "global":
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {list(ALLOCATIONS)}")
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float().to(scores[names[0]].device) for n in names])
    chosen = _top(flat, sum(budgets[n] for n in names))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + size], device=chosen.device))
        out[n] = (chosen[lo:hi] - start).to(scores[n].device)
        start += size
    return out


def _top(flat: Tensor, k: int) -> Tensor:
    """Sorted indices of the ``k`` largest entries of a 1-D tensor."""
    return torch.sort(torch.topk(flat.float(), k, sorted=False).indices).values


@takes_config(SparseConfig, kwargs_name=None)
def select_sparse(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    *,
    config: SparseConfig | None = None,
    **fields: Any,
) -> dict[str, Tensor]:
    """``{linear layer name: sorted int64 indices into its flattened weight}``, the entries to train.

    Takes a ``SparseConfig`` or its fields as keyword arguments (documented there) and uses the selection ones:
    ``density`` / ``lora_equivalent_rank``, ``criterion``, ``allocation``, ``seed``, ``target_modules`` /
    ``exclude_modules`` (these follow ``lightning_ft.targets.select_modules`` (the LoRA rules).
    Gradient criteria run ``loss_fn(batch).backward()`` for each of ``batches`` (this process's share under
    ``torch.distributed``: statistics are summed over ranks, and rank 0's masks are broadcast, so every rank gets
    the same masks). ``bitfit`` selects no weight entries: it returns ``{}``. Memory: one float32 statistic per
    targeted weight during calibration; ``per_matrix`` scores one weight at a time, ``global`` holds every score at
    once (and a concatenated copy during the top-k).
    """
    config = config_from_kwargs(SparseConfig, config, fields)
    if fields:
        raise TypeError(f"select_sparse got unexpected keyword arguments {sorted(fields)}")
    density, criterion, allocation = config.density, config.criterion, config.allocation
    lora_equivalent_rank, seed = config.lora_equivalent_rank, config.seed
    target_modules, exclude_modules = config.target_modules, config.exclude_modules
    if criterion in GRADIENT_CRITERIA and (batches is None or loss_fn is None):
        raise ValueError(f"criterion {criterion!r} needs calibration batches and a loss_fn(batch) -> loss")
    names = select_modules(model, target_modules, exclude_modules)
    if criterion == "bitfit":
        return {}
    stats: dict[str, Tensor] = {}
    if criterion in GRADIENT_CRITERIA:
        stats, seen = gradient_statistics(model, names, batches, loss_fn, squared=criterion == "fisher")
        counter = torch.tensor([seen], dtype=torch.int64, device=next(iter(stats.values())).device)
        all_reduce_sum_([*stats.values(), counter])
        if int(counter) == 0:
            raise ValueError("no calibration batches: the batches given for the gradient statistics are empty")
    generator = torch.Generator().manual_seed(seed)
    weights = {n: model.get_submodule(n).weight for n in names}
    budgets = {n: budget(w.shape, density, lora_equivalent_rank) for n, w in weights.items()}
    if allocation == "per_matrix":  # one score tensor at a time
        indices = {
            n: _top(criterion_scores(criterion, w, stats.pop(n, None), generator).reshape(-1), budgets[n])
            for n, w in weights.items()
        }
    else:
        scores = {n: criterion_scores(criterion, w, stats.pop(n, None), generator) for n, w in weights.items()}
        indices = allocate(scores, budgets, "global")
    return broadcast_indices(indices)
