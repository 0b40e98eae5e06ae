"""Samplers: seeded epoch shuffles, length-grouped batches (less padding), and evaluation shards across ranks in
which every row counts exactly once."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler
from typing_extensions import override

from lightning_ft.data.collate import IGNORE_INDEX


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


def even_shards(order: list[int], world_size: int, rank: int) -> tuple[list[int], list[int]]:
    """Split an evaluation ``order`` of ``n`` rows across ``world_size`` ranks in equal shards of ``ceil(n / W)``.

    Position ``p`` of the order goes to rank ``p % W`` (as ``DistributedSampler`` without shuffling). The short ranks
    are topped up with *fillers*: returned are ``rank``'s indices, where an index ``n + j`` means filler ``j``, and
    the rows the fillers copy (``fillers[j]``, taken from the end of the order: with longest-first evaluation, the
    shortest rows, which add no padding to the last batch). A filler must be scored as nothing (see
    :func:`filler_row`): every real row then counts exactly once.
    """
    n = len(order)
    total = -(-n // world_size) * world_size
    fillers = [order[n - 1 - j % n] for j in range(total - n)] if n else []
    padded = list(order) + list(range(n, total))
    return padded[rank:total:world_size], fillers


def filler_row(example: dict[str, Any]) -> dict[str, Any]:
    """A copy of an evaluation row that only fills a rank's shard: the same inputs (the same forward passes), every
    target ignored (-100: no loss term, no metric update, no choice target), and ``filler: True`` so that its
    generated answer is not scored."""
    row = dict(example, filler=True)
    if "labels" in row:
        row["labels"] = [IGNORE_INDEX] * len(row["labels"])
    for key in ("label", "choice_label"):
        if key in row:
            row[key] = IGNORE_INDEX
    return row


class ShardSampler(DistributedSampler):
    """A rank's fixed list of indices, as a ``DistributedSampler`` so that Lightning does not re-split it."""

    def __init__(self, dataset: Sized, indices: list[int], num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = indices
        self.num_samples = len(indices)

    @override
    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    @override
    def __len__(self) -> int:
        return len(self.indices)
