"""``TokenThroughput``: training tokens per second, measured over training batches only (validation excluded)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def count_tokens(batch: Any) -> int:
    """Non-padding tokens of a batch: the attention mask's sum, else every input id (packed rows are full)."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


class TokenThroughput(L.Callback):
    """Log ``train/tokens_per_s`` (this process's tokens over its time in training batches) each ``log_every`` steps.

    ``tokens`` and ``seconds`` hold the fit totals, for a summary after training.
    """

    def __init__(self, log_every: int = 10) -> None:
        self.log_every = log_every
        self.tokens = 0
        self.seconds = 0.0
        self._start = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start
        self.tokens += count_tokens(batch)
        if trainer.global_step % self.log_every == 0:
            pl_module.log("train/tokens_per_s", self.tokens_per_second, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = state_dict["tokens"]
        self.seconds = state_dict["seconds"]
