"""Run reports: loss curves from a ``CSVLogger`` file, and a summary of a fit + test run."""

from __future__ import annotations

import csv
import math
import os
import struct
from collections import Counter
from pathlib import Path

from lightning_ft.io import check_output, user_path

PNG_SOFTWARE = "lightning-ft report"  # the PNG ``Software`` text of every plot written here: marks them as ours


def report_dir(trainer) -> Path | None:
    """The run folder for a Trainer's reports: its first logger's folder, else its ``default_root_dir``.

    ``None`` when that is just the current directory, which is what Lightning falls back to with no logger and no
    ``default_root_dir`` (``Trainer(logger=False)``): a report is not dropped there unasked. Call on every rank
    (``trainer.log_dir`` broadcasts).
    """
    folder = trainer.log_dir or trainer.default_root_dir
    if folder is None or Path(folder).expanduser().resolve() == Path.cwd().resolve():
        return None
    return Path(folder).expanduser()


def read_metric_series(metrics_csv: str | os.PathLike, name: str) -> list[tuple[int, float]]:
    """``(step, value)`` pairs of one metric from a Lightning ``CSVLogger`` ``metrics.csv``."""
    series = []
    with open(user_path(metrics_csv), newline="") as f:
        for row in csv.DictReader(f):
            value = row.get(name, "")
            if value not in ("", None):
                series.append((int(row["step"]), float(value)))
    return series


def png_text(path: str | os.PathLike) -> dict[str, str]:
    """The ``tEXt`` entries of a PNG file (read up to the image data); {} for anything else."""
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return out
            while True:
                length, kind = struct.unpack(">I4s", f.read(8))
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return out
                data = f.read(length)
                f.read(4)  # CRC
                if kind == b"tEXt" and b"\0" in data:
                    key, _, value = data.partition(b"\0")
                    out[key.decode("latin-1")] = value.decode("latin-1")
    except (OSError, struct.error):
        return out


def is_own_plot(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PNG this module wrote."""
    return png_text(path).get("Software") == PNG_SOFTWARE


def plot_loss_curve(
    metrics_csv: str | os.PathLike, out_png: str | os.PathLike, title: str = "", overwrite: bool = False
) -> None:
    """Plot ``train/loss`` (and a running mean) and ``val/loss`` against the step, written atomically as PNG.

    ``out_png`` (``~`` expanded) is checked first (``lightning_ft.io.check_output``): an existing file is replaced
    only when it is a plot written here, unless ``overwrite=True``.
    """
    out_png = check_output(out_png, "out_png", is_own=is_own_plot, folder=False, overwrite=overwrite)
    from lightning_ft.evaluation.figures import loss_figure, save_png

    series = {name: read_metric_series(metrics_csv, name) for name in ("train/loss", "val/loss")}
    save_png(loss_figure(series, title), out_png)


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def majority_baseline(labels: list[int]) -> float:
    """Accuracy of always predicting the most frequent label."""
    if not labels:
        return math.nan
    return Counter(labels).most_common(1)[0][1] / len(labels)


def find_metrics_csv(log_dir: str | os.PathLike | None) -> Path | None:
    if log_dir is None:
        return None
    path = user_path(log_dir) / "metrics.csv"
    return path if path.exists() else None
