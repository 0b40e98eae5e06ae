"""Threshold-free classifier metrics from class probabilities: AUROC, average precision, ROC / PR curves, calibration.

Pure torch (plus ``torchmetrics.functional``), no Lightning. Every function takes

* ``probs``: (N, C) float class probabilities (rows sum to 1: a softmax over logits or over choice log-likelihoods);
* ``target``: (N,) long true class ids in ``[0, C)``.

Two classes are the *binary* case: class 1 is the positive class and one curve / one number is reported for it.
More classes are one-vs-rest: a curve per class, and the macro mean of the per-class AUROC / average precision, over
the classes that have both positive and negative rows in ``target`` (a class that never occurs has no ROC curve:
torchmetrics would count its AUROC as 0 and pull the macro mean down).

Calibration uses the top-class confidence ``max(probs, -1)`` and whether the top class is right, in ``n_bins`` equal
bins of confidence ``[0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1]``. The expected calibration error (ECE) is the
count-weighted mean of ``|accuracy - mean confidence|`` over the bins (torchmetrics' ``calibration_error`` with
``norm="l1"`` and the same bins).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
)
from torchmetrics.utilities import dim_zero_cat
from typing_extensions import override

DEFAULT_BINS = 15


class ProbabilityStore(Metric):
    """Keeps every (probs, target) pair of a stage, gathered across ranks at ``compute`` (``"cat"`` states).

    Holding the probabilities rather than binned counts keeps the curves exact; an evaluation set of 100k rows and
    10 classes is 4 MB.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("probs", [], dist_reduce_fx="cat")
        self.add_state("target", [], dist_reduce_fx="cat")

    @property
    def num_classes(self) -> int:
        """C of the stored rows (0 before the first update)."""
        return self.probs[0].shape[1] if isinstance(self.probs, list) and self.probs else 0

    @override
    def update(self, probs: Tensor, target: Tensor) -> None:
        """``probs`` (N, C), ``target`` (N,); N may be 0."""
        self.probs.append(probs.detach().float().to(self.device))
        self.target.append(target.detach().long().to(self.device))

    @override
    def compute(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.probs), dim_zero_cat(self.target)


@dataclass
class Curve:
    """One curve: ``x`` and ``y`` (1-D, CPU), its summary number (AUROC or average precision) and the class id
    it is the one-vs-rest curve of (1, the positive class, for a binary task)."""

    x: Tensor
    y: Tensor
    area: float
    index: int = 1


def _classes(probs: Tensor, target: Tensor) -> int:
    if probs.ndim != 2 or probs.shape[0] != target.shape[0]:
        raise ValueError(f"probs must be (N, C) and target (N,), got {tuple(probs.shape)} and {tuple(target.shape)}")
    return probs.shape[1]


def has_both_outcomes(target: Tensor, num_classes: int) -> bool:
    """AUROC / average precision need positives and negatives: at least two classes among ``target``."""
    return target.numel() > 0 and int(target.unique().numel()) >= 2 and num_classes >= 2


def ranked_classes(target: Tensor, num_classes: int) -> list[int]:
    """The classes with one-vs-rest positives and negatives among ``target``: those a ROC / PR curve exists for."""
    present = torch.bincount(target.long(), minlength=num_classes)
    return [c for c in range(num_classes) if 0 < int(present[c]) < target.numel()]


def auroc(probs: Tensor, target: Tensor) -> Tensor:
    """Area under the ROC curve: of class 1 when C == 2, else the macro mean over the one-vs-rest curves of the
    classes present in ``target``."""
    c = _classes(probs, target)
    if c == 2:
        return binary_auroc(probs[:, 1], target)
    return _one_vs_rest_mean(probs, target, binary_auroc)


def average_precision(probs: Tensor, target: Tensor) -> Tensor:
    """Average precision (area under the step PR curve): of class 1 when C == 2, else the one-vs-rest macro mean
    over the classes present in ``target``."""
    c = _classes(probs, target)
    if c == 2:
        return binary_average_precision(probs[:, 1], target)
    return _one_vs_rest_mean(probs, target, binary_average_precision)


def _one_vs_rest_mean(probs: Tensor, target: Tensor, metric: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    classes = ranked_classes(target, probs.shape[1])
    if not classes:
        raise ValueError("AUROC / average precision need at least two classes among the targets")
    return torch.stack([metric(probs[:, k], (target == k).long()) for k in classes]).mean()


def roc_curves(probs: Tensor, target: Tensor) -> list[Curve]:
    """ROC curves (x = false-positive rate, y = true-positive rate): one for class 1 when C == 2, else one per class
    present in ``target`` (``Curve.index`` names it)."""
    c = _classes(probs, target)
    if c == 2:
        fpr, tpr, _ = binary_roc(probs[:, 1], target)
        return [Curve(fpr.cpu(), tpr.cpu(), float(binary_auroc(probs[:, 1], target)), 1)]
    out = []
    for k in ranked_classes(target, c):
        scores, positive = probs[:, k], (target == k).long()
        fpr, tpr, _ = binary_roc(scores, positive)
        out.append(Curve(fpr.cpu(), tpr.cpu(), float(binary_auroc(scores, positive)), k))
    return out


def pr_curves(probs: Tensor, target: Tensor) -> list[Curve]:
    """Precision-recall curves (x = recall, y = precision), as :func:`roc_curves`; area = average precision."""
    c = _classes(probs, target)
    if c == 2:
        precision, recall, _ = binary_precision_recall_curve(probs[:, 1], target)
        return [Curve(recall.cpu(), precision.cpu(), float(binary_average_precision(probs[:, 1], target)), 1)]
    out = []
    for k in ranked_classes(target, c):
        scores, positive = probs[:, k], (target == k).long()
        precision, recall, _ = binary_precision_recall_curve(scores, positive)
        out.append(Curve(recall.cpu(), precision.cpu(), float(binary_average_precision(scores, positive)), k))
    return out


@dataclass
class Reliability:
    """Per confidence bin (``n_bins``,): mean confidence, accuracy and row count (empty bins: 0, 0, 0)."""

    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @property
    def ece(self) -> float:
        """Expected calibration error: ``sum(count * |accuracy - confidence|) / sum(count)``."""
        total = self.count.sum().clamp(min=1)
        return float((self.count * (self.accuracy - self.confidence).abs()).sum() / total)


def reliability_bins(probs: Tensor, target: Tensor, n_bins: int = DEFAULT_BINS) -> Reliability:
    """Bin the rows by top-class confidence (``n_bins`` equal bins over [0, 1], the last one closed)."""
    _classes(probs, target)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    confidence, predicted = probs.float().max(-1)
    correct = (predicted == target).float()
    index = (confidence * n_bins).long().clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, device=probs.device).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(n_bins, device=probs.device).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, device=probs.device).index_add_(0, index, correct)
    safe = count.clamp(min=1)
    return Reliability((conf_sum / safe).cpu(), (acc_sum / safe).cpu(), count.cpu())


def expected_calibration_error(probs: Tensor, target: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """ECE of the top-class confidence in ``n_bins`` equal bins (see the module docstring)."""
    return reliability_bins(probs, target, n_bins).ece


def summary(probs: Tensor, target: Tensor, prefix: str = "", n_bins: int = DEFAULT_BINS) -> dict[str, Tensor]:
    """``{prefix}auroc``, ``{prefix}ap`` (only when ``target`` holds at least two classes) and ``{prefix}ece``."""
    out: dict[str, Tensor] = {}
    if target.numel() == 0:
        return out
    c = _classes(probs, target)
    if has_both_outcomes(target, c):
        out[f"{prefix}auroc"] = auroc(probs, target).float()
        out[f"{prefix}ap"] = average_precision(probs, target).float()
    out[f"{prefix}ece"] = torch.tensor(expected_calibration_error(probs, target, n_bins))
    return out
