"""The `lightning-ft` command: every recipe fits for 2 steps with command-line overrides."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require_mr, require_packaged, sentiment_rows, tiny_bert

from lightning_ft.cli import main, make_cli

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")  # args given in-process


def small_run(recipe: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "recipes" / recipe),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--data.max_train_examples",
        "64",
        "--data.max_eval_examples",
        "16",
        *extra,
    ]


@pytest.mark.integration
def test_fit_minilm_recipe_from_the_console_script(tmp_path):
    require_packaged("all-minilm-l6-v2")
    mr = require_mr()
    args = small_run(
        "minilm_mr_sft.yaml", tmp_path, "--data.batch_size", "8", "--model.init_args.learning_rate", "3e-5"
    )
    for split in ("train", "val", "test"):
        args += [f"--data.{split}", f"{mr}/classification/{split}.jsonl"]
    exe = Path(sys.executable).parent / "lightning-ft"
    out = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val/acc" in metrics and "train/loss" in metrics
    config = (tmp_path / "logs" / "version_0" / "config.yaml").read_text()
    assert "learning_rate: 3.0e-05" in config and "format: classification" in config
    assert list(tmp_path.glob("logs/version_0/checkpoints/*.ckpt"))


@pytest.mark.integration
def test_fit_smollm2_recipe_with_overrides(tmp_path):
    require_packaged("smollm2-135m-instruct")
    mr = require_mr()
    args = small_run(
        "smollm2_mr_sft.yaml",
        tmp_path,
        "--data.batch_size",
        "2",
        "--data.eval_batch_size",
        "2",
        "--data.max_length",
        "128",
        "--trainer.precision",
        "32-true",
    )
    for split in ("train", "val", "test"):
        args += [f"--data.{split}", f"{mr}/instruction/{split}.jsonl"]
    cli = make_cli(args)
    assert cli.trainer.global_step == 2
    assert cli.model.task == "causal_lm"  # linked from data.task: instruction
    assert {"val/loss", "val/ppl", "val/choice_acc"} <= set(cli.trainer.callback_metrics)


def test_links_model_name_task_and_labels(tmp_path, tokenizer):
    """The recipe states the model and the data task once; the CLI fills in the rest."""
    from helpers import sentiment_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(8)))
    cli = make_cli(
        [
            "--model",
            "lightning_ft.SFTModule",
            "--model.init_args.model_name_or_path",
            "some-org/some-model",
            "--data.task",
            "classification",
            "--data.train",
            str(rows),
            "--data.labels",
            "[negative, positive]",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert cli.datamodule._tokenizer == "some-org/some-model"
    assert cli.model.task == "classification"
    assert cli.model.labels == ["negative", "positive"]


def test_unknown_task_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_cli(
            [
                "--model",
                "lightning_ft.SFTModule",
                "--model.init_args.model_name_or_path",
                "a/b",
                "--data.task",
                "regression",
            ],
            run=False,
        )
    assert "regression" in capsys.readouterr().err


@pytest.mark.integration
def test_wandb_logger_offline(tmp_path, monkeypatch):
    require_packaged("all-minilm-l6-v2")
    mr = require_mr()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = small_run("minilm_mr_sft.yaml", tmp_path, "--data.batch_size", "8")
    args += [
        "--config",
        str(ROOT / "recipes" / "wandb_logger.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
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
        "smollm2_mr_lora.yaml",
        tmp_path,
        "--data.batch_size",
        "2",
        "--data.eval_batch_size",
        "4",
        "--data.max_length",
        "128",
        "--model.init_args.r",
        "4",
        "--model.init_args.adapter_dir",
        str(tmp_path / "adapter"),
        "--model.init_args.merged_dir",
        str(tmp_path / "merged"),
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
    # the report: base model and tuned model side by side, each with its own test figures
    run = tmp_path / "logs" / "version_0"
    report = (run / "report.md").read_text()
    assert summary["report"] == str(run / "report.md")
    assert "zero-shot (first" in report and "tuned (all" in report
    zero_shot = json.loads((run / "zero_shot" / "metrics_test.json").read_text())
    tuned = json.loads((run / "metrics_test.json").read_text())
    assert zero_shot["test/choice_acc"] == pytest.approx(summary["zero_shot_test_accuracy"])
    assert tuned["test/choice_acc"] == pytest.approx(summary["test_accuracy"])
    for key in ("test/choice_acc", "test/choice_auroc", "test/choice_ece"):
        assert f"| {key} | {zero_shot[key]:.4f} | {tuned[key]:.4f} |" in report
    for name in ("test_choice_roc.png", "test_choice_reliability.png"):
        assert (run / "zero_shot" / "figures" / name).exists() and (run / "figures" / name).exists()
        assert f"zero_shot/figures/{name}" in report and f"](figures/{name})" in report


# ---- labels, help, options, errors (in-process, a tiny local classifier) ---------------------------------------------
def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, tokenizer) -> str:
    """A folder with the tiny BPE tokenizer and a tiny random BERT classifier, loadable by name like a real model."""
    folder = tmp_path_factory.mktemp("tiny-classifier")
    tokenizer.save_pretrained(folder)
    tiny_bert(len(tokenizer)).save_pretrained(folder)
    return str(folder)


def classification_args(tmp_path: Path, model: str, *extra: str) -> list[str]:
    """``fit`` of a classifier on 8 rows for one step, quiet; no ``--data.labels``."""
    rows = write_rows(tmp_path / "rows.jsonl", sentiment_rows(8))
    return [
        "fit",
        "--model",
        "lightning_ft.SFTModule",
        "--model.init_args.model_name_or_path",
        model,
        "--data.task",
        "classification",
        "--data.train",
        rows,
        "--data.max_length",
        "32",
        "--data.batch_size",
        "4",
        "--trainer.max_steps",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        *extra,
    ]


def test_classification_labels_are_inferred_when_not_given(tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", sentiment_rows(8))
    cli = make_cli(
        [
            "--model",
            "lightning_ft.SFTModule",
            "--model.init_args.model_name_or_path",
            "some-org/some-model",
            "--data.task",
            "classification",
            "--data.train",
            rows,
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert cli.model.labels == cli.datamodule.labels == ["negative", "positive"]
    assert cli.model.hparams.labels == ["negative", "positive"]  # what a checkpoint records


def test_fit_with_inferred_labels_and_a_logger(tmp_path, tiny_classifier):
    """Module and data hparams are merged for the logger (Lightning refuses one key with two values)."""
    args = classification_args(tmp_path, tiny_classifier, "--data.val", str(tmp_path / "rows.jsonl"))
    args += [
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.limit_val_batches",
        "1",
    ]
    main(args)
    hparams = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert re.search(r"labels:\n- negative\n- positive", hparams)


def test_fit_help_lists_the_module_arguments_and_no_optimizer(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    shared, lora, sparse = (
        out.split(marker, 1)[1] for marker in ("Shared by every module:", "LoRAModule (", "SparseModule (")
    )
    assert "--model.init_args.learning_rate" in shared and "--model.init_args.warmup_ratio" in shared
    assert (
        "--model.init_args.r R" in lora
        and "--model.init_args.use_dora" in lora
        and "--model.init_args.adapter_dir" in lora
    )
    assert "--model.init_args.density" in sparse and "--model.init_args.criterion" in sparse
    assert "--optimizer" not in out and "--lr_scheduler" not in out


INVALID = [
    ("batch-size-0", ["--data.batch_size", "0"], r"batch_size must be a whole number of at least 1, got 0"),
    ("batch-size-not-an-int", ["--data.batch_size", "abc"], r"data\.batch_size: expected int, got abc\."),
    (
        "unknown-scheduler",
        ["--model.init_args.scheduler", "foo"],
        r"model\.init_args\.scheduler of lightning_ft\.SFTModule: expected one of 'linear', 'cosine', 'constant', "
        r"got foo",
    ),
    (
        "argument-of-another-module",
        ["--model.init_args.r", "4"],
        r"model\.init_args of lightning_ft\.SFTModule: Option 'r'",
    ),
    ("duplicate-labels", ["--data.labels", "[a, a]"], r"`labels` \['a', 'a'\] name \['a'\] more than once"),
    (
        "optimizer",
        ["--optimizer", "SGD"],
        r"unrecognized arguments: --optimizer SGD\. The modules build their own AdamW",
    ),
    ("missing-train-file", ["--data.train", "missing.jsonl"], r"train: file missing\.jsonl does not exist"),
    ("no-train-no-labels", ["--data.train", "null"], r"there is no `data\.train`: give the ordered label set"),
    (
        "mixed-labels",
        ["--data.train", "MIXED"],
        r"train row 1: label 'negative' is a string but row 0 has the int label 1",
    ),
    (
        "mixed-labels-given-labels",
        ["--data.train", "MIXED", "--data.labels", "[negative, positive]"],
        r"train row 1: label 'negative' is a string but row 0 has the int label 1",
    ),
]


@pytest.mark.parametrize("extra, pattern", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_values_print_one_paragraph(tmp_path, capsys, tiny_classifier, extra, pattern):
    mixed = write_rows(tmp_path / "mixed.jsonl", [{"text": "good", "label": 1}, {"text": "dull", "label": "negative"}])
    extra = [mixed if a == "MIXED" else a for a in extra]
    with pytest.raises(SystemExit) as exit_:
        main(classification_args(tmp_path, tiny_classifier, *extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith("lightning-ft fit: error: ") and re.search(pattern, line), line
