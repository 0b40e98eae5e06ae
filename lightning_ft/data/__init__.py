"""Data: sources, task formats, collation and packing, and the shared ``FineTuneDataModule``."""

from lightning_ft.data.collate import Collator, pack_examples
from lightning_ft.data.datamodule import FineTuneDataModule, model_task_for

__all__ = ["Collator", "FineTuneDataModule", "model_task_for", "pack_examples"]
