"""``lightning-ft report``: two tiny runs side by side in one Markdown file."""

from __future__ import annotations

import json

import lightning as L
import pytest
from helpers import sentiment_rows, tiny_bert
from lightning.pytorch.loggers import CSVLogger

from lightning_ft import FineTuneDataModule, SFTModule
from lightning_ft.cli import main
from lightning_ft.evaluation.run_report import config_differences, load_run, move_test_outputs, write_run_report

LABELS = ["negative", "positive"]


def tiny_run(tmp_path, tokenizer, name: str, learning_rate: float, steps: int):
    dm = FineTuneDataModule(
        tokenizer, task="classification", train=sentiment_rows(24), val=sentiment_rows(8), test=sentiment_rows(10),
        labels=LABELS, max_length=32, batch_size=8,
    )  # fmt: skip
    model = tiny_bert(len(tokenizer))
    module = SFTModule(model=model, task="classification", labels=LABELS, learning_rate=learning_rate)
    t = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=CSVLogger(tmp_path, name=name), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )  # fmt: skip
    t.fit(module, dm)
    (logged,) = t.test(module, dm)
    return tmp_path / name / "version_0", logged


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("runs")
    slow = tiny_run(root, tokenizer, "slow", 1e-5, 3)
    fast = tiny_run(root, tokenizer, "fast", 3e-3, 5)
    return root, [slow, fast]


def test_report_puts_runs_side_by_side(two_runs, tmp_path):
    root, runs = two_runs
    out = write_run_report([runs[0][0], runs[1][0]], tmp_path / "out" / "report.md", names=["slow", "fast"])
    text = out.read_text()
    lines = text.splitlines()
    # configuration differences: the learning rate, not the shared label set; folders are not differences
    (lr_row,) = [line for line in lines if line.startswith("| learning_rate |")]
    assert lr_row == "| learning_rate | 1e-05 | 0.003 |"
    assert not any(line.startswith("| labels |") for line in lines)
    # final metrics: each run's logged test numbers, in its column
    (acc_row,) = [line for line in lines if line.startswith("| test/acc |")]
    assert acc_row == f"| test/acc | {runs[0][1]['test/acc']:.4f} | {runs[1][1]['test/acc']:.4f} |"
    (auroc_row,) = [line for line in lines if line.startswith("| test/auroc |")]
    assert f"{runs[1][1]['test/auroc']:.4f}" in auroc_row
    # pictures: links relative to the report that resolve, a column per run
    (roc_row,) = [line for line in lines if line.startswith("| test_roc |")]
    links = [part.split("](")[1].rstrip(")") for part in roc_row.split(" | ")[1:]]
    assert len(links) == 2 and all((out.parent / link.rstrip(" |").rstrip(")")).exists() for link in links)
    assert (out.parent / "report_loss.png").exists() and "![loss curves](report_loss.png)" in text


def test_report_command_line(two_runs, tmp_path, capsys):
    root, runs = two_runs
    out = tmp_path / "r.md"
    main(["report", str(runs[0][0]), str(runs[1][0]), "--out", str(out)])
    text = out.read_text()
    assert "| metric | slow/version_0 | fast/version_0 |" in text  # default names tell the runs apart
    assert "wrote" in capsys.readouterr().out


def test_report_reads_metrics_csv_without_json(two_runs, tmp_path):
    root, runs = two_runs
    run = load_run(runs[1][0])
    assert run.metrics["test/acc"] == pytest.approx(runs[1][1]["test/acc"])
    assert json.loads((runs[1][0] / "metrics_test.json").read_text())["step"] == 5
    assert config_differences([run, load_run(runs[0][0])]) == ["learning_rate"]


def test_report_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as err:
        main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.md")])
    assert err.value.code == 2
    assert "is it a run folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_run_report([tmp_path / "missing"], tmp_path / "r.md")


def test_move_test_outputs_keeps_a_zero_shot_test_apart(tmp_path):
    run = tmp_path / "version_0"
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "test_roc.png").write_bytes(b"png")
    (run / "metrics_test.json").write_text(json.dumps({"test/acc": 0.5}))
    (run / "hparams.yaml").write_text("learning_rate: 0.001\n")
    zero = move_test_outputs(run, run / "zero_shot")
    assert not (run / "metrics_test.json").exists() and not (run / "figures").exists()
    assert (run / "hparams.yaml").exists() and (zero / "hparams.yaml").exists()  # copied, not moved
    summary = load_run(zero, "zero-shot")
    assert summary.metrics == {"test/acc": 0.5} and set(summary.figures) == {"test_roc"}


def test_report_never_replaces_a_file_it_did_not_write(two_runs, tmp_path):
    root, runs = two_runs
    notes, plot = tmp_path / "notes.md", tmp_path / "notes_loss.png"
    notes.write_text("my own notes\n")
    with pytest.raises(ValueError, match="report"):
        write_run_report([runs[0][0]], notes)
    assert notes.read_text() == "my own notes\n" and not plot.exists()
    plot.write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    out = tmp_path / "fresh" / "notes.md"
    write_run_report([runs[0][0]], out)
    write_run_report([runs[0][0]], out)  # its own report (and plot): replaced without asking
    (out.parent / "notes_loss.png").write_bytes(plot.read_bytes())  # a plot that is not ours beside it
    with pytest.raises(ValueError, match="loss plot"):
        write_run_report([runs[0][0]], out)
    write_run_report([runs[0][0]], notes, overwrite=True)
    assert notes.read_text().startswith("<!-- lightning-ft report -->")
