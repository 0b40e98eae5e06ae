"""Put ``SparseLinear`` layers into any ``nn.Module``, fold them back, and read out their state (pure torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from lightning_ft.lora.inject import _modules_to_save, _set_module
from lightning_ft.sparse.layer import MODES, Mode, SparseLinear


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """Every ``SparseLinear`` of ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def inject_sparse(
    model: nn.Module,
    indices: Mapping[str, Tensor],
    mode: Mode = "delta",
    modules_to_save: Sequence[str] | None = None,
    train_biases: Sequence[str] = (),
) -> nn.Module:
    """Wrap each linear layer named in ``indices`` in a ``SparseLinear`` and freeze everything else, in place.

    Args:
        indices: ``{module name: sorted int64 indices into its flattened weight}`` (from ``select_sparse``).
        mode: ``"delta"`` (frozen base + trainable values: gradients and optimizer state for the selected entries
            only) or ``"mask"`` (the dense weight trains; pair with ``GradientMask``; full fine-tuning memory).
        modules_to_save: names / suffixes of modules trained in full (e.g. a fresh ``classifier`` head).
        train_biases: module names whose ``bias`` trains (BitFit).

    Returns:
        ``model``; ``model.sparse_extra_params`` lists the trainable parameters besides the sparse entries.
    """
    if sparse_layers(model):
        raise RuntimeError("the model already has sparse deltas; inject once (merge_sparse removes them)")
    if mode not in MODES:
        raise ValueError(f"unknown sparse mode {mode!r}; choose one of {list(MODES)}")
    biased = [n for n in train_biases if getattr(model.get_submodule(n), "bias", None) is None]
    if biased:
        raise ValueError(f"BitFit: {len(biased)} targeted layers have no bias, e.g. {biased[:3]}")
    model.requires_grad_(False)
    for name, idx in indices.items():
        _set_module(model, name, SparseLinear(model.get_submodule(name), idx, mode))
    for name in train_biases:
        module = model.get_submodule(name)
        module = module.base_layer if isinstance(module, SparseLinear) else module
        module.bias.requires_grad_(True)
    saved = _modules_to_save(model, modules_to_save)
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    sparse_params = set(_sparse_param_names(model))
    model.sparse_extra_params = [n for n, p in model.named_parameters() if p.requires_grad and n not in sparse_params]
    return model


def _sparse_param_names(model: nn.Module) -> list[str]:
    """Names of the parameters that hold sparse entries: ``values`` (delta mode) or the dense weight (mask mode)."""
    names = []
    for name, layer in sparse_layers(model).items():
        names.append(f"{name}.values" if layer.values is not None else f"{name}.base_layer.weight")
    return names


def merge_sparse(model: nn.Module) -> nn.Module:
    """Fold every delta into its base weight (float32 sum, cast back to the base dtype) and put the plain layers back,
    frozen; the model is a regular (e.g. Hugging Face) model again."""
    layers = sparse_layers(model)
    if not layers:
        raise RuntimeError("the model has no sparse deltas to merge")
    for name, layer in layers.items():
        layer.merge()
        layer.base_layer.weight.requires_grad_(False)
        _set_module(model, name, layer.base_layer)
    model.__dict__.pop("sparse_extra_params", None)
    return model


def sparse_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of a sparse-only checkpoint: each layer's ``indices`` and ``values``, plus every other trainable
    parameter (``modules_to_save``, BitFit biases); never a dense base weight."""
    layers = sparse_layers(model)
    dense = {f"{n}.base_layer.weight" for n in layers}
    keys = [f"{n}.{part}" for n in layers for part in ("indices", "values")]
    return keys + [n for n, p in model.named_parameters() if p.requires_grad and n not in dense and n not in keys]


def sparse_counts(model: nn.Module) -> tuple[int, int]:
    """``(selected entries, entries of the sparse layers' weights)`` of ``model``."""
    layers = sparse_layers(model).values()
    return sum(layer.nnz for layer in layers), sum(layer.numel for layer in layers)
