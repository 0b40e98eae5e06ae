"""benchmarks/bench_quality.py: the summary arithmetic, and the whole pipeline in ``--quick`` mode (not its numbers)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require_mr, require_packaged

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def fake(method: str, seed: int, acc: float) -> tuple[dict, dict]:
    cfg = {"name": f"{method} {seed}", "model": "minilm", "method": method, "label": method, "lr": 1e-3, "steps": 5}
    cfg.update(batch_size=8, seed=seed)
    run = {"acc": acc, "f1": acc - 0.01, "fit_s": 10.0 + seed, "final_train_loss": 0.5, "step_s": [1.0, 2.0 + seed]}
    return cfg, run | {"trainable_params": 100, "test_examples": 32}


def test_summary_pairs_seeds_with_full_fine_tuning() -> None:
    from bench_quality import summarise

    accs = {"full": [0.80, 0.70, 0.75], "lora": [0.79, 0.72, 0.70]}
    configs, runs = [], {}
    for seed in range(3):  # seeds outermost, as the benchmark orders them
        for method, values in accs.items():
            cfg, run = fake(method, seed, values[seed])
            configs.append(cfg)
            runs[cfg["name"]] = [run]
    rows = {r["method"]: r for r in summarise(configs, runs)["minilm"]}
    lora = rows["lora"]
    assert lora["acc"] == accs["lora"] and lora["seeds"] == [0, 1, 2]
    assert lora["acc_mean"] == pytest.approx(statistics.mean(accs["lora"]))
    assert lora["acc_sd"] == pytest.approx(statistics.stdev(accs["lora"]))
    diffs = [100 * (a - b) for a, b in zip(accs["lora"], accs["full"])]  # paired by seed, not mean minus mean
    assert lora["vs_full_points_mean"] == pytest.approx(statistics.mean(diffs))
    assert lora["vs_full_points_sd"] == pytest.approx(statistics.stdev(diffs))
    assert rows["full"]["vs_full_points_mean"] == 0.0
    assert lora["step_s_median"] == 1.5 and lora["fit_s_median"] == 11.0  # steps pooled over seeds: 1,1,1,2,3,4


def test_one_seed_has_no_spread() -> None:
    from bench_quality import summarise

    cfg, run = fake("lora", 0, 0.6)
    row = summarise([cfg], {cfg["name"]: [run]})["minilm"][0]
    assert row["acc_sd"] is None and row["vs_full_points_mean"] is None  # no full fine-tuning run to pair with


def test_equal_time_gives_each_method_full_fine_tunings_fit_time() -> None:
    from bench_quality import equal_time_configs, summarise

    configs, runs = [], {}
    for seed in range(3):
        for method, fit_s, step_s in (("full", 20.0 + seed, [2.0]), ("lora", 7.0, [1.0, 1.0]), ("sparse", 9.5, [0.5])):
            cfg, run = fake(method, seed, 0.7)
            configs.append(cfg)
            runs[cfg["name"]] = [run | {"fit_s": fit_s, "step_s": step_s}]
    timed = {c["method"]: c for c in equal_time_configs(configs, summarise(configs, runs)) if c["seed"] == 0}
    assert set(timed) == {"lora", "sparse"}  # full fine-tuning is the budget, not re-run
    # budget 21 s (median of 20, 21, 22); lora: fixed part 7 - 5 x 1 = 2 s -> (21 - 2) / 1 = 19 steps;
    # sparse: fixed part 9.5 - 5 x 0.5 = 7 s (a costly selection) -> (21 - 7) / 0.5 = 28 steps
    assert timed["lora"]["steps"] == 19 and timed["sparse"]["steps"] == 28
    assert timed["lora"]["budget_s"] == 21.0 and timed["lora"]["name"].endswith("(equal time)")


@pytest.mark.integration
@pytest.mark.slow
def test_quick_mode_runs_the_pipeline(tmp_path: Path) -> None:
    require_packaged("all-minilm-l6-v2")
    require_mr()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--quick", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    payload = json.loads((tmp_path / "quality.json").read_text())
    rows = payload["summary"]["minilm"]
    assert [r["method"] for r in rows] == ["full", "lora", "sparse", "compressed-lora", "nf4-lora"]
    for r in rows:
        assert r["seeds"] == [0] and r["steps"] == 3 and r["test_examples"] == 32
        assert 0.0 <= r["acc_mean"] <= 1.0 and 0.0 <= r["f1_mean"] <= 1.0
    trainable = {r["method"]: r["trainable_params"] for r in rows}
    assert trainable["lora"] < trainable["full"] / 20  # adapters (+ head) only
    assert trainable["nf4-lora"] == trainable["lora"]  # the same adapters, over a quantised base
    assert (tmp_path / "quality.md").read_text().count("| MiniLM-L6 |") == 5
    assert "global gradient norm clipped to 1;" in (tmp_path / "quality.md").read_text()  # the default, recorded
    assert (tmp_path / "quality.png").stat().st_size > 0


@pytest.mark.integration
@pytest.mark.slow
def test_quick_mode_at_equal_time(tmp_path: Path) -> None:
    require_packaged("all-minilm-l6-v2")
    require_mr()
    script = str(ROOT / "benchmarks" / "bench_quality.py")
    cmd = [sys.executable, script, "--quick", "--methods", "full", "lora", "--parts", "methods", "time"]
    out = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    payload = json.loads((tmp_path / "quality.time.json").read_text())
    rows = {r["method"]: r for r in payload["summary"]["minilm"]}
    assert set(rows) == {"full", "lora"} and rows["full"]["steps"] == 3 and rows["lora"]["steps"] >= 1
    assert "equal wall time" in (tmp_path / "quality.time.md").read_text()


def test_method_labels_name_the_sparse_settings() -> None:
    from bench_quality import METHODS, method_label, parse_args

    labels = {m: method_label(m, parse_args([])) for m in METHODS}
    assert labels["lora"] == "LoRA r=8 all-linear" and labels["sparse"] == "sparse delta gradient (r=32 equiv.)"
    args = parse_args(["--sparse-rank", "16", "--sparse-allocation", "global", "--sparse-criterion", "magnitude"])
    assert method_label("sparse", args) == "sparse delta magnitude (r=16 equiv., global)"
    args = parse_args(["--sparse-set", "reselect_every=10", "drop_schedule=linear"])
    settings = "(reselect_every 10, drop_schedule linear)"
    assert method_label("sparse", args) == f"sparse delta gradient (r=32 equiv.) {settings}"


def test_configs_carry_clipping_and_sparse_settings() -> None:
    from bench_quality import method_configs, parse_args

    configs = method_configs(parse_args(["--methods", "full", "sparse", "--sparse-set", "reselect_every=10"]))
    by_method = {c["method"]: c for c in configs if c["seed"] == 0}
    assert by_method["sparse"]["sparse_settings"] == {"reselect_every": 10}  # a literal: an int, not "10"
    assert by_method["full"]["sparse_settings"] == {}
    assert {c["gradient_clip_val"] for c in configs} == {1.0}  # the default, for every method
    assert by_method["sparse"]["rank"] == 32 and by_method["sparse"]["lr"] == 1e-3
    both = method_configs(parse_args(["--models", "minilm", "smollm2", "--methods", "sparse", "--seeds", "0"]))
    assert {c["model"]: c["lr"] for c in both} == {"minilm": 1e-3, "smollm2": 3e-4}  # each model's own rate
    given = method_configs(parse_args(["--models", "minilm", "smollm2", "--methods", "sparse", "--sparse-lr", "2e-3"]))
    assert {c["lr"] for c in given} == {2e-3}  # a given rate applies to both
    unclipped = method_configs(parse_args(["--methods", "full", "--clip", "0"]))
    assert {c["gradient_clip_val"] for c in unclipped} == {None}


def test_clipping_and_sparse_settings_reach_the_trainer_and_the_module(tmp_path: Path) -> None:
    from bench_sparse import MODELS, make_module, trainer_for

    assert trainer_for(1, str(tmp_path), [], 1.0).gradient_clip_val == 1.0
    assert trainer_for(1, str(tmp_path), []).gradient_clip_val is None
    cfg = {"method": "sparse", "lr": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.1, "rank": 32, "seed": 0}
    cfg |= {"criterion": "gradient", "calibration_batches": 2, "sparse_settings": {"reselect_every": 10}}
    module = make_module(MODELS["minilm"], cfg)
    assert module.config.reselect_every == 10 and module.config.lora_equivalent_rank == 32


@pytest.mark.integration
@pytest.mark.slow
def test_quick_curve_validates_averaged_adapters_beside_the_raw(tmp_path: Path) -> None:
    """Decay 0 averages nothing (the raw adapters); a decay of almost 1 keeps the first step's adapters: what is
    validated is the averaged weights, swapped in."""
    require_packaged("smollm2-135m-instruct")
    require_mr()
    script = str(ROOT / "benchmarks" / "bench_quality.py")
    cmd = [sys.executable, script, "--quick", "--parts", "curve", "--curve-ema", "0", "0.999999"]
    out = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (curve,) = json.loads((tmp_path / "quality.curve.json").read_text())["curves"].values()
    first, second = curve["points"]
    assert (first["step"], second["step"]) == (1, 2) and second["val_nll"] != first["val_nll"]
    for p in (first, second):
        assert p["ema_val_nll"]["0.0"] == pytest.approx(p["val_nll"], abs=1e-6)
    assert second["ema_val_nll"]["0.999999"] == pytest.approx(first["val_nll"], abs=1e-4)
    assert "(decay 0.999999)" in (tmp_path / "quality.curve.md").read_text()
