"""``PredictionWriter``: write ``predict_step`` outputs (generated text or label names) to a JSONL file."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_ft.io import write_jsonl_atomic


class PredictionWriter(BasePredictionWriter):
    """At the end of ``Trainer.predict``, write one ``{"index": i, "prediction": ...}`` line per example, atomically.

    ``lightning-ft predict --config <recipe> --data.predict rows.jsonl --ckpt_path <ckpt>
    --trainer.callbacks+=lightning_ft.callbacks.PredictionWriter --trainer.callbacks.output_path preds.jsonl``.
    Single-process only: under DDP each rank predicts a share, so give each rank its own ``output_path``.
    """

    def __init__(self, output_path: str | os.PathLike = "predictions.jsonl") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any) -> None:
        flat = [p for batch in predictions for p in batch]
        write_jsonl_atomic(self.output_path, [{"index": i, "prediction": p} for i, p in enumerate(flat)])
