"""``QuantizeConfig``: the settings of a quantised frozen base (QLoRA-style), once (pure Python)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lightning_ft.method_config import MethodConfig

DTYPES = ("nf4", "int8")
QuantDtype = Literal["nf4", "int8"]


@dataclass
class QuantizeConfig(MethodConfig):
    """How ``quantize_base`` stores the frozen linear weights.

    Args:
        dtype: ``"nf4"`` (4-bit NormalFloat in blocks of ``block_size`` values with one absmax scale each, as in
            QLoRA; torchao's ``NF4Tensor``) or ``"int8"`` (int8 weight-only, one absmax scale per output row;
            torchao's ``Int8Tensor``).
        target_modules: the linear layers to quantise: ``"all-linear"`` (every linear layer except output heads),
            names / name suffixes, or a regex (as LoRA's ``target_modules``).
        exclude_modules: names / suffixes / a regex left in full precision.
        block_size: NF4 only: values per quantisation block (each block has its own scale); must divide every
            targeted weight's number of values.
        double_quant: NF4 only: quantise the block scales to int8 too (QLoRA's double quantisation, about 0.13 bits
            per weight instead of 0.5 for 16-bit scales); ``False`` keeps each scale exact.
        scaler_block_size: NF4 with ``double_quant``: scales per int8 scale block (the largest divisor of a layer's
            block count up to this value is used).
    """

    dtype: QuantDtype = "nf4"
    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] | None = None
    block_size: int = 64
    double_quant: bool = True
    scaler_block_size: int = 256

    def __post_init__(self) -> None:
        """Fail early on an unknown dtype or a block size that cannot pack NF4's two values per byte."""
        if self.dtype not in DTYPES:
            raise ValueError(f"quantisation dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"block_size must be an even number >= 2, got {self.block_size}")
        if self.scaler_block_size < 1:
            raise ValueError(f"scaler_block_size must be >= 1, got {self.scaler_block_size}")
