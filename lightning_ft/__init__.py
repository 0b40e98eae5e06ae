"""lightning-ft: PyTorch Lightning plugins for fine-tuning language models."""

from lightning_ft.data import FineTuneDataModule
from lightning_ft.modules import FineTuneModule, SFTModule

__all__ = ["FineTuneDataModule", "FineTuneModule", "SFTModule"]
__version__ = "0.1.0"
