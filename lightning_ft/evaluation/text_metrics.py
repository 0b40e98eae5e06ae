"""Scores of generated answers against reference answers: exact match, token F1, ROUGE-L, BLEU and chrF.

* ``exact_match`` and ``token_f1`` follow the SQuAD evaluation script: both texts are lower-cased, punctuation and
  the articles a / an / the are removed and whitespace is collapsed; token F1 is the F1 of the multiset overlap of
  the remaining words (two empty texts score 1).
* ``rouge_l``: the F-measure (beta = 1) of the longest common subsequence of words, with ROUGE's tokenisation
  (lower-case, every run of characters other than a-z / 0-9 is a separator). Implemented here because
  ``torchmetrics.text.ROUGEScore`` needs ``nltk``.
* ``bleu``: corpus BLEU-4 (``torchmetrics.text.BLEUScore``, no smoothing: answers shorter than four words score 0
  unless a longer answer supplies the 4-grams); ``chrf``: corpus chrF (``torchmetrics.text.CHRFScore``, character
  6-grams, beta = 2), kinder to short answers.

All scores are in [0, 1]. ``GenerationMetrics`` accumulates them over batches (and ranks, as torchmetrics states).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.text import BLEUScore, CHRFScore

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_ROUGE_SPLIT = re.compile(r"[^a-z0-9]+")

NAMES = ("exact_match", "token_f1", "rouge_l", "bleu", "chrf")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised words' multiset overlap (SQuAD)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_tokens(text: str) -> list[str]:
    return [t for t in _ROUGE_SPLIT.split(text.lower()) if t]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: ``2 * P * R / (P + R)`` with ``P = LCS / len(prediction)``, ``R = LCS / len(reference)``."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


class GenerationMetrics(nn.Module):
    """Mean exact match / token F1 / ROUGE-L over rows, corpus BLEU-4 and chrF, for one stage.

    ``compute(prefix)`` returns ``{prefix}exact_match``, ``{prefix}token_f1``, ``{prefix}rouge_l``, ``{prefix}bleu``
    and ``{prefix}chrf`` as 0-dim tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.exact_match = MeanMetric()
        self.token_f1 = MeanMetric()
        self.rouge_l = MeanMetric()
        self.bleu = BLEUScore(n_gram=4)
        self.chrf = CHRFScore()

    def update(self, predictions: list[str], references: list[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return
        for name, fn in (("exact_match", exact_match), ("token_f1", token_f1), ("rouge_l", rouge_l)):
            getattr(self, name).update(torch.tensor([fn(p, r) for p, r in zip(predictions, references)]))
        self.bleu.update(predictions, [[r] for r in references])
        self.chrf.update(predictions, [[r] for r in references])

    def update_empty(self) -> None:
        """Count an update of no rows (a rank with nothing to score still joins the gathers at ``compute``)."""
        for name in ("exact_match", "token_f1", "rouge_l"):
            getattr(self, name).update(torch.zeros(0))
        self.bleu.update([], [])
        self.chrf.update([], [])

    @property
    def update_count(self) -> int:
        return self.exact_match.update_count

    def compute(self, prefix: str = "") -> dict[str, Tensor]:
        return {f"{prefix}{name}": getattr(self, name).compute().float() for name in NAMES}

    def reset(self) -> None:
        for name in NAMES:
            getattr(self, name).reset()
