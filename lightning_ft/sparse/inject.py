"""Put ``SparseLinear`` layers into any ``nn.Module``, fold them back, and read out their state (pure torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from lightning_ft.modeling import (
    TRAINED_BIAS,
    TRAINED_IN_FULL,
    adapter_layers,
    mark_trained,
    marked_modules,
    set_submodule,
    train_modules_in_full,
    unmark,
)
from lightning_ft.sparse.layer import MODES, Mode, SparseLinear

METHOD = "sparse"  # SparseLinear.adapter_method, and the mark on modules sparse fine-tuning trains in full


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
        ``model``; ``sparse_extra_params(model)`` lists the trainable parameters besides the sparse entries.
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
        set_submodule(model, name, SparseLinear(model.get_submodule(name), idx, mode))
    owners = []
    for name in train_biases:
        module = model.get_submodule(name)
        owners.append(f"{name}.base_layer" if isinstance(module, SparseLinear) else name)
        model.get_submodule(owners[-1]).bias.requires_grad_(True)
    mark_trained(model, owners, METHOD, TRAINED_BIAS)
    mark_trained(model, train_modules_in_full(model, modules_to_save), METHOD)
    return model


def mark_extra_params(model: nn.Module, names: Sequence[str]) -> None:
    """Record parameter ``names`` (e.g. read from a sparse delta folder) as trained besides the sparse entries: a
    ``bias`` marks its module's bias, any other parameter its whole module."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        mark_trained(model, [owner], METHOD, TRAINED_BIAS if leaf == "bias" else TRAINED_IN_FULL)


def sparse_extra_params(model: nn.Module) -> list[str]:
    """Names of the parameters trained besides the sparse entries: those of the modules trained in full
    (``modules_to_save``) and the BitFit biases, as ``inject_sparse`` marked them."""
    full = tuple(f"{n}." if n else "" for n in marked_modules(model, METHOD))
    biases = {f"{n}.bias" if n else "bias" for n in marked_modules(model, METHOD, TRAINED_BIAS)}
    return [n for n, _ in model.named_parameters() if (full and n.startswith(full)) or n in biases]


def has_sparse_state(model: nn.Module) -> bool:
    """Whether ``model`` holds sparse layers or other parameters sparse fine-tuning trains (BitFit: no layers)."""
    return bool(sparse_layers(model)) or bool(sparse_extra_params(model))


def merge_sparse(model: nn.Module) -> nn.Module:
    """Fold every delta into its base weight (float32 sum, cast back to the base dtype) and put the plain layers back,
    frozen; the model is a regular (e.g. Hugging Face) model again."""
    layers = sparse_layers(model)
    if not layers:
        raise RuntimeError("the model has no sparse deltas to merge")
    for name, layer in layers.items():
        layer.merge()
        layer.base_layer.weight.requires_grad_(False)
        set_submodule(model, name, layer.base_layer)
    unmark(model, METHOD)
    return model


def sparse_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of a sparse-only checkpoint: each layer's ``indices`` and ``values``, plus every other trainable
    parameter (``modules_to_save``, BitFit biases); never a dense base weight."""
    layers = adapter_layers(model, METHOD)
    dense = {f"{n}.base_layer.weight" for n in layers}
    keys = [f"{n}.{part}" for n, layer in layers.items() for part in layer.adapter_params()]
    return keys + [n for n, p in model.named_parameters() if p.requires_grad and n not in dense and n not in keys]


def sparse_counts(model: nn.Module) -> tuple[int, int]:
    """``(selected entries, entries of the sparse layers' weights)`` of ``model``."""
    layers = sparse_layers(model).values()
    return sum(layer.nnz for layer in layers), sum(layer.numel for layer in layers)
