"""Saving and reloading compressed models (pure torch + safetensors; transformers only when loading HF folders).

A plain ``from_pretrained`` cannot rebuild a compressed model: it knows only the architecture's dense layers, so
it would warn that the factor weights (``...q_proj.first.weight``) are unused and leave ``q_proj`` randomly
initialised. The factorised structure is therefore written down next to the weights:

- Hugging Face models: ``compress_low_rank`` records the ranks in ``model.config.low_rank_compression`` (names
  relative to that model), so every ``save_pretrained`` folder carries them in ``config.json``, including the
  merged folder that ``MergeAdapters`` writes. ``save_compressed`` is ``save_pretrained`` (plus the tokenizer),
  written atomically.
- Other modules: ``save_compressed`` writes ``model.safetensors`` and ``low_rank_compression.json``.

``load_compressed(path)`` builds the model from ``config.json`` (or takes an uncompressed ``model`` of the same
architecture), replaces the recorded layers by empty ``LowRankLinear``s of the recorded ranks, and loads the
weights, checking that every key fits. For tools that need the standard dense layout, ``densify_low_rank`` first.

Spec format (``config.low_rank_compression`` / ``low_rank_compression.json``)::

    {"format": "lightning-ft/low-rank", "version": 1,
     "layers": {"model.layers.0.self_attn.q_proj": {"rank": 8, "in_features": 32, "out_features": 32, "bias": false}}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_ft.compress.layer import LowRankLinear, low_rank_layers
from lightning_ft.io import MODEL_KIND, atomic_path, check_output, is_own_model_folder, mark_output, user_path
from lightning_ft.modeling import is_hf_model, is_linear, named_hf_models

CONFIG_KEY = "low_rank_compression"
SPEC_FILE = "low_rank_compression.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT, VERSION = "lightning-ft/low-rank", 1


# ---- the spec ----------------------------------------------------------------------------------------------------
def low_rank_spec(model: nn.Module) -> dict[str, Any]:
    """The factorised structure of ``model``: every ``LowRankLinear`` with its rank and shape (also while ``LoRA`` /
    ``SparseMask`` wrap a factor: the wrapper's ``base_layer`` holds its bias)."""
    layers = {
        name: {
            "rank": m.rank,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": getattr(m.second, "base_layer", m.second).bias is not None,
        }
        for name, m in low_rank_layers(model).items()
    }
    return {"format": FORMAT, "version": VERSION, "layers": layers}


def record_in_configs(model: nn.Module) -> None:
    """Write (or remove) ``config.low_rank_compression`` of every Hugging Face model in ``model``."""
    for _, hf in named_hf_models(model):
        spec = low_rank_spec(hf)
        if spec["layers"]:
            setattr(hf.config, CONFIG_KEY, spec)
        elif hasattr(hf.config, CONFIG_KEY):
            delattr(hf.config, CONFIG_KEY)


def apply_low_rank_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Replace each layer named in ``spec`` by an (uninitialised) ``LowRankLinear`` of the recorded rank, in place."""
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        got = f"format={spec.get('format')!r}, version={spec.get('version')!r}"
        raise ValueError(f"not a {FORMAT} v{VERSION} spec: {got}")
    for name, entry in spec["layers"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"the compression spec names {name!r}; {type(model).__name__} has no such module") from err
        if isinstance(layer, LowRankLinear):
            if layer.rank != entry["rank"]:
                raise ValueError(f"{name} already has rank {layer.rank}; the compression spec says {entry['rank']}")
            continue
        w = layer.weight
        out_features, in_features = w.shape if isinstance(layer, nn.Linear) else w.shape[::-1]
        if (in_features, out_features) != (entry["in_features"], entry["out_features"]):
            raise ValueError(
                f"{name} is {in_features} -> {out_features} in the model but "
                f"{entry['in_features']} -> {entry['out_features']} in the compression spec"
            )
        new = LowRankLinear(in_features, out_features, entry["rank"], entry["bias"], device=w.device, dtype=w.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    record_in_configs(model)
    return model


# ---- save ----------------------------------------------------------------------------------------------------------
def save_compressed(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> None:
    """Write ``model`` (compressed, possibly recovered) to the folder ``path``, atomically.

    Hugging Face models: ``save_pretrained`` with the ranks in ``config.json`` (plus ``tokenizer``). Other modules:
    ``model.safetensors`` + ``low_rank_compression.json``. Reload with ``load_compressed``. ``path`` (``~``
    expanded) is checked by ``lightning_ft.io.check_output``: an existing folder is replaced only when it is empty
    or a model folder lightning-ft wrote, or with ``overwrite=True``.
    """
    if any(is_linear(getattr(m, "base_layer", None)) for m in model.modules()):
        raise RuntimeError("the model has adapter layers (LoRA / sparse deltas): merge them before saving")
    path = check_output(path, "the compressed model's folder", is_own=is_own_model_folder, overwrite=overwrite)
    with atomic_path(path) as tmp:
        if is_hf_model(model):
            record_in_configs(model)
            model.save_pretrained(tmp)
        else:
            from safetensors.torch import save_model

            tmp.mkdir()
            save_model(model, str(tmp / WEIGHTS_FILE))
            (tmp / SPEC_FILE).write_text(json.dumps(low_rank_spec(model), indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        mark_output(tmp, MODEL_KIND)


# ---- load ----------------------------------------------------------------------------------------------------------
def load_compressed(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    model_class: Any = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild a model written by ``save_compressed`` (or by ``save_pretrained`` / ``MergeAdapters`` after
    ``compress_low_rank``) and load its weights. Returns the model in eval mode.

    Args:
        model: an uncompressed model of the same architecture to load into (required for non-Hugging Face folders);
            by default a Hugging Face model is built from ``config.json``.
        model_class: the class to build (``AutoModelForCausalLM``, ``LlamaForCausalLM``, ...); default: the
            config's ``architectures[0]``.
        dtype: weight dtype; default: the dtype of the saved floating-point weights.
    """
    path = user_path(path)
    spec, config = _read_spec(path)
    if model is None:
        if config is None:
            raise ValueError(f"{path} is not a Hugging Face folder: pass the uncompressed model to load into")
        model = _build(config, model_class)
    apply_low_rank_spec(model, spec)
    state = _read_weights(path)
    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    if dtype is not None:
        model.to(dtype)
    _load_checked(model, state, path)
    return model.eval()


def _read_spec(path: Path) -> tuple[dict[str, Any], Any]:
    if (path / SPEC_FILE).exists():
        return json.loads((path / SPEC_FILE).read_text(encoding="utf-8")), None
    if (path / "config.json").exists():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        spec = getattr(config, CONFIG_KEY, None)
        if spec is None:
            raise ValueError(f"{path}/config.json has no {CONFIG_KEY!r}: not a compressed model (use from_pretrained)")
        return spec, config
    raise FileNotFoundError(f"{path} holds neither {SPEC_FILE} nor config.json")


def _build(config: Any, model_class: Any) -> nn.Module:
    if model_class is None:
        import transformers

        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            raise ValueError(f"cannot tell which model class to build (architectures={arch!r}); pass model_class=")
    if hasattr(model_class, "from_config"):  # an Auto class
        return model_class.from_config(config)
    return model_class(config)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from lightning_ft.file_checks import check_safetensors

    index = path / f"{WEIGHTS_FILE}.index.json"
    if index.exists():  # sharded save_pretrained
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (path / WEIGHTS_FILE).exists():
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE} (or its shard index)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        check_safetensors(path / f, "Save the compressed model again or copy the whole folder again.")
        state.update(load_file(str(path / f)))
    return state


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` that accepts only missing keys of tied parameters (saved once under another name)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied_to_loaded = {n for names in groups.values() if any(k in state for k in names) for n in names}
    missing = [k for k in missing if k not in tied_to_loaded]
    if missing or unexpected:
        raise RuntimeError(
            f"the weights in {path} do not fit the rebuilt model: {len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}"
        )
