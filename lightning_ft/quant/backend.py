"""torchao, imported lazily and quietly, and the two weight formats built from it (pure torch).

torchao logs "Failed to load ... .so" for kernels of other platforms at import (and torch's pytree a deprecation
warning); both say nothing about our CPU / CUDA paths, so they are silenced for the duration of the import only.
"""

from __future__ import annotations

import importlib
import logging
import math
from types import ModuleType

import torch
from torch import Tensor

INSTALL = "pip install 'lightning-ft[quant]'  (or: pip install 'torchao>=0.18')"
_QUIET = ("torchao", "torch.utils._pytree")


def torchao_quantization() -> ModuleType:
    """``torchao.quantization``, or an ``ImportError`` that gives the install command."""
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return importlib.import_module("torchao.quantization")
    except ImportError as err:
        raise ImportError(f"a quantised base needs torchao, not installed here ({err}). Install it: {INSTALL}") from err
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def nf4_storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an NF4 weight is tagged with (and de-quantised in): bfloat16 for a float32 base, QLoRA's usual
    compute dtype. torchao's ``NF4Tensor.float()`` of a float32-tagged weight is a no-op that keeps the NF4 tensor,
    so code that reads ``weight.float()`` (merging, DoRA's norm) would get the packed tensor instead of values."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def to_nf4(weight: Tensor, block_size: int, double_quant: bool, scaler_block_size: int) -> Tensor:
    """An (out, in) weight as torchao's ``NF4Tensor`` (tagged ``nf4_storage_dtype``).

    ``double_quant``: the block scales are int8 in blocks of ``gcd(n_blocks, scaler_block_size)``; without it each
    scale is stored exactly (int8 ``1`` times its own factor ``1 / scale``), the same values torchao's quantiser
    used for the 4-bit codes.
    """
    ao = torchao_quantization()
    w = weight.detach().to(nf4_storage_dtype(weight.dtype)).contiguous()
    n_blocks = w.numel() // block_size
    if not double_quant:
        q = ao.to_nf4(w, block_size, 1)
        absmax = w.reshape(n_blocks, block_size).abs().amax(dim=1)
        q.quantized_scalers = torch.ones_like(q.quantized_scalers)
        q.quantization_factor = (1.0 / absmax).to(q.quantization_factor.dtype)
        q.scaler_mean = torch.zeros_like(q.scaler_mean)
        return q
    return ao.to_nf4(w, block_size, math.gcd(n_blocks, scaler_block_size))


def to_int8(weight: Tensor) -> Tensor:
    """An (out, in) weight as torchao's ``Int8Tensor``: int8 values with one absmax scale per output row."""
    ao = torchao_quantization()
    from torchao.quantization.granularity import PerRow

    return ao.Int8Tensor.from_hp(weight.detach().contiguous(), PerRow())


def dequantize(weight: Tensor) -> Tensor:
    """The values a quantised weight stands for, as a plain tensor in its tagged dtype."""
    if hasattr(weight, "get_original_weight"):  # NF4Tensor
        return weight.get_original_weight()
    return weight.dequantize()


def storage_bytes(weight: Tensor) -> int:
    """Bytes a quantised weight holds (its packed values, scales and tables)."""
    names, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in names)
