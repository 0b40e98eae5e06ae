"""Quantise the frozen linear layers of any ``nn.Module`` in place, and undo it (pure torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_ft.method_config import config_from_kwargs, takes_config
from lightning_ft.modeling import is_linear, linear_shape, set_submodule
from lightning_ft.quant.backend import torchao_quantization
from lightning_ft.quant.config import QuantizeConfig
from lightning_ft.quant.layer import QuantizedLinear
from lightning_ft.targets import select_modules


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every ``QuantizedLinear`` of ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds a quantised linear layer."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantized_parameter_names(model: nn.Module) -> list[str]:
    """Names (in ``model.named_parameters()``) of the quantised weights."""
    return [f"{name}.weight" if name else "weight" for name in quantized_layers(model)]


def check_layers(model: nn.Module, names: list[str], config: QuantizeConfig, loaded: bool = True) -> None:
    """Refuse, before changing anything, a targeted layer that is not linear, sits on the meta device (when the
    model should be ``loaded``; ``lightning_ft.quant.load`` fills a meta model itself) or whose weight NF4's blocks
    do not tile."""
    wrong = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names if not is_linear(model.get_submodule(n))]
    if wrong:
        raise TypeError(
            f"quantize_base quantises nn.Linear and transformers' Conv1D layers only; target_modules selects "
            f"{wrong[:3]}. Narrow target_modules or add them to exclude_modules."
        )
    meta = [n for n in names if model.get_submodule(n).weight.is_meta] if loaded else []
    if meta:
        raise ValueError(
            f"{len(meta)} targeted weights are on the meta device (e.g. {meta[0]}): load the weights before "
            "quantising (quantize_base needs their values)"
        )
    if config.dtype != "nf4":
        return
    odd = []
    for n in names:
        in_f, out_f, _ = linear_shape(model.get_submodule(n))
        if (in_f * out_f) % config.block_size:
            odd.append(f"{n} ({out_f}x{in_f})")
    if odd:
        raise ValueError(
            f"NF4 block_size={config.block_size} does not divide the number of values of {odd[:3]}: choose a "
            "block_size that divides them (e.g. 32 or 16) or add these layers to exclude_modules"
        )


@takes_config(QuantizeConfig, kwargs_name=None)
def quantize_base(model: nn.Module, config: QuantizeConfig | None = None, **fields: Any) -> nn.Module:
    """Replace the chosen linear layers of ``model`` by frozen ``QuantizedLinear`` layers, in place.

    Takes a ``QuantizeConfig`` or its fields as keyword arguments (``quantize_base(model, dtype="int8")``; fields
    given with a config override it). Run it before ``inject_lora``: the adapters then wrap the quantised layers and
    train in full precision (float32 for a half-precision base). Biases stay as they are. Checks every targeted layer
    before changing any; needs torchao (``pip install 'lightning-ft[quant]'``).

    Returns:
        ``model``, its targeted weights quantised and frozen.
    """
    config = config_from_kwargs(QuantizeConfig, config, fields)
    if fields:
        raise TypeError(f"quantize_base got unexpected keyword arguments {sorted(fields)}")
    torchao_quantization()  # the install command before anything else
    if is_quantized(model):
        raise RuntimeError(
            "the model is already quantised; quantise once (dequantize_base undoes it: quantising the de-quantised "
            "values again would add a second rounding)"
        )
    names = select_modules(model, config.target_modules, config.exclude_modules)
    check_layers(model, names, config)
    for name in names:
        set_submodule(model, name, QuantizedLinear.from_linear(model.get_submodule(name), config))
    own_memory(model)
    return model


def own_memory(model: nn.Module) -> None:
    """Copy the plain (not quantised) parameters and buffers of ``model`` into memory of their own, in place.

    A model loaded from safetensors holds its tensors in a memory map of the file; while any of them lives (the
    embedding, the norms), every page of the file read so far, the float weights just quantised included, stays
    resident: on SmolLM2-135M about 300 MB more than the quantised model needs. Shared tensors (tied weights) stay
    shared.
    """
    copies: dict[int, Tensor] = {}

    def copy(t: Tensor) -> Tensor:
        if id(t) not in copies:
            copies[id(t)] = t.clone()
        return copies[id(t)]

    with torch.no_grad():
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and type(p.data) is Tensor and not p.is_meta and id(p) not in copies:
                    copies[id(p)] = p
                    p.data = p.data.clone()
            for name, b in module._buffers.items():
                if b is not None and type(b) is Tensor and not b.is_meta:
                    module._buffers[name] = copy(b)


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantizedLinear`` (also those inside LoRA layers) by a plain ``nn.Linear`` / ``Conv1D`` holding
    the de-quantised weight in ``dtype`` (default: each layer's original dtype), in place. Returns ``model``."""
    layers = quantized_layers(model)
    if not layers:
        raise RuntimeError("the model has no quantised layers to de-quantise")
    for name, layer in layers.items():
        if name:
            set_submodule(model, name, layer.to_dense(dtype))
    if "" in layers:
        raise TypeError("dequantize_base replaces layers inside a model; call QuantizedLinear.to_dense() on a layer")
    return model


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of every quantised weight of ``model`` (packed values and scales)."""
    return sum(layer.weight_bytes() for layer in quantized_layers(model).values())
