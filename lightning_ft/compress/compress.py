"""``compress_low_rank``: replace chosen linear layers by truncated-SVD factor pairs, in place (pure torch)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ft.compress.calibration import Calibration, collect_activation_stats
from lightning_ft.compress.config import CompressionConfig
from lightning_ft.compress.factorize import activation_scale, split_factors, weight_svd
from lightning_ft.compress.layer import LowRankLinear, dense_params, low_rank_layers, low_rank_params
from lightning_ft.compress.rank import (
    check_budget,
    energy_kept,
    rank_from_energy,
    rank_from_param_ratio,
    rank_from_ratio,
)
from lightning_ft.compress.report import CompressionReport, LayerReport, count_params
from lightning_ft.compress.saving import record_in_configs
from lightning_ft.method_config import config_from_kwargs, takes_config
from lightning_ft.modeling import is_linear, linear_weight, set_submodule
from lightning_ft.targets import select_modules


def adapter_wrappers(model: nn.Module) -> list[str]:
    """Names of modules wrapping a linear ``base_layer`` (``LoRALinear``, ``SparseLinear``, peft's layers)."""
    return [n for n, m in model.named_modules() if is_linear(getattr(m, "base_layer", None))]


def compression_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Names of the linear layers ``compress_low_rank`` would factorise (factors of ``LowRankLinear`` excluded)."""
    if wrapped := adapter_wrappers(model):
        raise RuntimeError(
            f"the model has adapter layers ({wrapped[0]}, ...: LoRA or sparse deltas): compress first, then add "
            "adapters (merge_lora / merge_sparse fold them into plain linear layers)"
        )
    names = select_modules(model, target_modules, exclude_modules)
    factors = {f"{n}.{part}" for n in low_rank_layers(model) for part in ("first", "second")}
    remaining = [n for n in names if n not in factors]
    if not remaining:
        raise ValueError(
            f"target_modules={target_modules!r} selects only layers that are already factorised "
            f"({len(names)} factors of LowRankLinear layers); the model is compressed already"
        )
    return remaining


@torch.no_grad()
@takes_config(CompressionConfig, kwargs_name=None)
def compress_low_rank(
    model: nn.Module,
    calibration: Calibration | None = None,
    *,
    config: CompressionConfig | None = None,
    **fields: Any,
) -> CompressionReport:
    """Factorise each targeted linear layer of ``model`` into a ``LowRankLinear``, in place.

    Each ``out x in`` weight becomes ``second @ first`` with ``first`` (r x in) = ``sqrt(S_r) V_r^T`` and ``second``
    (out x r) = ``U_r sqrt(S_r)`` (bias on ``second``), the best rank-``r`` approximation (Eckart-Young).

    Takes a ``CompressionConfig`` or its fields as keyword arguments (``compress_low_rank(model, param_ratio=0.5)``;
    fields given with a config override it); the fields are documented in ``CompressionConfig``.

    Args:
        calibration: for ``"asvd"``: an iterable of batches run as ``model(**batch)`` (dicts), or a callable
            ``calibration(model)`` running forwards; the config's ``calibration_batches`` caps the iterable.

    A layer whose chosen rank would not save parameters (``r * (out + in) >= out * in``), or whose weight is shared
    with another module (tied embeddings), stays dense and is listed as such in the report. Hugging Face models
    record the ranks in ``config.low_rank_compression`` so that ``save_pretrained`` folders can be reloaded with
    ``lightning_ft.compress.load_compressed``.

    Returns:
        A ``CompressionReport``: per-layer ranks and parameter counts, and the model's totals before and after.
    """
    config = config_from_kwargs(CompressionConfig, config, fields)
    if fields:
        raise TypeError(f"compress_low_rank got unexpected keyword arguments {sorted(fields)}")
    method, rank_ratio, energy, param_ratio = config.method, config.rank_ratio, config.energy, config.param_ratio
    target_modules, exclude_modules = config.target_modules, config.exclude_modules
    activation_statistic, asvd_alpha = config.activation_statistic, config.asvd_alpha
    budget_name = check_budget(rank_ratio, energy, param_ratio)
    budget = {budget_name: {"rank_ratio": rank_ratio, "energy": energy, "param_ratio": param_ratio}[budget_name]}
    names = compression_targets(model, target_modules, exclude_modules)
    if any(model.get_submodule(n).weight.is_meta for n in names):
        raise ValueError("the model's weights are on the meta device; materialise them before compressing")
    shared = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    report = CompressionReport(method=method, budget=budget, params_before=count_params(model))
    scales = {}
    if method == "asvd":
        stats = collect_activation_stats(model, names, calibration, activation_statistic, config.calibration_batches)
        scales = {n: activation_scale(s, asvd_alpha) for n, s in stats.items()}
    for name in names:
        layer = model.get_submodule(name)
        report.layers.append(
            _compress_layer(
                model,
                name,
                layer,
                budget_name,
                budget[budget_name],
                scales.get(name),
                tied=shared[id(layer.weight)] > 1,
            )
        )
    report.params_after = count_params(model)
    record_in_configs(model)
    return report


def _compress_layer(
    model: nn.Module, name: str, layer: nn.Module, budget_name: str, value: float, scale: Tensor | None, tied: bool
) -> LayerReport:
    weight = linear_weight(layer)
    out_features, in_features = weight.shape
    bias = getattr(layer, "bias", None)
    before = dense_params(in_features, out_features, bias is not None)
    row = LayerReport(name, in_features, out_features, min(in_features, out_features), None, before, before)
    if tied:
        row.reason = "weight shared with another module"
        return row
    rank = None
    if budget_name == "rank_ratio":
        rank = rank_from_ratio(value, out_features, in_features)
    elif budget_name == "param_ratio":
        rank = rank_from_param_ratio(value, out_features, in_features)
    if rank is not None and low_rank_params(in_features, out_features, rank, False) >= in_features * out_features:
        row.reason = f"rank {rank} saves nothing"  # known before the SVD: skip it
        return row
    svd = weight_svd(weight, scale)
    if rank is None:
        rank = rank_from_energy(svd.s_values, value)
    row.energy = energy_kept(svd.s_values, rank)
    after = low_rank_params(in_features, out_features, rank, bias is not None)
    if after >= before:
        row.reason = f"rank {rank} saves nothing"
        return row
    first, second = split_factors(svd, rank)
    new = LowRankLinear.from_factors(
        first.to(weight.dtype), second.to(weight.dtype), None if bias is None else bias.detach()
    )
    new.requires_grad_(weight.requires_grad)
    new.train(layer.training)
    set_submodule(model, name, new)
    row.rank, row.params_after = rank, after
    return row


@torch.no_grad()
def densify_low_rank(model: nn.Module) -> nn.Module:
    """Replace every ``LowRankLinear`` by an ``nn.Linear`` computing the same function (weight ``second @ first``).

    The result has the standard layout (``save_pretrained`` / ``from_pretrained`` and other tools read it) but no
    longer saves parameters; use it to export a compressed (and recovered) model to tools that need dense layers.
    """
    for name, layer in low_rank_layers(model).items():
        set_submodule(model, name, layer.to_linear())
    record_in_configs(model)
    return model
