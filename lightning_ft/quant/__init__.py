"""A quantised frozen base for adapter training (QLoRA-style), pure torch over torchao.

``quantize_base(model, dtype="nf4")`` stores the chosen frozen linear weights in 4-bit NormalFloat (or int8), as
``QuantizedLinear`` layers that ``inject_lora`` then wraps; ``dequantize_base(model)`` puts plain linear layers back
(``MergeAdapters`` does it, in float32, before folding the adapters in). torchao is imported only when quantising.
"""

from lightning_ft.quant.backend import INSTALL
from lightning_ft.quant.config import QuantizeConfig
from lightning_ft.quant.layer import QuantizedLinear
from lightning_ft.quant.quantize import (
    dequantize_base,
    is_quantized,
    quantize_base,
    quantized_layers,
    quantized_parameter_names,
    quantized_weight_bytes,
)

__all__ = [
    "INSTALL",
    "QuantizeConfig",
    "QuantizedLinear",
    "dequantize_base",
    "is_quantized",
    "quantize_base",
    "quantized_layers",
    "quantized_parameter_names",
    "quantized_weight_bytes",
]
