"""What a run's evaluation leaves behind, written from global rank 0 at the end of a stage.

* ``metrics_<stage>.json`` (the final numbers) and ``generations_<stage>.jsonl`` (every rank's generated answers,
  gathered) in the run folder, and the ROC / PR / reliability figures to the loggers and ``figures/``;
* the confusion matrix of a classifier: logged, ``confusion_matrix_<stage>.md`` and ``.png``;
* the loss curve: to the loggers, ``figures/loss_curve.png`` and ``loss_history.json``.

Call each function on every rank: the run folder comes from ``trainer.log_dir``, which broadcasts, and the answers
are gathered from every process.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_ft import metrics as M
from lightning_ft.evaluation import figures
from lightning_ft.evaluation.evaluator import Evaluator
from lightning_ft.evaluation.loggers import figure_folder, log_figures
from lightning_ft.io import save_with_atomic, write_json_atomic, write_jsonl_atomic, write_text_atomic
from lightning_ft.report import report_dir


def write_stage_results(
    trainer: Any,
    evaluator: Evaluator,
    stage: str,
    values: dict[str, Tensor],
    labels: list[str] | None,
    with_figures: bool,
) -> None:
    """``metrics_<stage>.json``, ``generations_<stage>.jsonl`` and, ``with_figures``, the evaluator's figures (also
    to the loggers); the evaluator's ``stage`` state is emptied on every rank."""
    records = evaluator.take_records(stage)
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, records)
        records = [dict(r, rank=rank) for rank, part in enumerate(gathered) for r in part]
    folder = figure_folder(trainer)
    if not trainer.is_global_zero or trainer.sanity_checking:
        evaluator.forget(stage)
        return
    if with_figures:
        names = getattr(getattr(trainer, "datamodule", None), "choice_names", {}).get(stage)
        log_figures(trainer, evaluator.figures(stage, labels, names), folder)
    evaluator.forget(stage)
    if folder is None:
        return
    metrics = {k: float(v) for k, v in values.items()}
    metrics.update(step=trainer.global_step, epoch=trainer.current_epoch)
    write_json_atomic(folder.parent / f"metrics_{stage}.json", metrics)
    if records:
        write_jsonl_atomic(folder.parent / f"generations_{stage}.jsonl", records)


def write_confusion(trainer: Any, matrix: Tensor, labels: list[str], stage: str) -> None:
    """A classifier's (C, C) confusion matrix (rows: true label): printed, logged, written as Markdown and PNG."""
    out = report_dir(trainer)
    if not trainer.is_global_zero:
        return
    table = M.confusion_table(matrix, labels)
    rank_zero_info(f"{stage} confusion matrix:\n{table}")
    fig = figures.confusion_figure(matrix, labels, f"{stage} confusion matrix")
    log_figures(trainer, {f"{stage}/confusion_matrix": fig}, None if out is None else out / "figures")
    if out is None:
        rank_zero_info(
            f"lightning-ft: confusion_matrix_{stage}.md/.png not written: the Trainer has no logger and no "
            "default_root_dir, and reports are not written to the current directory; set either to keep them"
        )
        return
    write_text_atomic(out / f"confusion_matrix_{stage}.md", table + "\n")
    save_with_atomic(out / f"confusion_matrix_{stage}.png", lambda p: fig.savefig(p, format="png", dpi=100))


def write_loss_history(trainer: Any, history: dict[str, list[tuple[int, float]]]) -> None:
    """``stage -> [(step, loss), ...]`` curves: to the loggers, ``figures/loss_curve.png`` and ``loss_history.json``."""
    folder = figure_folder(trainer)
    if not trainer.is_global_zero or not any(history.values()):
        return
    series = {f"{k}/loss": v for k, v in history.items()}
    log_figures(trainer, {"loss_curve": figures.loss_figure(series, "loss")}, folder)
    if folder is not None:
        write_json_atomic(folder.parent / "loss_history.json", {k: [list(p) for p in v] for k, v in series.items()})
