"""``TokenThroughput``: training tokens per second, measured over training only (validation excluded).

No per-batch host sync: token counts add up on the device and the clock is read (after one device synchronisation)
only at the logging interval, before and after validation, and at the end of training.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override


def batch_tokens(batch: Any) -> Tensor | int:
    """Non-padding tokens of a batch, without a host sync: the attention mask's sum (a tensor on the batch's device),
    else every input id (packed rows are full), else 0."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return batch["attention_mask"].sum()
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


def count_tokens(batch: Any) -> int:
    """:func:`batch_tokens` as a Python int (a host sync for a tensor mask)."""
    return int(batch_tokens(batch))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


class TokenThroughput(L.Callback):
    """Log ``train/tokens_per_s`` (this process's tokens over its time in training) every ``log_every`` training
    batches (``None``: the Trainer's ``log_every_n_steps``).

    The time runs from the first training batch to the last, with validation cut out; it includes loading the
    batches. ``tokens`` and ``seconds`` hold the fit totals, for a summary after training.
    """

    def __init__(self, log_every: int | None = None) -> None:
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every must be at least 1 (None: the Trainer's log_every_n_steps), got {log_every}")
        self.log_every = log_every
        self.tokens = 0
        self.seconds = 0.0
        self._pending: Tensor | int = 0  # tokens since the last flush, on the device
        self._start: float | None = None  # clock at the start of the running interval; None: not timing
        self._batches = 0
        self._device = torch.device("cpu")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def _flush(self) -> None:
        """Close the running interval: wait for the device, add its time and tokens to the totals."""
        if self._start is None:
            return
        _synchronize(self._device)
        self.seconds += time.perf_counter() - self._start
        self.tokens += int(self._pending)
        self._pending = 0
        self._start = None

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:  # first batch, or the first after validation
            self._device = pl_module.device
            _synchronize(self._device)
            self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._pending = self._pending + batch_tokens(batch)
        self._batches += 1
        if self._batches % (self.log_every or max(trainer.log_every_n_steps, 1)) == 0:
            self._flush()
            self._start = time.perf_counter()  # the device is idle now: the next interval starts here
            pl_module.log("train/tokens_per_s", self.tokens_per_second, on_step=True, on_epoch=False)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()  # validation time does not count

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()

    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush()  # a checkpoint holds the totals so far (the next interval restarts at the next batch)
        return {"tokens": self.tokens, "seconds": self.seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = state_dict["tokens"]
        self.seconds = state_dict["seconds"]
