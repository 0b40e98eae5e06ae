"""The sparse-delta file format: a folder with ``sparse_config.json`` and ``sparse_delta.safetensors`` (pure torch).

``sparse_delta.safetensors`` holds, for each sparse layer ``name``, ``{name}.indices`` (int64, sorted, into the
flattened weight as stored) and ``{name}.values`` (float32, the change ``W_trained - W_base`` at those entries), plus
every other trained parameter in full under its own name (a fresh classification head, BitFit biases).
``sparse_config.json`` records the format version, the base model, the mode, and per layer the weight shape and
the number of entries. ``load_sparse_delta`` re-creates the delta layers on the same base model and checks every
index (dtype, range, sortedness) and shape before touching the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_ft.file_checks import check_safetensors, read_json_file
from lightning_ft.io import SIGNATURE, atomic_path, check_output, is_own_adapter_folder, user_path
from lightning_ft.modeling import is_linear
from lightning_ft.sparse.inject import inject_sparse, mark_extra_params, sparse_extra_params, sparse_layers
from lightning_ft.sparse.layer import check_indices

CONFIG_NAME = "sparse_config.json"
WEIGHTS_NAME = "sparse_delta.safetensors"
FIX = "Export the delta again (save_sparse_delta or MergeAdapters(adapter_dir=...)) or copy the whole folder again."
FORMAT = "lightning_ft.sparse_delta"
VERSION = 1


def save_sparse_delta(
    model: nn.Module,
    path: str | Path,
    base_model_name_or_path: str | None = None,
    extra_params: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the sparse deltas of ``model`` (after ``inject_sparse``) and its other trained parameters, atomically.

    ``extra_params`` (default ``sparse_extra_params(model)``) names the trained parameters written in full;
    ``metadata`` (e.g. the selection criterion) goes into the config as is. ``path`` (``~`` expanded) is checked
    by ``lightning_ft.io.check_output``: an existing folder is replaced only when it is empty or a sparse delta
    lightning-ft wrote (or a peft adapter it wrote), or with ``overwrite=True``.
    """
    path = check_output(path, "adapter_dir", is_own=is_own_adapter_folder, overwrite=overwrite)
    layers = sparse_layers(model)
    extra = list(sparse_extra_params(model) if extra_params is None else extra_params)
    if not layers and not extra:
        raise ValueError(f"{type(model).__name__} has no sparse deltas or trained parameters to save")
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.indices"] = layer.indices.detach().to("cpu", torch.int64, copy=True).contiguous()
        tensors[f"{name}.values"] = layer.delta_values().to("cpu", copy=True).contiguous()
    for name in extra:
        tensors[name] = params[name].detach().to("cpu", copy=True).contiguous()
    nnz, numel = sum(layer.nnz for layer in layers.values()), sum(layer.numel for layer in layers.values())
    config = {
        "format": FORMAT,
        "version": VERSION,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(model, "name_or_path", None)
        or f"<{type(model).__name__} built from a config>",
        "mode": next(iter(layers.values())).mode if layers else None,
        "nnz": nnz,
        "density": nnz / numel if numel else None,
        "layers": {n: {"shape": list(layer.base_layer.weight.shape), "nnz": layer.nnz} for n, layer in layers.items()},
        "extra_params": extra,
        **(metadata or {}),
    }
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", SIGNATURE: "sparse_delta"})
    return Path(path)


def load_sparse_delta(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Inject delta-mode ``SparseLinear`` layers into a plain ``model`` as ``path`` says and load the deltas and the
    other saved parameters. ``merge_sparse(model)`` then folds them into the weights.

    Raises ``ValueError`` naming the layer when an index is not int64, out of range or unsorted, or when a layer or
    parameter does not exist or has another shape (a delta made for another base model). With ``trainable=False``
    everything is frozen.
    """
    path = user_path(path)
    if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a sparse delta folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
    config = read_json_file(path / CONFIG_NAME, "sparse delta config", FIX)
    if config.get("format") != FORMAT or config.get("version", 0) > VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} folder (format {config.get('format')!r})")
    if sparse_layers(model):
        raise RuntimeError("the model already has sparse deltas; load a delta into a plain model")
    check_safetensors(path / WEIGHTS_NAME, FIX)
    state = load_file(path / WEIGHTS_NAME)
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    indices = {}
    for name, info in config["layers"].items():
        module = modules.get(name)
        if module is None or not is_linear(module):
            raise ValueError(f"{path}: layer {name!r} is not a linear layer of {type(model).__name__}")
        if list(module.weight.shape) != info["shape"]:
            raise ValueError(
                f"layer {name}: weight shape {info['shape']} in the delta but {list(module.weight.shape)} in the "
                "model; was the delta made for another base model?"
            )
        idx, values = state.get(f"{name}.indices"), state.get(f"{name}.values")
        if idx is None or values is None:
            raise ValueError(f"{path}: {name}.indices or {name}.values is missing")
        check_indices(idx, module.weight.numel(), name)
        if values.shape != idx.shape:
            raise ValueError(f"layer {name}: {values.numel()} values for {idx.numel()} indices")
        indices[name] = idx
    for name in config.get("extra_params", []):
        if name not in params or name not in state or params[name].shape != state[name].shape:
            raise ValueError(f"{path}: saved parameter {name!r} is missing or does not fit {type(model).__name__}")
    inject_sparse(model, indices, mode="delta")
    layers = sparse_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.values.copy_(state[f"{name}.values"])
        for name in config.get("extra_params", []):
            params[name].copy_(state[name])
    mark_extra_params(model, config.get("extra_params", []))
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable:
        for layer in layers.values():
            layer.values.requires_grad_(True)
        for name in config.get("extra_params", []):
            params[name].requires_grad_(True)
    return model
