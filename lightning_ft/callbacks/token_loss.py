"""``TokenMeanLoss``: the loss of an optimizer step is one mean over every loss term of the step.

The loss of one optimizer step is the sum of the per-token NLLs (per-row losses for classification) over every
micro-batch of the accumulation window on every rank, divided by that global count. Averaging per-micro-batch means
(what Lightning's accumulation and DDP's gradient averaging do to a mean loss) weighs a micro-batch of 3 target tokens
as much as one of 3,000: with unequal answer lengths the gradient is not the large-batch gradient. This is the bug
transformers 4.46 fixed with ``num_items_in_batch``.

How. The module's ``training_step`` returns the *sum* of its loss terms (``reduction="sum"``). Lightning divides it
by ``accumulate_grad_batches`` (A) and DDP / FSDP average the gradients over the W ranks, so after the last backward
of a window each gradient is ``sum(grad of term) / (A * W)``. This callback counts the terms of every micro-batch
(``count_targets(batch["labels"])``, kept when the micro-batch has a backward), all-reduces the window's count N in
``on_before_optimizer_step`` and multiplies the gradients by ``A * W / N``: they become ``sum(grad of term) / N``,
exactly the gradient of one batch holding the whole window. ``on_before_optimizer_step`` runs after AMP unscaling and
before gradient clipping, so clipping sees the exact gradient. ``train/loss`` is logged at the end of the window as
the all-reduced NLL sum over N.

A user's own LightningModule gets the same by returning the summed loss from ``training_step`` (for example
``lightning_ft.modules.objectives.token_sums``'s ``nll_sum``, or ``F.cross_entropy(..., reduction="sum")``) with
``labels`` in the batch (or a ``count_fn``), and adding ``TokenMeanLoss()`` to the Trainer's callbacks. A module that
returns a *mean* must not use it (the gradients would be divided twice).

Assumes gradients are averaged over all ``trainer.world_size`` ranks (DDP, FSDP / FSDP2 data parallelism), and
automatic optimization.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ft.modules.objectives import count_targets, scale_gradients


def count_batch_targets(batch: Any) -> Tensor:
    """Loss terms of a batch: ``count_targets(batch["labels"])``."""
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError(
            "TokenMeanLoss counts the loss terms from batch['labels'] (causal-LM labels with -100 where no loss is "
            "taken, or class ids); this batch has none. Pass TokenMeanLoss(count_fn=...) to count them another way."
        )
    return count_targets(batch["labels"])


class TokenMeanLoss(L.Callback):
    """Make each optimizer step's gradient the gradient of the mean over all its loss terms (see the module docstring).

    Args:
        count_fn: ``batch -> 0-dim tensor``, the number of loss terms of a micro-batch; default
            ``count_batch_targets``.
        log_name: name of the logged step loss (``None``: log nothing).

    ``last_step_terms`` holds the global count of the last optimizer step and ``last_step_loss`` its loss.
    """

    def __init__(self, count_fn: Callable[[Any], Tensor] | None = None, log_name: str | None = "train/loss") -> None:
        self.count_fn = count_fn or count_batch_targets
        self.log_name = log_name
        self._last_step_terms: Tensor | None = None
        self._last_step_loss: Tensor | None = None  # on the device: read (a host sync) only when asked
        self._reset_window()

    @property
    def last_step_terms(self) -> int | None:
        """The global count of loss terms of the last optimizer step."""
        return None if self._last_step_terms is None else int(self._last_step_terms)

    @property
    def last_step_loss(self) -> float | None:
        """The loss of the last optimizer step (its all-reduced loss sum over its global count of terms)."""
        return None if self._last_step_loss is None else float(self._last_step_loss)

    def _reset_window(self) -> None:
        self._terms: Tensor | int = 0
        self._pending: Tensor | int = 0
        self._loss_sum: Tensor | float = 0.0
        self._stepped = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not pl_module.automatic_optimization:
            raise RuntimeError(
                "TokenMeanLoss works with automatic optimization only; with manual optimization divide the summed "
                "loss by the global token count yourself (all-reduce it with trainer.strategy.reduce)."
            )
        self._reset_window()

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._pending = self.count_fn(batch)

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        # counted only when the micro-batch has a backward: a training_step that returns None adds no gradient
        self._terms = self._terms + self._pending
        self._pending = 0

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not isinstance(self._terms, int) or self._terms:
            rank_zero_warn(
                "TokenMeanLoss: a checkpoint was saved inside a gradient-accumulation window (e.g. val_check_interval "
                "is not a multiple of accumulate_grad_batches); the gradients accumulated so far are not in it, so a "
                "resume from it is not exact. Save checkpoints at optimizer-step boundaries."
            )

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        terms = torch.as_tensor(self._terms, device=pl_module.device, dtype=torch.long)
        total = trainer.strategy.reduce(terms, reduce_op="sum")
        # stays on the device: no host sync per step
        factor = (trainer.accumulate_grad_batches * trainer.world_size) / total.clamp(min=1).double()
        scale_gradients((p for group in optimizer.param_groups for p in group["params"]), factor)
        self._last_step_terms = total
        self._terms = 0
        self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):  # Lightning's copy of the returned loss, divided by accumulate_grad_batches
            self._loss_sum = self._loss_sum + loss.detach().float() * trainer.accumulate_grad_batches
        if not self._stepped:
            return
        loss_sum = torch.as_tensor(self._loss_sum, device=pl_module.device, dtype=torch.float32)
        loss_sum = trainer.strategy.reduce(loss_sum, reduce_op="sum")
        # a tensor, not a float: no host sync here (Lightning reads logged values at its logging interval)
        self._last_step_loss = loss_sum / self._last_step_terms.clamp(min=1)
        if self.log_name:
            pl_module.log(
                self.log_name, self._last_step_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=1
            )
        self._loss_sum = 0.0
        self._stepped = False
