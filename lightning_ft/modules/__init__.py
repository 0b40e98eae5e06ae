"""LightningModules: the shared base and one small file per method."""

from lightning_ft.modules.base import FineTuneModule
from lightning_ft.modules.lora import LoRAModule
from lightning_ft.modules.sft import SFTModule
from lightning_ft.modules.sparse import SparseModule

__all__ = ["FineTuneModule", "LoRAModule", "SFTModule", "SparseModule"]
