"""recipes/mr_main_job.py helpers: the zero-shot subset and its confidence interval (the whole job: test_cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from mr_main_job import first_rows_loader, pop_option, wilson_interval  # noqa: E402


def test_wilson_interval_matches_known_values() -> None:
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(1.0, 10)  # unlike the normal approximation, not a zero-width interval
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    lo, hi = wilson_interval(0.58, 256)
    assert lo < 0.58 < hi and hi - lo == pytest.approx(0.12, abs=0.005)  # the zero-shot subset's width
    assert wilson_interval(0.3, 0) == (0.0, 1.0)


def test_first_rows_loader_keeps_the_first_rows_longest_first() -> None:
    rows = [{"input_ids": list(range(n)), "row": i} for i, n in enumerate([3, 9, 1, 7, 5, 8])]

    def collate(batch):
        return [b["row"] for b in batch]

    loader = DataLoader(rows, batch_size=2, sampler=[5, 4, 3, 2, 1, 0], collate_fn=collate)
    subset = first_rows_loader(loader, 4)  # rows 0..3 (file order), not the loader's own order
    assert list(subset) == [[1, 3], [0, 2]]
    assert subset.batch_size == 2 and subset.collate_fn is collate
    assert sum(len(b) for b in first_rows_loader(loader, 100)) == 6


def test_pop_option() -> None:
    assert pop_option(["--a", "1", "--zero-shot-examples", "64", "--b"], "--zero-shot-examples", 256) == (
        ["--a", "1", "--b"],
        64,
    )
    assert pop_option(["--a"], "--zero-shot-examples", 256) == (["--a"], 256)
