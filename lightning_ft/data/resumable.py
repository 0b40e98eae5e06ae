"""``ResumableDataLoader``: a training loader that resumes mid-epoch with exactly the batches an unbroken run sees.

Lightning saves the ``state_dict()`` of every training loader that has one in each checkpoint (``fit_loop``'s
``combined_loader`` entry) and hands it back to ``load_state_dict()`` when a fit resumes inside an epoch, before the
epoch's iterator is made. The order of an epoch depends only on the sampler's seed and epoch
(``lightning_ft.data.samplers``), so the state is small: the epoch and how many batches of it were trained on. The
next iterator sets the sampler's epoch and skips those batches (they are collated and dropped: cheap next to a
training step), so every rank continues where it stopped, under DDP too (each rank skips its own share).

How many batches were trained on is the Trainer's count (``consumed_batches``, the data module passes one that reads
the fit loop's batch index), not the iterator's: workers and Lightning's prefetching fetch batches ahead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader
from typing_extensions import override


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict`` / ``load_state_dict`` for mid-epoch resumption.

    Args:
        consumed_batches: ``() -> int | None``, the batches of the current epoch already trained on (read at save
            time), ``None`` when the epoch is over (the next one starts afresh).
        Other arguments are ``DataLoader``'s. The sampler must give the same order for the same epoch every time.
    """

    def __init__(self, *args: Any, consumed_batches: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed_batches = consumed_batches
        self._resume: dict[str, int] | None = None

    def _samplers(self) -> list[Any]:
        found = [self.sampler, getattr(self.batch_sampler, "sampler", None)]
        return [s for s in found if s is not None and hasattr(s, "set_epoch")]

    def state_dict(self) -> dict[str, int]:
        epochs = [getattr(s, "epoch", 0) for s in self._samplers()]
        consumed = self.consumed_batches() if self.consumed_batches else 0
        return {
            "epoch": int(epochs[0]) if epochs else 0,
            "batches": len(self) if consumed is None else int(consumed),
            "num_examples": len(self.dataset),
            "batch_size": int(self.batch_size or 0),
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        now = {"num_examples": len(self.dataset), "batch_size": int(self.batch_size or 0)}
        if changed := [
            f"{k}: {state_dict[k]} -> {v}" for k, v in now.items() if k in state_dict and state_dict[k] != v
        ]:
            raise ValueError(
                f"the checkpoint was written with other training data ({', '.join(changed)}), so it cannot resume "
                "with the batches the run would have seen. Resume with the same data, max_train_examples, packing "
                "and batch_size, or start a new fit from the checkpoint's weights."
            )
        self._resume = {"epoch": state_dict.get("epoch", 0), "batches": state_dict.get("batches", 0)}

    @override
    def __iter__(self):
        resume, self._resume = self._resume, None
        if resume is None or resume["batches"] >= len(self):  # at an epoch's end the next one starts afresh
            return super().__iter__()
        for sampler in self._samplers():  # Lightning sets the epoch only after this first iterator is made
            sampler.set_epoch(resume["epoch"])
        iterator = super().__iter__()
        for _ in range(resume["batches"]):
            next(iterator)
        return iterator
