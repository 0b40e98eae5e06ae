"""Truncated SVD of one weight matrix, plain or activation-aware (ASVD), split into two factors (pure torch).

Plain SVD: ``W = U diag(sigma) V^T``; keeping the top ``r`` triplets gives the best rank-``r`` approximation in
Frobenius norm (Eckart-Young): ``||W - W_r||_F = sqrt(sum_{i>r} sigma_i^2)``.

ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language
Models"): input channels that carry large activations matter more to the output ``x W^T`` than the weight's own
norm says. With a positive scale ``s`` per input channel (from calibration activations), factorise
``W diag(s) = U diag(sigma) V^T``, truncate, and fold ``diag(s)^-1`` back into the ``V`` side:
``W_r = U_r diag(sigma_r) V_r^T diag(s)^-1``. The truncation error is then measured in the scaled space, where a
channel's error counts in proportion to its activation size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class WeightSVD(NamedTuple):
    """``W diag(s) = u @ diag(s_values) @ vh`` in float32: u (out, k), s_values (k,), vh (k, in), k = min(out, in).

    ``input_scale`` is the ASVD scale ``s`` (in,), or None for plain SVD.
    """

    u: Tensor
    s_values: Tensor
    vh: Tensor
    input_scale: Tensor | None


def weight_svd(weight: Tensor, input_scale: Tensor | None = None) -> WeightSVD:
    """SVD of ``weight`` (out, in), column-scaled by ``input_scale`` (in,) when given, in float32."""
    w = weight.detach().float()
    if input_scale is not None:
        if input_scale.shape != (w.shape[1],):
            raise ValueError(f"input_scale has shape {tuple(input_scale.shape)}, expected ({w.shape[1]},)")
        if not bool((input_scale > 0).all()) or not bool(torch.isfinite(input_scale).all()):
            raise ValueError("input_scale must be positive and finite")
        input_scale = input_scale.to(device=w.device, dtype=torch.float32)
        w = w * input_scale[None, :]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return WeightSVD(u, s, vh, input_scale)


def split_factors(svd: WeightSVD, rank: int) -> tuple[Tensor, Tensor]:
    """The two factors of the rank-``rank`` truncation, singular values split evenly between them.

    Returns ``first`` (rank, in) = ``sqrt(sigma_r) V_r^T diag(s)^-1`` and ``second`` (out, rank) =
    ``U_r sqrt(sigma_r)``, float32, so that ``second @ first`` is the truncated weight.
    """
    root = svd.s_values[:rank].sqrt()
    first = root[:, None] * svd.vh[:rank]
    if svd.input_scale is not None:
        first = first / svd.input_scale[None, :]
    second = svd.u[:, :rank] * root[None, :]
    return first, second


def activation_scale(stat: Tensor, alpha: float = 0.5, floor: float = 1e-6) -> Tensor:
    """ASVD's channel scale ``s = stat ** alpha`` (in,), with channels that never fire raised to a small floor.

    ``stat`` is a per-input-channel activation size (mean ``|x|`` in the paper, or the RMS); the paper finds
    ``alpha = 0.5`` works best. The floor (``floor * max(s)``) keeps ``diag(s)^-1`` finite for dead channels.
    """
    s = stat.float().clamp_min(0).pow(alpha)
    top = float(s.max()) if s.numel() else 0.0
    return s.clamp_min(max(top * floor, 1e-12))
