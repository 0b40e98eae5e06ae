"""Length-grouped sampling: batches of similar lengths waste less compute on padding."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler
from typing_extensions import override


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(num_items)`` that depends only on ``seed`` and the epoch (``set_epoch``).

    Unlike ``shuffle=True`` (which draws from the global RNG), a resumed run sees the same order as an unbroken one.
    """

    def __init__(self, num_items: int, seed: int = 0) -> None:
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    @override
    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.num_items, generator=g).tolist()


class LengthGroupedSampler(EpochShuffleSampler):
    """Shuffle indices, cut them into mega-batches of ``batch_size * mega_batch_mult``, sort each by length.

    Consecutive runs of ``batch_size`` indices then have similar lengths while the epoch stays shuffled. The order
    depends only on ``seed`` and the epoch (``set_epoch``), so every rank and every run sees the same order. Under
    DDP, Lightning wraps this sampler and gives each rank its share.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50) -> None:
        super().__init__(len(lengths), seed)
        self.lengths = lengths
        self.mega = max(1, batch_size * mega_batch_mult)

    @override
    def __iter__(self) -> Iterator[int]:
        perm = list(super().__iter__())
        for start in range(0, len(perm), self.mega):
            chunk = perm[start : start + self.mega]
            yield from sorted(chunk, key=lambda i: -self.lengths[i])
