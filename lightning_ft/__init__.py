"""lightning-ft: PyTorch Lightning plugins for fine-tuning language models.

Public names are imported on first use, so light entry points (``python -m lightning_ft.data.mr``) start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FineTuneDataModule": "lightning_ft.data.datamodule",
    "FineTuneModule": "lightning_ft.modules.base",
    "SFTModule": "lightning_ft.modules.sft",
    "LoRAModule": "lightning_ft.modules.lora",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_ft' has no attribute {name!r}")
