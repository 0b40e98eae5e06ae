"""Put LoRA adapters into any ``nn.Module``, fold them back, and read out their weights (pure torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_ft.lora.compile import compile_blocks
from lightning_ft.lora.config import Bias, LoRAConfig
from lightning_ft.lora.fused import fuse_siblings
from lightning_ft.lora.layer import LoRALinear, fold_lora
from lightning_ft.method_config import config_from_kwargs, takes_config
from lightning_ft.modeling import (
    TRAINED_BIAS,
    adapter_param_names,
    mark_trained,
    marked_modules,
    set_submodule,
    train_modules_in_full,
    unmark,
)
from lightning_ft.targets import match_pattern, select_modules

METHOD = "lora"  # LoRALinear.adapter_method, and the mark on modules LoRA trains in full


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` of ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_modules_to_save(model: nn.Module) -> list[str]:
    """Names of the modules ``inject_lora`` trains in full (its ``modules_to_save``), relative to ``model``."""
    return marked_modules(model, METHOD)


def lora_bias(model: nn.Module) -> Bias:
    """The ``bias`` mode ``inject_lora`` used: read from the layers and modules it marked."""
    if marked_modules(model, METHOD, TRAINED_BIAS):
        return "all"
    return "lora_only" if any(layer.train_bias for layer in lora_layers(model).values()) else "none"


@takes_config(LoRAConfig, kwargs_name=None)
def inject_lora(model: nn.Module, *, config: LoRAConfig | None = None, **fields: Any) -> nn.Module:
    """Wrap the chosen linear layers of ``model`` in ``LoRALinear`` and freeze everything else, in place.

    Takes a ``LoRAConfig`` or its fields as keyword arguments (``inject_lora(model, r=4, alpha=8)``; fields given
    with a config override it). The fields are documented in ``LoRAConfig``.

    Returns:
        ``model``, with only adapter weights (and ``modules_to_save`` / chosen biases) requiring grad.
    """
    config = config_from_kwargs(LoRAConfig, config, fields)
    if fields:
        raise TypeError(f"inject_lora got unexpected keyword arguments {sorted(fields)}")
    if lora_layers(model):
        raise RuntimeError("the model already has LoRA adapters; inject once (merge_lora removes them)")
    names = select_modules(model, config.target_modules, config.exclude_modules)
    model.requires_grad_(False)
    for name in names:
        layer = LoRALinear(
            model.get_submodule(name),
            r=int(match_pattern(name, config.rank_pattern, config.r)),
            alpha=match_pattern(name, config.alpha_pattern, config.alpha),
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            init=config.init,
            train_bias=config.bias in ("lora_only", "all"),
        )
        set_submodule(model, name, layer)
    if config.bias == "all":
        owners = [
            n
            for n, m in model.named_modules()
            if getattr(m, "bias", None) is not None
            and isinstance(m.bias, nn.Parameter)
            and not isinstance(m, LoRALinear)
        ]
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.requires_grad_(True)
        mark_trained(model, owners, METHOD, TRAINED_BIAS)
    saved = train_modules_in_full(model, config.modules_to_save)
    mark_trained(model, saved, METHOD)
    if config.fuse:
        fuse_siblings(model, lora_layers(model))
    if config.compile:
        compile_blocks(model)
    return model


def merge_lora(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every adapter into its base weight (float32 math, cast back to the base dtype).

    With ``unload=True`` each ``LoRALinear`` is replaced by its base layer (a plain ``nn.Linear`` / ``Conv1D``), so
    the model is a regular Hugging Face model again. With ``unload=False`` the wrappers stay, merged, so that
    ``unmerge_lora`` can restore the adapters.
    """
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("the model has no LoRA adapters to merge")
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("the LoRA adapters are already merged (merge_lora was called twice); unmerge_lora first")
    for name, layer in layers.items():
        layer.merge()
        if unload:
            set_submodule(model, name, layer.base_layer)
    if unload:
        unmark(model, METHOD)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora(model, unload=False)``: subtract each adapter from its base weight again."""
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("the model has no LoRA adapters (after merge_lora(unload=True) they are gone)")
    for layer in layers.values():
        layer.unmerge()
    return model


def merged_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], in_place: bool = False
) -> dict[str, torch.Tensor]:
    """What ``merge_lora(model).state_dict()`` would hold, computed from ``state_dict`` without changing ``model``.

    ``state_dict`` holds full tensors under ``model.state_dict()``'s keys (e.g. gathered from FSDP shards on one
    rank); ``model`` supplies each adapter's scale and variant. Adapter weights are dropped, each base weight gets its
    adapter folded in (float32 math, cast back to its dtype) and the wrappers' ``.base_layer`` leaves the keys.
    ``in_place=True`` changes and returns ``state_dict`` itself, so each base weight is freed as soon as its merged
    weight exists (with the caller's last reference gone, at most one weight is held twice).
    """
    out = state_dict if in_place else dict(state_dict)
    for name, layer in lora_layers(model).items():
        if layer.merged:
            raise RuntimeError(f"the adapter of {name} is already merged into its base weight")
        p = f"{name}." if name else ""
        w, lora_a, lora_b = out.pop(f"{p}base_layer.weight"), out.pop(f"{p}lora_A"), out.pop(f"{p}lora_B")
        magnitude = out.pop(f"{p}lora_magnitude", None) if layer.use_dora else None
        merged, _ = fold_lora(w.T if layer.fan_in_fan_out else w, lora_a, lora_b, layer.scaling, magnitude)
        out[f"{p}weight"] = (merged.T if layer.fan_in_fan_out else merged).to(w.dtype).contiguous()
        for key in [k for k in out if k.startswith(f"{p}base_layer.")]:
            out[p + key.removeprefix(f"{p}base_layer.")] = out.pop(key)
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only: ``lora_A`` / ``lora_B`` / ``lora_magnitude`` plus every other trainable parameter
    (``modules_to_save``, trained biases), keyed by their names in ``model.state_dict()``."""
    adapters = adapter_param_names(model, METHOD)
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad or name in adapters}


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything but the adapters' own matrices (used after loading an adapter into a model)."""
    adapters = {n for n in adapter_param_names(model, METHOD) if not n.endswith(".base_layer.bias")}
    for name, p in model.named_parameters():
        p.requires_grad_(name in adapters)
