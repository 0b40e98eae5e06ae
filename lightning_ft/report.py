"""Run reports: loss curves from a ``CSVLogger`` file, and a summary of a fit + test run."""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from pathlib import Path

from lightning_ft.io import save_with_atomic


def read_metric_series(metrics_csv: str | os.PathLike, name: str) -> list[tuple[int, float]]:
    """``(step, value)`` pairs of one metric from a Lightning ``CSVLogger`` ``metrics.csv``."""
    series = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            value = row.get(name, "")
            if value not in ("", None):
                series.append((int(row["step"]), float(value)))
    return series


def plot_loss_curve(metrics_csv: str | os.PathLike, out_png: str | os.PathLike, title: str = "") -> None:
    """Plot ``train/loss`` (and a running mean) and ``val/loss`` against the step, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_metric_series(metrics_csv, "train/loss")
    val = read_metric_series(metrics_csv, "val/loss")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, alpha=0.35, label="train/loss")
        window = max(1, len(values) // 20)
        ax.plot(steps, running_mean(values, window), label=f"train/loss (mean of {window})")
    if val:
        ax.plot(*zip(*val), "o-", label="val/loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_with_atomic(out_png, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


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
    path = Path(log_dir) / "metrics.csv"
    return path if path.exists() else None
