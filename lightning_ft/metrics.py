"""torchmetrics collections shared by every module, so every method logs the same names.

Names (with the stage prefix ``train/``, ``val/`` or ``test/``):
  * causal LM: ``loss``, ``ppl`` (perplexity over unmasked tokens), ``acc`` (next-token accuracy);
  * classification: ``loss``, ``acc``, ``f1`` (macro), ``precision_<label>``, ``recall_<label>``, and a confusion
    matrix (not logged as a scalar; see ``confusion_table`` and ``save_confusion_png``);
  * multiple-choice scoring of a causal LM (rows with ``choices``): the classification metrics under ``choice_``.

Threshold-free metrics (AUROC, average precision, calibration error), ROC / PR / reliability figures and the
generation metrics of free-text answers live in ``lightning_ft.evaluation`` (``Evaluator``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from typing_extensions import override


class Perplexity(Metric):
    """exp(summed token NLL / token count), fed with already computed sums (no second softmax over the vocabulary)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @override
    def update(self, nll_sum: Tensor, num_tokens: Tensor) -> None:
        self.nll += nll_sum.detach().double()
        self.tokens += num_tokens.detach().long()

    @override
    def compute(self) -> Tensor:
        return torch.exp(self.nll / self.tokens.clamp(min=1)).float()


class TokenAccuracy(Metric):
    """Share of unmasked next-token targets that the argmax predicts."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @override
    def update(self, num_correct: Tensor, num_tokens: Tensor) -> None:
        self.correct += num_correct.detach().long()
        self.total += num_tokens.detach().long()

    @override
    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class CausalLMMetrics(torch.nn.Module):
    """``loss`` (token-weighted mean NLL), ``ppl`` and ``acc`` for one stage."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.loss = MeanMetric()
        self.ppl = Perplexity()
        self.acc = TokenAccuracy()

    def update(self, nll_sum: Tensor, num_tokens: Tensor, num_correct: Tensor) -> None:
        """``nll_sum``: summed NLL over unmasked tokens; ``num_tokens``: their count; ``num_correct``: argmax hits."""
        self.loss.update(nll_sum / num_tokens.clamp(min=1), weight=num_tokens)
        self.ppl.update(nll_sum, num_tokens)
        self.acc.update(num_correct, num_tokens)

    def compute(self) -> dict[str, Tensor]:
        return {
            f"{self.prefix}loss": self.loss.compute(),
            f"{self.prefix}ppl": self.ppl.compute(),
            f"{self.prefix}acc": self.acc.compute(),
        }

    def reset(self) -> None:
        for m in (self.loss, self.ppl, self.acc):
            m.reset()


def classification_metrics(labels: list[str], prefix: str) -> MetricCollection:
    """Accuracy, macro-F1 and per-class precision / recall for ``len(labels)`` classes, as ``prefix``-named metrics.

    Update with ``preds`` (N,) or logits (N, C) and integer ``target`` (N,). The confusion matrix lives apart
    (``confusion_matrix``) because it is a table, not a scalar to log.
    """
    n = len(labels)
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(n, average="micro"),
            "f1": MulticlassF1Score(n, average="macro"),
            "precision": MulticlassPrecision(n, average=None),
            "recall": MulticlassRecall(n, average=None),
        },
        prefix=prefix,
    )


def confusion_matrix(labels: list[str]) -> MulticlassConfusionMatrix:
    return MulticlassConfusionMatrix(len(labels))


def flatten_per_class(values: dict[str, Tensor], labels: list[str]) -> dict[str, Tensor]:
    """Turn vector-valued metrics (per-class precision / recall) into one scalar per label: ``val/recall_positive``."""
    out = {}
    for name, value in values.items():
        if value.ndim == 0:
            out[name] = value
        else:
            out.update({f"{name}_{label}": v for label, v in zip(labels, value)})
    return out


def confusion_table(matrix: Tensor, labels: list[str]) -> str:
    """A Markdown table: rows are true labels, columns predicted labels."""
    head = "| true \\ pred | " + " | ".join(labels) + " |"
    sep = "|---" * (len(labels) + 1) + "|"
    rows = [f"| {label} | " + " | ".join(str(int(v)) for v in row) + " |" for label, row in zip(labels, matrix)]
    return "\n".join([head, sep, *rows])


def save_confusion_png(matrix: Tensor, labels: list[str], path: str | os.PathLike, title: str = "") -> None:
    """Draw the confusion matrix with counts in each cell and write it atomically to ``path``."""
    from lightning_ft.evaluation.figures import confusion_figure
    from lightning_ft.io import save_with_atomic

    fig = confusion_figure(matrix, labels, title)
    save_with_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
