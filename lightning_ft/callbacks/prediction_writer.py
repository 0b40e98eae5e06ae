"""``PredictionWriter``: write ``predict_step`` outputs (generated text or label names) to a JSONL file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from lightning_ft.io import check_output, user_path, write_jsonl_atomic


def is_own_predictions(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a file ``PredictionWriter`` wrote: its first line is
    ``{"index": 0, "prediction": ...}``."""
    try:
        with open(path, "rb") as f:
            row = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and set(row) == {"index", "prediction"} and row["index"] == 0


class PredictionWriter(BasePredictionWriter):
    """At the end of ``Trainer.predict``, write one ``{"index": i, "prediction": ...}`` line per example, atomically.

    ``lightning-ft predict --config <recipe> --data.predict rows.jsonl --ckpt_path <ckpt>
    --trainer.callbacks+=lightning_ft.callbacks.PredictionWriter --trainer.callbacks.output_path preds.jsonl``.
    Single-process only: under DDP each rank predicts a share, so give each rank its own ``output_path``.

    ``output_path`` (``~`` expanded) is checked in ``setup``, before predicting (``lightning_ft.io.check_output``):
    not a folder, a writable parent; an existing file is replaced only when it is empty or an earlier
    ``PredictionWriter`` output, unless ``overwrite=True``.
    """

    def __init__(self, output_path: str | os.PathLike = "predictions.jsonl", overwrite: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self._given = output_path
        self.output_path: Path = user_path(output_path)
        self.overwrite = overwrite

    def _check(self) -> Path:
        return check_output(
            self._given, "output_path", is_own=is_own_predictions, folder=False, overwrite=self.overwrite
        )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "predict":
            self._check()

    @override
    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        flat = [p for batch in predictions for p in batch]
        write_jsonl_atomic(self._check(), [{"index": i, "prediction": p} for i, p in enumerate(flat)])
