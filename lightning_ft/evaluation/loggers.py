"""Send evaluation figures to whichever loggers a Trainer has, and keep a PNG of each in the run folder.

* ``TensorBoardLogger``: ``SummaryWriter.add_figure`` (the IMAGES tab);
* ``WandbLogger``: ``log_image`` (a ``wandb.Image`` of the figure);
* every run, whatever its loggers (``CSVLogger``, MLflow, none): ``<run folder>/figures/<name>.png``, where
  ``lightning-ft report`` finds them. The run folder is ``lightning_ft.report.report_dir``.

Only global rank 0 logs and writes; call :func:`figure_folder` on every rank (``trainer.log_dir`` broadcasts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_ft.evaluation.figures import save_png
from lightning_ft.report import report_dir

FIGURES = "figures"


def figure_file_name(name: str) -> str:
    """``test/roc`` -> ``test_roc.png``."""
    return name.replace("/", "_") + ".png"


def figure_folder(trainer: Any) -> Path | None:
    """``<run folder>/figures`` (``None`` without a run folder). Call on every rank."""
    folder = report_dir(trainer)
    return None if folder is None else folder / FIGURES


def log_figures(trainer: Any, figures: dict[str, Figure], folder: Path | None, step: int | None = None) -> list[Path]:
    """Log each ``name -> figure`` to the Trainer's TensorBoard / W&B loggers and write it as a PNG into ``folder``
    (from :func:`figure_folder`). Returns the PNG paths. Does nothing off global rank 0."""
    if not trainer.is_global_zero or not figures:
        return []
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, fig in figures.items():
                logger.experiment.add_figure(name, fig, global_step=step, close=False)
            logger.experiment.flush()
        elif isinstance(logger, WandbLogger):
            for name, fig in figures.items():
                logger.log_image(key=name, images=[fig], step=step)
    written = []
    if folder is not None:
        for name, fig in figures.items():
            path = folder / figure_file_name(name)
            save_png(fig, path)
            written.append(path)
    return written
