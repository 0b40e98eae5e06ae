"""The evaluator over two CPU processes (gloo): a rank whose shard filled a store with nothing still joins the
gathers, and every rank gets the metrics of all rows (the oracle: one process over the concatenated rows)."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ft.evaluation import curves as C
from lightning_ft.evaluation.evaluator import Evaluator
from lightning_ft.evaluation.text_metrics import GenerationMetrics

# rank 0 holds every scored choice row and every generated answer; rank 1 only rows whose choice target is unknown
CHOICE_SCORES = torch.tensor([[-0.1, -2.0], [-1.5, -0.3], [-0.2, -0.9], [-2.2, -0.4], [-0.7, -0.8], [-0.3, -1.1]])
CHOICE_TARGET = torch.tensor([0, 1, 1, 1, 0, 0])
PREDICTIONS = ["location: city", "human: person", "number: count"]
REFERENCES = ["location: city", "human: group", "number: date"]


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        ev = Evaluator(calibration_bins=5)
        if rank == 0:
            ev.update_choices("test", CHOICE_SCORES, CHOICE_TARGET)
            ev.update_generation("test", ["p"] * 3, PREDICTIONS, REFERENCES)
        # rank 1: its rows' choice targets are unknown (-100, as FineTuneModule skips them) and it generated nothing
        out = ev.compute("test")
        figures = ev.figures("test", None, ["a", "b"])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"metrics": {k: float(v) for k, v in out.items()}, "figures": sorted(figures)}, f)
    finally:
        dist.destroy_process_group()


def test_a_rank_with_nothing_to_score_joins_and_gets_the_global_metrics(tmp_path):
    mp.start_processes(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    oracle = C.summary(CHOICE_SCORES.softmax(-1), CHOICE_TARGET, "test/choice_", n_bins=5)
    gen = GenerationMetrics()
    gen.update(PREDICTIONS, REFERENCES)
    oracle.update(gen.compute("test/gen_"))
    for r in results:
        assert r["metrics"].keys() == oracle.keys()
        for k, v in oracle.items():
            assert r["metrics"][k] == pytest.approx(float(v), abs=1e-6), k
    assert {"test/choice_roc", "test/choice_pr", "test/choice_reliability"} <= set(results[1]["figures"])
