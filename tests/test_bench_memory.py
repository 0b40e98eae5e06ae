"""``benchmarks/bench_memory.py --quick``: the pipeline (a single-process row in its own process, a 2-process torchrun
row with sharded loading, the table, the JSON and the PNG) on a tiny model. Checks the plumbing, not the numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_mode_writes_a_table_json_and_png(tmp_path):
    only = ["--only", "fp32", "sharded", "--skip", "checkpointing"]
    cmd = [sys.executable, "benchmarks/bench_memory.py", "--quick", *only, "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    payload = json.loads((tmp_path / "memory_quick.json").read_text())
    rows = {r["name"]: r for r in payload["results"]}
    assert set(rows) == {"LoRA, fp32 base", "FSDP2 LoRA, 2 ranks, sharded loading"}
    single, sharded = rows["LoRA, fp32 base"], rows["FSDP2 LoRA, 2 ranks, sharded loading"]
    assert single["processes"] == 1 and sharded["processes"] == 2
    for r in rows.values():
        assert r["peak_rss_mb"] >= r["train_peak_rss_mb"] > 0 and r["step_s"] > 0
        assert 0 < r["before_fit_rss_mb"] < r["peak_rss_mb"]
        assert r["trainable_params"] == single["trainable_params"]  # the same LoRA on the same model
    for rank in payload["runs"]["FSDP2 LoRA, 2 ranks, sharded loading"][0]:  # each rank read at most its half of
        report = rank["load_report"]  # the sharded weights (frozen ones outside the blocks are whole on every rank)
        whole = report["elements_whole"]
        assert report["elements_read"] - whole <= (report["elements_full"] - whole) / 2 + 1e3
    assert len(payload["runs"]["FSDP2 LoRA, 2 ranks, sharded loading"][0]) == 2  # one record per rank
    table = (tmp_path / "memory_quick.md").read_text()
    assert "| FSDP2 LoRA, 2 ranks, sharded loading | 2 |" in table and "--quick" in table
    assert (tmp_path / "memory_quick.png").read_bytes()[:4] == b"\x89PNG"
