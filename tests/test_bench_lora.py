"""``benchmarks/bench_lora.py --quick``: the paired protocol end to end on a tiny model (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_paired_ratios(tmp_path):
    cmd = [sys.executable, "benchmarks/bench_lora.py", "--quick", "--pairs", "3", "--warmup", "1"]
    cmd += ["--inference-pairs", "2", "--no-compile", "--rss-steps", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "lora.json").read_text())
    assert (tmp_path / "lora.png").stat().st_size > 0 and (tmp_path / "lora.md").read_text().count("|") > 20
    steps = result["train_step_s"]
    assert len(steps) == 8 and all(len(v) == 3 for v in steps.values())  # every configuration, every round
    ratios = {r["ratio"]: r for r in result["train_ratios"]}
    fused_vs_peft = ratios["r=16 all-linear: fused / peft"]
    per_round = [a / b for a, b in zip(steps["ours r=16 all-linear (fused)"], steps["peft r=16 all-linear"])]
    assert fused_vs_peft["per_round"] == per_round and fused_vs_peft["q1"] <= fused_vs_peft["median"]
    # 3 rounds are below the protocol's 20: the target is reported but not judged
    assert fused_vs_peft["target"] == 0.90 and fused_vs_peft["met"] is None and fused_vs_peft["pairs"] == 3
    assert "not judged (3 < 20 pairs)" in (tmp_path / "lora.md").read_text()
    assert {r["ratio"] for r in result["inference_ratios"]} == {"unmerged adapter / base", "merged / base"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["peak_rss_mb"].values())
    assert len(result["loadavg_before"]) == 3
