"""Structured compression, pure torch (no Lightning import): low-rank (SVD / activation-aware SVD) factorisation
of pretrained linear layers, parameter reports, and saving / reloading compressed models."""

from lightning_ft.compress.calibration import collect_activation_stats
from lightning_ft.compress.compress import compress_low_rank, compression_targets, densify_low_rank
from lightning_ft.compress.config import CompressionConfig
from lightning_ft.compress.factorize import activation_scale, split_factors, weight_svd
from lightning_ft.compress.layer import LowRankLinear, low_rank_layers
from lightning_ft.compress.rank import rank_from_energy, rank_from_param_ratio, rank_from_ratio
from lightning_ft.compress.report import CompressionReport, LayerReport, ParameterCounts, parameter_counts
from lightning_ft.compress.saving import apply_low_rank_spec, load_compressed, low_rank_spec, save_compressed

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "LayerReport",
    "LowRankLinear",
    "ParameterCounts",
    "activation_scale",
    "apply_low_rank_spec",
    "collect_activation_stats",
    "compress_low_rank",
    "compression_targets",
    "densify_low_rank",
    "load_compressed",
    "low_rank_layers",
    "low_rank_spec",
    "parameter_counts",
    "rank_from_energy",
    "rank_from_param_ratio",
    "rank_from_ratio",
    "save_compressed",
    "split_factors",
    "weight_svd",
]
