"""Choosing the rank of each factorised matrix: a share of the full rank, of the parameters, or of the energy."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# a float product such as 0.29 * 100 = 28.999999999999996 should still give 29
_EPS = 1e-9


def check_budget(rank_ratio: float | None, energy: float | None, param_ratio: float | None) -> str:
    """Validate that exactly one budget is given, in (0, 1]; return its name."""
    given = {
        k: v for k, v in (("rank_ratio", rank_ratio), ("energy", energy), ("param_ratio", param_ratio)) if v is not None
    }
    if len(given) != 1:
        raise ValueError(
            "give exactly one of rank_ratio (share of min(out, in) kept), energy (share of the sum of squared "
            f"singular values kept) or param_ratio (share of each matrix's parameters kept); got {given or 'none'}"
        )
    ((name, value),) = given.items()
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return name


def rank_from_ratio(rank_ratio: float, out_features: int, in_features: int) -> int:
    """``floor(rank_ratio * min(out, in))``; raises ``ValueError`` when that is 0."""
    full = min(out_features, in_features)
    rank = math.floor(rank_ratio * full + _EPS)
    if rank < 1:
        raise ValueError(
            f"rank_ratio={rank_ratio} leaves rank 0 for a {in_features} -> {out_features} layer "
            f"(full rank {full}); use rank_ratio >= {1 / full:.4g}"
        )
    return rank


def rank_from_param_ratio(param_ratio: float, out_features: int, in_features: int) -> int:
    """Largest ``r`` with ``r * (out + in) <= param_ratio * out * in``; raises ``ValueError`` when that is 0."""
    rank = min(
        math.floor(param_ratio * out_features * in_features / (out_features + in_features) + _EPS),
        min(out_features, in_features),
    )
    if rank < 1:
        raise ValueError(
            f"param_ratio={param_ratio} leaves rank 0 for a {in_features} -> {out_features} layer "
            f"(one rank costs {out_features + in_features} of its {out_features * in_features} parameters)"
        )
    return rank


def rank_from_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest ``r`` whose top ``r`` singular values keep ``energy`` of ``sum(sigma_i^2)``.

    ``singular_values``: (k,), descending. A zero matrix gets rank 1.
    """
    sq = singular_values.double().square()
    total = sq.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    # the first index reaching the target (searchsorted on a non-decreasing sequence); guard rounding at energy=1
    rank = int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=kept.dtype)).item()) + 1
    return min(rank, singular_values.numel())


def energy_kept(singular_values: Tensor, rank: int) -> float:
    """Share of ``sum(sigma_i^2)`` in the top ``rank`` singular values."""
    sq = singular_values.double().square()
    total = float(sq.sum())
    return float(sq[:rank].sum()) / total if total > 0 else 1.0
