"""Sparse fine-tuning, pure torch (no Lightning import): mask selection, delta / mask layers, re-selection, export."""

from lightning_ft.sparse.config import CRITERIA, SparseConfig
from lightning_ft.sparse.delta import sparse_delta_linear
from lightning_ft.sparse.export import load_sparse_delta, save_sparse_delta
from lightning_ft.sparse.inject import (
    inject_sparse,
    merge_sparse,
    sparse_counts,
    sparse_extra_params,
    sparse_layers,
    sparse_state_keys,
)
from lightning_ft.sparse.layer import SparseLinear, check_indices
from lightning_ft.sparse.mask import GradientMask
from lightning_ft.sparse.reselect import DynamicReselection, drop_fraction, reselect_layer
from lightning_ft.sparse.selection import budget, criterion_scores, select_sparse

__all__ = [
    "CRITERIA",
    "DynamicReselection",
    "GradientMask",
    "SparseConfig",
    "SparseLinear",
    "budget",
    "check_indices",
    "criterion_scores",
    "drop_fraction",
    "inject_sparse",
    "load_sparse_delta",
    "merge_sparse",
    "reselect_layer",
    "save_sparse_delta",
    "select_sparse",
    "sparse_counts",
    "sparse_delta_linear",
    "sparse_extra_params",
    "sparse_layers",
    "sparse_state_keys",
]
