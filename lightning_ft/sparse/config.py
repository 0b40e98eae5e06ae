"""``SparseConfig``: every sparse fine-tuning setting, once: defaults, documentation, validation, (de)serialisation
(pure Python). The ``SparseMask`` callback and ``SparseModule`` take it (and its fields as keyword arguments, generated
by ``lightning_ft.method_config.takes_config``); ``sparse_config.json`` records it as ``selection``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_ft.method_config import MethodConfig
from lightning_ft.sparse.layer import MODES, Mode
from lightning_ft.sparse.reselect import SCHEDULES, Schedule

Criterion = Literal["random", "magnitude", "gradient", "fisher", "movement", "bitfit"]
Allocation = Literal["per_matrix", "global"]
CRITERIA = ("random", "magnitude", "gradient", "fisher", "movement", "bitfit")
#: criteria that need gradients of calibration batches
GRADIENT_CRITERIA = ("gradient", "fisher", "movement")
ALLOCATIONS = ("per_matrix", "global")


def check_selection_args(
    density: float, criterion: str, allocation: str, lora_equivalent_rank: int | None, calibration_batches: int
) -> None:
    """Fail early, with the allowed values, on a budget or criterion that cannot work."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown sparse criterion {criterion!r}; choose one of {list(CRITERIA)}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {list(ALLOCATIONS)}")
    if lora_equivalent_rank is not None:
        if lora_equivalent_rank < 1:
            raise ValueError(f"lora_equivalent_rank must be >= 1, got {lora_equivalent_rank}")
    elif not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if criterion in GRADIENT_CRITERIA and calibration_batches < 1:
        raise ValueError(
            f"criterion {criterion!r} needs calibration batches (calibration_batches >= 1), got {calibration_batches}"
        )


#: the fields that decide the selected entries and their storage (re-selection settings excluded)
SELECTION_FIELDS = (
    "density",
    "criterion",
    "mode",
    "target_modules",
    "exclude_modules",
    "calibration_batches",
    "lora_equivalent_rank",
    "allocation",
    "modules_to_save",
    "seed",
)


@dataclass
class SparseConfig(MethodConfig):
    """Sparse fine-tuning settings: which weight entries train, how they are stored, and re-selection.

    Args:
        density: share of each targeted weight to train, in (0, 1]; ignored when ``lora_equivalent_rank`` is set.
        criterion: ``"random"``, ``"magnitude"``, ``"gradient"``, ``"fisher"``, ``"movement"`` or ``"bitfit"``
            (biases of the targeted layers only); see ``lightning_ft.sparse.selection``.
        mode: ``"delta"`` (memory-saving) or ``"mask"`` (dense weights, masked gradients; full fine-tuning memory).
        target_modules: the LoRA rules (``lightning_ft.targets.select_modules``).
        exclude_modules: names / suffixes / a regex removed from the targets.
        calibration_batches: train batches for the gradient criteria (summed over ranks).
        lora_equivalent_rank: budget of ``r * (m + n)`` entries per m x n weight, LoRA rank r's parameter count.
        allocation: ``"per_matrix"`` or ``"global"`` (the summed budget goes to the best entries of all weights).
        modules_to_save: names / suffixes of modules trained in full (e.g. a fresh classification head).
        seed: seed of the ``random`` criterion (the same on every rank).
        reselect_every: re-select every this many optimizer steps (None: a static mask).
        drop_fraction: re-selection replaces this share of each layer's entries at first, annealed to zero.
        drop_schedule: ``"cosine"`` or ``"linear"`` annealing of ``drop_fraction``.
        grow_window: re-selection grows by the gradient of the last this many steps.
    """

    density: float = 0.01
    criterion: Criterion = "fisher"
    mode: Mode = "delta"
    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] | None = None
    calibration_batches: int = 8
    lora_equivalent_rank: int | None = None
    allocation: Allocation = "per_matrix"
    modules_to_save: Sequence[str] | None = None
    seed: int = 0
    reselect_every: int | None = None
    drop_fraction: float = 0.3
    drop_schedule: Schedule = "cosine"
    grow_window: int = 8

    def __post_init__(self) -> None:
        """Fail early, with the allowed values, on a budget, criterion, mode or re-selection that cannot work."""
        check_selection_args(
            self.density, self.criterion, self.allocation, self.lora_equivalent_rank, self.calibration_batches
        )
        if self.mode not in MODES:
            raise ValueError(f"unknown sparse mode {self.mode!r}; choose one of {list(MODES)}")
        if self.reselect_every is None:
            return
        if self.criterion == "bitfit":
            raise ValueError("criterion='bitfit' trains whole biases; there is no mask to re-select")
        if self.reselect_every < 1 or self.grow_window < 1:
            raise ValueError(
                f"reselect_every and grow_window must be >= 1, got {self.reselect_every} and {self.grow_window}"
            )
        if not 0 <= self.drop_fraction <= 1:
            raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")
        if self.drop_schedule not in SCHEDULES:
            raise ValueError(f"unknown drop schedule {self.drop_schedule!r}; choose one of {list(SCHEDULES)}")

    def selection(self) -> dict[str, Any]:
        """The settings that decide the selected entries and their storage (plain data)."""
        return {k: v for k, v in self.to_dict().items() if k in SELECTION_FIELDS}
