"""Put LoRA adapters into any ``nn.Module``, fold them back, and read out their weights (pure torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lightning_ft.lora.layer import INITS, LoRALinear, fold_lora
from lightning_ft.targets import match_pattern, select_modules

Bias = Literal["none", "all", "lora_only"]
#: last name part of every adapter parameter of a LoRALinear
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_magnitude")


def is_adapter_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_PARTS


def check_lora_args(r: int, bias: str, init: str) -> None:
    """Fail early, with the allowed values, on a rank below 1 or an unknown ``bias`` / ``init``."""
    if r < 1:
        raise ValueError(f"rank r must be >= 1, got {r}")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    if init not in INITS:
        raise ValueError(f"unknown LoRA init {init!r}; choose one of {list(INITS)}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` of ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    init: Literal["default", "gaussian", "pissa"] = "default",
    modules_to_save: Sequence[str] | None = None,
    bias: Bias = "none",
) -> nn.Module:
    """Wrap the chosen linear layers of ``model`` in ``LoRALinear`` and freeze everything else, in place.

    Args:
        r, alpha: rank and scale numerator (``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``).
        target_modules: ``"all-linear"`` (every linear layer except output heads), names / name suffixes, or a
            regex; ``exclude_modules`` removes matches (see ``lightning_ft.targets.select_modules``).
        rank_pattern, alpha_pattern: ``{regex: value}`` overrides per layer (first ``re.search`` match wins).
        use_dora: DoRA's trainable magnitude; ``init="pissa"`` initialises from the top singular vectors.
        modules_to_save: names / suffixes of modules trained in full (e.g. a fresh ``classifier`` head).
        bias: ``"none"`` (biases frozen), ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted layers).

    Returns:
        ``model``, with only adapter weights (and ``modules_to_save`` / chosen biases) requiring grad.
    """
    if lora_layers(model):
        raise RuntimeError("the model already has LoRA adapters; inject once (merge_lora removes them)")
    check_lora_args(r, bias, init)
    names = select_modules(model, target_modules, exclude_modules)
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer = LoRALinear(
            base, r=int(match_pattern(name, rank_pattern, r)), alpha=match_pattern(name, alpha_pattern, alpha),
            dropout=dropout, use_rslora=use_rslora, use_dora=use_dora, init=init,
        )  # fmt: skip
        _set_module(model, name, layer)
        if bias == "lora_only" and getattr(base, "bias", None) is not None:
            base.bias.requires_grad_(True)
    if bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.requires_grad_(True)
    saved = _modules_to_save(model, modules_to_save)
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    model.lora_modules_to_save = saved  # read by the PEFT export
    model.lora_bias = bias  # read by the PEFT export (requires_grad may change after injection)
    return model


def _modules_to_save(model: nn.Module, keys: Sequence[str] | None) -> list[str]:
    """Module names matching ``keys`` (names or suffixes); a module inside another chosen one is covered by it."""
    all_names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for key in keys or []:
        hits = [n for n in all_names if n == key or n.endswith("." + key)]
        if not hits:
            raise ValueError(f"modules_to_save: no module named {key!r} in {type(model).__name__}")
        found += hits
    return sorted({n for n in found if not any(n.startswith(f + ".") for f in found)})


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
            _set_module(model, name, layer.base_layer)
    if unload and hasattr(model, "lora_modules_to_save"):
        del model.lora_modules_to_save
    if unload and hasattr(model, "lora_bias"):
        del model.lora_bias
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora(model, unload=False)``: subtract each adapter from its base weight again."""
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("the model has no LoRA adapters (after merge_lora(unload=True) they are gone)")
    for layer in layers.values():
        layer.unmerge()
    return model


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``merge_lora(model).state_dict()`` would hold, computed from ``state_dict`` without changing ``model``.

    ``state_dict`` holds full tensors under ``model.state_dict()``'s keys (e.g. gathered from FSDP shards on one
    rank); ``model`` supplies each adapter's scale and variant. Adapter weights are dropped, each base weight gets its
    adapter folded in (float32 math, cast back to its dtype) and the wrappers' ``.base_layer`` leaves the keys.
    """
    out = dict(state_dict)
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
    return {
        name: p.detach()
        for name, p in model.named_parameters()
        if p.requires_grad or is_adapter_param(name)
    }


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything but the adapters (used after loading an adapter into a model)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))
