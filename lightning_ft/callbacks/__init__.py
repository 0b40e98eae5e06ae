"""Lightning callbacks: thin shells that decide *when* the pure-torch core runs."""

from lightning_ft.callbacks.prediction_writer import PredictionWriter
from lightning_ft.callbacks.throughput import TokenThroughput

__all__ = ["PredictionWriter", "TokenThroughput"]
