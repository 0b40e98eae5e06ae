"""Quantise while loading: fill a model built on the meta device from its safetensors files, one tensor at a time,
quantising each targeted linear weight as soon as it is read (pure torch).

``quantize_base`` on a loaded model needs the whole float model in memory first (SmolLM2-135M: 513 MB of float32
before its linear weights shrink to 52 MB as NF4); a 70B base would need 280 GB. Here a model built without weights
(``lightning_ft.models.load_model`` under ``torch.device("meta")``: every parameter records its file and key) is
filled tensor by tensor with plain file reads (``SafetensorsRows``: no memory map whose pages would stay resident),
and a targeted layer is replaced by its ``QuantizedLinear`` as soon as its weight (and bias) are in, so at most one
float weight of a targeted layer exists at a time. The result equals ``quantize_base(load_model(...))`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ft.modeling import set_submodule
from lightning_ft.quant.config import QuantizeConfig
from lightning_ft.quant.layer import QuantizedLinear
from lightning_ft.quant.quantize import check_layers
from lightning_ft.targets import select_modules


def _places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``{id(parameter): [(module, attribute), ...]}``: every place a parameter is registered (tied ones twice)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((mod, attr))
    return places


@torch.no_grad()
def load_quantized(
    model: nn.Module,
    config: QuantizeConfig,
    sample: Iterable[str] = (),
    sampler: Callable[[Tensor], Any] | None = None,
) -> dict[str, Any]:
    """Fill the meta parameters of ``model`` from the files they record and quantise the layers ``config`` targets
    as they fill, in place. ``model`` comes from ``load_model`` under a meta default device (its buffers and any
    parameter the files lack, e.g. a fresh head, are real already).

    ``sample``: parameter names whose values ``sampler(tensor)`` records while their float values exist (the resume
    fingerprint's samples, taken before quantisation). Returns ``{"tensors": read, "quantized": layers, "samples":
    {name: sampler(values)}}``.
    ``ValueError`` for a meta parameter that records no file.
    """
    from lightning_ft.strategies.meta_load import WEIGHT_SOURCE, SafetensorsRows

    names = select_modules(model, config.target_modules, config.exclude_modules)
    check_layers(model, names, config, loaded=False)
    pending = {name: model.get_submodule(name) for name in names}
    owner_of = {id(p): name for name, layer in pending.items() for p in layer.parameters(recurse=False)}
    sample = set(sample)
    if sample and sampler is None:
        raise ValueError("give a sampler to record the values of the sampled parameters")
    places = _places(model)
    files: dict[str, SafetensorsRows] = {}
    report: dict[str, Any] = {"tensors": 0, "quantized": 0, "samples": {}}
    try:
        for name, p in list(model.named_parameters()):
            if not p.is_meta:
                continue
            source = getattr(p, WEIGHT_SOURCE, None)
            if source is None:
                raise ValueError(f"{name} is on the meta device and records no weight file to load it from")
            file, key = source
            if file not in files:
                files[file] = SafetensorsRows(file)
            value = torch.empty(p.shape, dtype=p.dtype)
            files[file].read_rows(
                key, 0, value.shape[0] if value.ndim else 1, value if value.ndim else value.reshape(1)
            )
            report["tensors"] += 1
            if name in sample:
                report["samples"][name] = sampler(value)
            real = nn.Parameter(value, requires_grad=p.requires_grad)
            for mod, attr in places.pop(id(p)):  # popped: a replaced layer must not stay alive here with its weight
                mod._parameters[attr] = real
            layer_name = owner_of.get(id(p))
            layer = pending.get(layer_name) if layer_name is not None else None
            if layer is not None and not any(t.is_meta for t in layer.parameters(recurse=False)):
                set_submodule(model, layer_name, QuantizedLinear.from_linear(layer, config))
                del pending[layer_name]
                report["quantized"] += 1
    finally:
        for f in files.values():
            f.close()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{len(left)} tensors are still on the meta device after loading, e.g. {left[:3]}")
    return report
