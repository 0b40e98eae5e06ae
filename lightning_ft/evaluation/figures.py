"""Matplotlib figures of an evaluation: ROC and precision-recall curves, reliability diagram, confusion matrix,
loss curves. Each function returns a ``matplotlib.figure.Figure`` (not registered with pyplot, so nothing leaks
between calls); :func:`save_png` writes one atomically, marked as ours in the PNG's ``Software`` text."""

from __future__ import annotations

import os
from collections.abc import Sequence

from matplotlib.figure import Figure
from torch import Tensor

from lightning_ft.evaluation.curves import Curve, Reliability
from lightning_ft.report import PNG_SOFTWARE, running_mean


def _curve_names(curves: Sequence[Curve], labels: Sequence[str]) -> list[str]:
    """Each curve's class name (``Curve.index`` into ``labels``; binary: the positive class, ``labels[1]``)."""
    return [labels[c.index] if c.index < len(labels) else f"class {c.index}" for c in curves]


def roc_figure(curves: Sequence[Curve], labels: Sequence[str], title: str = "") -> Figure:
    """ROC curves (one per class, or one for the positive class of a binary task) with their AUROC."""
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    for curve, name in zip(curves, _curve_names(curves, labels)):
        ax.plot(curve.x.numpy(), curve.y.numpy(), label=f"{name} (AUROC {curve.area:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="chance")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def pr_figure(
    curves: Sequence[Curve], labels: Sequence[str], prevalence: Sequence[float] = (), title: str = ""
) -> Figure:
    """Precision-recall curves with their average precision; ``prevalence`` (each class's share of the rows, indexed
    by class id) draws the precision of a random classifier."""
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    names = _curve_names(curves, labels)
    for i, (curve, name) in enumerate(zip(curves, names)):
        label = f"{name} (AP {curve.area:.3f})"
        (line,) = ax.plot(curve.x.numpy(), curve.y.numpy(), drawstyle="steps-post", label=label)
        if curve.index < len(prevalence):
            chance = "chance (class share)" if i == 0 else None
            ax.axhline(prevalence[curve.index], linestyle=":", linewidth=0.8, color=line.get_color(), label=chance)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    return fig


def reliability_figure(bins: Reliability, title: str = "") -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the row count per bin below."""
    n = bins.count.numel()
    centers = [(i + 0.5) / n for i in range(n)]
    filled = bins.count > 0
    fig = Figure(figsize=(5, 5.5))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    xs = [c for c, f in zip(centers, filled.tolist()) if f]
    ax.bar(xs, bins.accuracy[filled].numpy(), width=1 / n, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(bins.confidence[filled].numpy(), bins.accuracy[filled].numpy(), "o", color="C1", label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02), title=f"{title} (ECE {bins.ece:.3f})".strip())
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    hist.bar(centers, bins.count.numpy(), width=1 / n, edgecolor="black", color="grey")
    hist.set(xlabel="confidence of the predicted class", ylabel="rows")
    fig.tight_layout()
    return fig


def confusion_figure(matrix: Tensor, labels: Sequence[str], title: str = "") -> Figure:
    """The confusion matrix (rows: true, columns: predicted) with the count in each cell."""
    m = matrix.cpu().numpy()
    k = len(labels)
    fig = Figure(figsize=(1.2 * k + 2.5, 1.2 * k + 2))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            color = "white" if m[i, j] > m.max() / 2 else "black"
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", color=color)
    fig.tight_layout()
    return fig


def loss_figure(series: dict[str, Sequence[tuple[int, float]]], title: str = "") -> Figure:
    """Loss against the optimizer step: one line per named series of ``(step, value)`` pairs. Series named
    ``*train*`` with many points are drawn faintly with a running mean on top."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, points in series.items():
        if not points:
            continue
        steps, values = zip(*points)
        if "train" in name and len(values) > 20:
            (line,) = ax.plot(steps, values, alpha=0.3)
            window = max(1, len(values) // 20)
            ax.plot(steps, running_mean(values, window), color=line.get_color(), label=f"{name} (mean of {window})")
        else:
            ax.plot(steps, values, "o-" if len(values) < 50 else "-", label=name)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write ``fig`` as a PNG atomically (creating the folder), marked with ``Software: lightning-ft report``."""
    from pathlib import Path

    from lightning_ft.io import save_with_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_with_atomic(path, lambda p: fig.savefig(p, format="png", dpi=dpi, metadata={"Software": PNG_SOFTWARE}))
