"""The `lightning-ft` command: every recipe fits for 2 steps with command-line overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_mr, require_packaged

from lightning_ft.cli import make_cli

ROOT = Path(__file__).resolve().parent.parent


def small_run(recipe: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "recipes" / recipe),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.max_train_examples", "64", "--data.max_eval_examples", "16", *extra,
    ]  # fmt: skip


@pytest.mark.integration
def test_fit_minilm_recipe_from_the_console_script(tmp_path):
    require_packaged("all-minilm-l6-v2")
    mr = require_mr()
    args = small_run("minilm_mr_sft.yaml", tmp_path, "--data.batch_size", "8", "--model.init_args.learning_rate", "3e-5")
    for split in ("train", "val", "test"):
        args += [f"--data.{split}", f"{mr}/classification/{split}.jsonl"]
    exe = Path(sys.executable).parent / "lightning-ft"
    out = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val/acc" in metrics and "train/loss" in metrics
    config = (tmp_path / "logs" / "version_0" / "config.yaml").read_text()
    assert "learning_rate: 3.0e-05" in config and "task: classification" in config
    assert list(tmp_path.glob("logs/version_0/checkpoints/*.ckpt"))


@pytest.mark.integration
def test_fit_smollm2_recipe_with_overrides(tmp_path):
    require_packaged("smollm2-135m-instruct")
    mr = require_mr()
    args = small_run(
        "smollm2_mr_sft.yaml", tmp_path, "--data.batch_size", "2", "--data.eval_batch_size", "2",
        "--data.max_length", "128", "--trainer.precision", "32-true",
    )  # fmt: skip
    for split in ("train", "val", "test"):
        args += [f"--data.{split}", f"{mr}/instruction/{split}.jsonl"]
    cli = make_cli(args)
    assert cli.trainer.global_step == 2
    assert cli.model.task == "causal_lm"  # linked from data.task: instruction
    assert {"val/loss", "val/ppl", "val/choice_acc"} <= set(cli.trainer.callback_metrics)


def test_links_model_name_task_and_labels(tmp_path, tokenizer):
    """The recipe states the model and the data task once; the CLI fills in the rest."""
    from conftest import sentiment_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(8)))
    cli = make_cli(
        ["--model", "lightning_ft.SFTModule", "--model.init_args.model_name_or_path", "some-org/some-model",
         "--data.task", "classification", "--data.train", str(rows), "--data.labels", "[negative, positive]",
         "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    assert cli.datamodule._tokenizer == "some-org/some-model"
    assert cli.model.task == "classification"
    assert cli.model.labels == ["negative", "positive"]


def test_unknown_task_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_cli(["--model", "lightning_ft.SFTModule", "--model.init_args.model_name_or_path", "a/b",
                  "--data.task", "regression"], run=False)  # fmt: skip
    assert "regression" in capsys.readouterr().err


@pytest.mark.integration
def test_wandb_logger_offline(tmp_path, monkeypatch):
    require_packaged("all-minilm-l6-v2")
    mr = require_mr()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = small_run("minilm_mr_sft.yaml", tmp_path, "--data.batch_size", "8")
    args += ["--config", str(ROOT / "recipes" / "wandb_logger.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    for split in ("train", "val", "test"):
        args += [f"--data.{split}", f"{mr}/classification/{split}.jsonl"]
    cli = make_cli(args)
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    assert list(tmp_path.rglob("offline-run-*"))


@pytest.mark.integration
def test_lora_main_job_on_smollm2(tmp_path):
    """Command 1 in small: zero-shot test, LoRA fit, merged test, adapter + merged model written, reload check."""
    require_packaged("smollm2-135m-instruct")
    mr = require_mr()
    sys.path.insert(0, str(ROOT / "recipes"))
    from mr_main_job import main

    args = small_run(
        "smollm2_mr_lora.yaml", tmp_path, "--data.batch_size", "2", "--data.eval_batch_size", "4",
        "--data.max_length", "128", "--model.init_args.r", "4",
        "--model.init_args.adapter_dir", str(tmp_path / "adapter"),
        "--model.init_args.merged_dir", str(tmp_path / "merged"),
    )[1:]  # no subcommand: the script runs fit and test itself
    for split in ("train", "val", "test"):
        args += [f"--data.{split}", f"{mr}/instruction/{split}.jsonl"]
    summary = main(args + ["--reload-check-examples", "8"])
    assert 0.0 <= summary["zero_shot_test_accuracy"] <= 1.0 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["steps"] == 2
    assert summary["reload_check"]["examples"] == 8 and summary["reload_check"]["same_predictions"]
    assert summary["reload_check"]["max_abs_score_difference"] < 1e-3
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged" / "tokenizer_config.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    ckpt = next(tmp_path.glob("logs/version_0/checkpoints/*.ckpt"))
    assert ckpt.stat().st_size < 50 * 2**20  # adapter-only: a full SmolLM2 checkpoint is over 500 MB
