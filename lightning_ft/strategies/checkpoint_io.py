"""Clear errors for damaged checkpoints under any strategy: ``CheckedCheckpointIO`` checks a checkpoint
(``lightning_ft.file_checks.check_checkpoint``) before its inner ``CheckpointIO`` loads it.

Lightning resolves ``Trainer.fit(ckpt_path=...)`` (and ``validate`` / ``test`` / ``predict``) only after the
``setup`` hooks ran, and loads it through ``strategy.load_checkpoint`` -> ``strategy.checkpoint_io.load_checkpoint``.
So a ``setup`` hook calls :func:`check_checkpoints` (the public ``strategy.checkpoint_io`` setter) and the check
runs before ``torch.load`` whatever the strategy. The lightning-ft strategies also check in their own
``load_checkpoint`` (sharded FSDP2 folders bypass ``checkpoint_io``).
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins import CheckpointIO
from typing_extensions import override

from lightning_ft.file_checks import check_checkpoint


class CheckedCheckpointIO(CheckpointIO):
    """Wraps a ``CheckpointIO``: checks a checkpoint before loading it; saving and removing are unchanged."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    @override
    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        check_checkpoint(path)
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()

    def __getattr__(self, name: str) -> Any:  # anything else a strategy or plugin asks of the inner one
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def check_checkpoints(trainer: Any) -> None:
    """Make ``trainer`` check every checkpoint it loads (idempotent); call it from a ``setup`` hook."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or isinstance(strategy.checkpoint_io, CheckedCheckpointIO):
        return
    strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)
