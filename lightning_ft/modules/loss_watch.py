"""``NonFiniteLossWatch``: notice a NaN / inf loss without a host sync per step."""

from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteLossWatch:
    """Notes the first NaN / inf loss of a stage on the loss's device, without a host sync; :meth:`check` raises it
    (one sync). ``FineTuneModule`` checks training every ``trainer.log_every_n_steps`` batches and at the epoch's end,
    evaluation at the epoch's end: a bad loss is reported at most that many batches late."""

    def __init__(self) -> None:
        self.seen: Tensor | None = None  # bool: a non-finite loss was seen
        self.loss: Tensor | None = None  # the first one
        self.step: Tensor | None = None  # and its global step

    def update(self, loss: Tensor, step: int) -> None:
        loss = loss.detach().float().reshape(())
        if self.seen is None or self.seen.device != loss.device:
            self.seen = torch.zeros((), dtype=torch.bool, device=loss.device)
            self.loss = torch.zeros((), device=loss.device)
            self.step = torch.zeros((), dtype=torch.long, device=loss.device)
        first = ~torch.isfinite(loss) & ~self.seen
        self.loss = torch.where(first, loss, self.loss)
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)
        self.seen = self.seen | first

    def check(self, stage: str) -> None:
        """Raise ``FloatingPointError`` when a non-finite loss was seen since the last check."""
        seen, loss, step = self.seen, self.loss, self.step
        self.seen = self.loss = self.step = None
        if seen is not None and bool(seen):  # the host sync
            raise FloatingPointError(
                f"{stage} loss is {loss.item()} at step {int(step)}. Lower the learning rate, use "
                "precision='bf16-mixed' instead of '16-mixed', or check the data (e.g. labels outside the vocabulary)."
            )
