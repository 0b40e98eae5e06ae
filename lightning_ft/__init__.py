"""lightning-ft: PyTorch Lightning plugins for fine-tuning language models.

Public names are imported on first use, so light entry points (``lightning-ft prepare-mr``) start fast.
"""

from lightning_ft._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "FineTuneDataModule": "lightning_ft.data.datamodule",
    "FineTuneModule": "lightning_ft.modules.base",
    "SFTModule": "lightning_ft.modules.sft",
    "LoRAModule": "lightning_ft.modules.lora",
    "SparseModule": "lightning_ft.modules.sparse",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
