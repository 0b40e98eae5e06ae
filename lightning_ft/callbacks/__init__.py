"""Lightning callbacks: thin shells that decide *when* the pure-torch core runs."""

from lightning_ft.callbacks.compress import LowRankCompression
from lightning_ft.callbacks.lora import LoRA
from lightning_ft.callbacks.merge import MergeAdapters
from lightning_ft.callbacks.prediction_writer import PredictionWriter
from lightning_ft.callbacks.quantize import QuantizeBase
from lightning_ft.callbacks.sparse import SparseMask
from lightning_ft.callbacks.throughput import TokenThroughput
from lightning_ft.callbacks.token_loss import TokenMeanLoss

__all__ = [
    "LoRA",
    "LowRankCompression",
    "MergeAdapters",
    "PredictionWriter",
    "QuantizeBase",
    "SparseMask",
    "TokenMeanLoss",
    "TokenThroughput",
]
