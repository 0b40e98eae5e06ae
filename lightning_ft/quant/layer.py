"""``QuantizedLinear``: a frozen linear layer whose weight is stored quantised (NF4 or int8) (pure torch).

An ``nn.Linear`` subclass, as torchtune's ``FrozenNF4Linear``: target selection and ``LoRALinear`` take it as a linear
layer unchanged. Its ``weight`` is a frozen ``nn.Parameter`` holding torchao's ``NF4Tensor`` / ``Int8Tensor`` with the
layer's (out_features, in_features) shape; ``forward`` de-quantises it for the matmul (the whole weight, transiently,
per call) and the gradient flows to the input only. A GPT-2 ``Conv1D`` is stored as its (out, in) transpose and
becomes a ``Conv1D`` again in ``to_dense``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_ft.modeling import is_linear, linear_shape, linear_weight
from lightning_ft.quant.backend import dequantize, storage_bytes, to_int8, to_nf4
from lightning_ft.quant.config import QuantizeConfig


class QuantizedMatmul(torch.autograd.Function):
    """``x @ dequantize(W).T`` that saves the *quantised* ``W`` for the backward pass and de-quantises it again there.

    torchao's int8 ``F.linear`` override leaves the de-quantised float weight in the autograd graph, so every layer's
    full-precision weight stays alive until the backward pass (more memory than a float32 base); this keeps only the
    packed weight. ``W`` never gets a gradient (frozen). Shapes: ``x`` (..., in), ``W`` (out, in), output (..., out).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.weight = weight  # the packed tensor (no copy); not save_for_backward: torchao subclasses are not views
        return F.linear(x, dequantize(weight).to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ dequantize(ctx.weight).to(grad.dtype), None


class QuantizedLinear(nn.Linear):
    """``y = x @ dequantize(W).T + b`` with ``W`` frozen in ``quant_dtype``.

    Shapes: ``weight`` (out_features, in_features) (a quantised tensor subclass), ``bias`` (out_features,) kept as
    it was (unquantised, its dtype and ``requires_grad`` unchanged). Input (..., in_features), output
    (..., out_features) in the input's dtype. ``original_dtype``: the dtype the weight had (``to_dense`` restores it).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: nn.Parameter | None,
        quant_dtype: str,
        original_dtype: torch.dtype,
        conv1d: bool = False,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a dense weight first
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.quant_dtype, self.original_dtype, self.conv1d = quant_dtype, original_dtype, conv1d

    @classmethod
    def from_linear(cls, layer: nn.Module, config: QuantizeConfig) -> QuantizedLinear:
        """Quantise an ``nn.Linear`` / ``Conv1D`` (its weight must be materialised, not on the meta device)."""
        if not is_linear(layer) or isinstance(layer, QuantizedLinear):
            raise TypeError(f"only nn.Linear and transformers' Conv1D can be quantised, not {type(layer).__name__}")
        _, _, conv1d = linear_shape(layer)
        w = linear_weight(layer)  # (out, in)
        if w.is_meta:
            raise ValueError("the weight is on the meta device: load (materialise) the model before quantising it")
        if config.dtype == "nf4":
            q = to_nf4(w, config.block_size, config.double_quant, config.scaler_block_size)
        else:
            q = to_int8(w)
        return cls(q, layer.bias, config.dtype, layer.weight.dtype, conv1d)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight's values as a plain (out_features, in_features) tensor in ``dtype`` (default: the original)."""
        return dequantize(self.weight).to(dtype or self.original_dtype)

    def weight_bytes(self) -> int:
        """Bytes of the quantised weight (packed values and scales)."""
        return storage_bytes(self.weight)

    @override
    def forward(self, x: Tensor) -> Tensor:
        out = QuantizedMatmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) with the de-quantised weight in ``dtype`` (default: the original) and
        this layer's bias (the same parameter)."""
        w = self.dequantized_weight(dtype)
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(self.out_features, self.in_features)
            layer.weight = nn.Parameter(w.T.contiguous(), requires_grad=False)
            layer.bias = self.bias if self.bias is not None else nn.Parameter(torch.zeros(self.out_features))
            return layer
        layer = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        layer.weight = nn.Parameter(w, requires_grad=False)
        layer.bias = self.bias
        return layer

    @override
    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant={self.quant_dtype}, original_dtype={self.original_dtype}"
        )
