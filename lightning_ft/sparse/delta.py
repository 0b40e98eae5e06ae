"""The delta-mode linear map ``y = x (W + scatter(values))^T + b`` as one autograd function (pure torch).

Autograd through ``W.flatten().index_add(0, indices, values)`` would keep the dense effective weight alive from the
forward to the backward pass: one extra copy of every targeted weight. This function saves only its inputs (``x``
and references to ``W`` and ``values``), rebuilds the effective weight in the backward pass, and gathers the values'
gradient at the selected entries only (a sampled matmul: ``sampled_weight_grad``). The dense weight gradient is made
only when re-selection accumulates it, and then lives only for the duration of that layer's backward.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override


def effective_weight(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``weight + scatter(values at indices)`` in ``weight``'s layout and dtype; the sum is taken in ``values``' dtype
    (float32 for a half-precision base), then cast back."""
    flat = weight.reshape(-1).to(values.dtype).index_add(0, indices, values)
    return flat.view_as(weight).to(weight.dtype)


def sampled_weight_grad(grad_out: Tensor, x: Tensor, indices: Tensor, shape: torch.Size, transposed: bool) -> Tensor:
    """The weight gradient at ``indices`` only: (k,) entries of ``grad_out^T x`` (or ``x^T grad_out`` when
    ``transposed``) in the stored (rows, cols) = ``shape`` layout, flattened.

    A sampled dense-dense matmul (``torch.sparse.sampled_addmm`` over the CSR pattern of ``indices``) costs about k * T
    multiply-adds instead of the rows * cols * T of the dense gradient; where the backend lacks it (e.g. bfloat16 on
    CPU), the dense gradient is computed and gathered.
    """
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
    left, right = (x2, g2) if transposed else (g2, x2)  # stored weight gradient = left^T @ right
    rows, cols = shape
    counts = torch.bincount(torch.div(indices, cols, rounding_mode="floor"), minlength=rows)
    crow = torch.zeros(rows + 1, dtype=indices.dtype, device=indices.device)
    crow[1:] = counts.cumsum(0)
    pattern = torch.sparse_csr_tensor(
        crow,
        indices % cols,
        torch.zeros(len(indices), dtype=g2.dtype, device=g2.device),
        (rows, cols),
        check_invariants=False,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return torch.sparse.sampled_addmm(pattern, left.T.contiguous(), right.contiguous(), beta=0.0).values()
    except (RuntimeError, NotImplementedError):
        return (left.T @ right).reshape(-1)[indices]


class SparseDeltaLinearFunction(torch.autograd.Function):
    """Forward: ``F.linear(x, W_eff, bias)`` with ``W_eff = W + scatter(values)``; ``W`` as (out, in), or as (in, out)
    when ``transposed`` (transformers' ``Conv1D``). ``indices`` index the flattened stored weight.

    Backward returns gradients for ``x`` (..., in), ``values`` (k,) and, when they require grad, ``bias`` (out,) and
    ``weight``. When ``accumulator`` (a float32 tensor shaped like the stored weight) is given, the dense weight
    gradient is also added to it: dynamic re-selection grows the mask from it.
    """

    @staticmethod
    @override
    def forward(ctx, x, weight, bias, indices, values, transposed: bool, accumulator: Tensor | None):
        w = effective_weight(weight, indices, values)
        ctx.save_for_backward(x, weight, indices, values)
        ctx.transposed, ctx.accumulator = transposed, accumulator
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x, w.T if transposed else w, bias)

    @staticmethod
    @override
    def backward(ctx, grad_out: Tensor):
        x, weight, indices, values = ctx.saved_tensors
        need_x, need_w, need_b, _, need_v = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = grad_v = None
        if need_x:
            w = effective_weight(weight, indices, values).to(grad_out.dtype)
            grad_x = (grad_out @ (w.T if ctx.transposed else w)).to(x.dtype)
        if need_w or ctx.accumulator is not None:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
            dense = x2.T @ g2 if ctx.transposed else g2.T @ x2  # the stored weight's layout: (in, out) or (out, in)
            if ctx.accumulator is not None:
                ctx.accumulator.add_(dense)
            if need_v:
                grad_v = dense.reshape(-1)[indices].to(values.dtype)
            if need_w:
                grad_w = dense.to(weight.dtype)
        elif need_v:
            grad_v = sampled_weight_grad(grad_out, x, indices, weight.shape, ctx.transposed).to(values.dtype)
        if need_b:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, grad_v, None, None


def sparse_delta_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    indices: Tensor,
    values: Tensor,
    transposed: bool = False,
    accumulator: Tensor | None = None,
) -> Tensor:
    """``x`` (..., in) -> (..., out) through ``W + scatter(values)``; see ``SparseDeltaLinearFunction``."""
    return SparseDeltaLinearFunction.apply(x, weight, bias, indices, values, transposed, accumulator)
