"""Data: sources, row formats, collation and packing, and the shared ``FineTuneDataModule``."""

from lightning_ft._lazy import lazy_getattr

_EXPORTS = {
    "Collator": "lightning_ft.data.collate",
    "pack_examples": "lightning_ft.data.packing",
    "check_packing": "lightning_ft.data.packing",
    "FineTuneDataModule": "lightning_ft.data.datamodule",
    "model_task_for": "lightning_ft.data.datamodule",
    "resolve_format": "lightning_ft.data.datamodule",
    "FORMATS": "lightning_ft.data.datamodule",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
