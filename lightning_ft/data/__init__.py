"""Data: sources, task formats, collation and packing, and the shared ``FineTuneDataModule``."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Collator": "lightning_ft.data.collate",
    "pack_examples": "lightning_ft.data.collate",
    "FineTuneDataModule": "lightning_ft.data.datamodule",
    "model_task_for": "lightning_ft.data.datamodule",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_ft.data' has no attribute {name!r}")
