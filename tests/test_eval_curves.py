"""AUROC, average precision, ROC / PR curves and calibration against hand-computed values and independent oracles."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_ft.evaluation import curves as C

# five rows of a binary task; P(class 1) per row, true classes. Ranked by score: P N P P N
SCORES = torch.tensor([0.9, 0.75, 0.65, 0.45, 0.3])
TARGET = torch.tensor([1, 0, 1, 1, 0])
PROBS = torch.stack([1 - SCORES, SCORES], 1)


def test_binary_auroc_and_ap_by_hand():
    # positive-negative pairs ranked right: 0.9 beats both negatives, 0.65 and 0.45 beat 0.3 only -> 4 of 6
    assert C.auroc(PROBS, TARGET).item() == pytest.approx(4 / 6)
    # precision at each positive in rank order: 1/1, 2/3, 3/4
    assert C.average_precision(PROBS, TARGET).item() == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_binary_curves_by_hand():
    (roc,) = C.roc_curves(PROBS, TARGET)
    # thresholds walk down the scores: (FPR, TPR) after each row, from (0, 0)
    assert roc.x.tolist() == pytest.approx([0, 0, 0.5, 0.5, 0.5, 1])
    assert roc.y.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    assert roc.area == pytest.approx(4 / 6)
    (pr,) = C.pr_curves(PROBS, TARGET)
    assert pr.area == pytest.approx(29 / 36)
    assert max(pr.y.tolist()) == 1.0 and pr.x.tolist()[0] == pytest.approx(1.0)


def test_reliability_bins_and_ece_by_hand():
    # top-class confidence: .9 .75 .65 .55 .7; predicted 1 1 1 0 0; right: yes no yes no yes
    bins = C.reliability_bins(PROBS, TARGET, n_bins=5)
    assert bins.count.tolist() == [0, 0, 1, 3, 1]
    assert bins.confidence[2:].tolist() == pytest.approx([0.55, 0.7, 0.9])
    assert bins.accuracy[2:].tolist() == pytest.approx([0.0, 2 / 3, 1.0])
    # (1 * .55 + 3 * |.7 - 2/3| + 1 * .1) / 5
    assert bins.ece == pytest.approx(0.15)
    assert C.expected_calibration_error(PROBS, TARGET, 5) == pytest.approx(0.15)


@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_matches_torchmetrics_on_random_multiclass(n_bins):
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(300, 4, generator=g).mul(2).softmax(-1)
    target = torch.randint(0, 4, (300,), generator=g)
    oracle = multiclass_calibration_error(probs, target, num_classes=4, n_bins=n_bins, norm="l1")
    assert C.expected_calibration_error(probs, target, n_bins) == pytest.approx(float(oracle), abs=1e-6)


def test_multiclass_macro_auroc_and_ap_are_one_vs_rest_means():
    g = torch.Generator().manual_seed(1)
    target = torch.arange(3).repeat(20)
    logits = torch.randn(60, 3, generator=g)
    logits[torch.arange(60), target] += 1.0  # informative but imperfect
    probs = logits.softmax(-1)
    per_class = []
    for c in range(3):
        pos, neg = probs[target == c, c], probs[target != c, c]
        per_class.append((pos[:, None] > neg[None, :]).float().mean().item())  # no ties among random floats
    assert C.auroc(probs, target).item() == pytest.approx(sum(per_class) / 3, abs=1e-6)
    curves = C.roc_curves(probs, target)
    assert [c.area for c in curves] == pytest.approx(per_class, abs=1e-6)
    assert len(C.pr_curves(probs, target)) == 3


def test_summary_skips_ranking_metrics_with_one_class_present():
    probs, target = PROBS[:1], TARGET[:1]
    out = C.summary(probs, target, "test/")
    assert set(out) == {"test/ece"}
    out = C.summary(PROBS, TARGET, "test/", n_bins=5)
    assert set(out) == {"test/auroc", "test/ap", "test/ece"}
    assert not any(math.isnan(float(v)) for v in out.values())


def test_probability_store_concatenates_batches():
    store = C.ProbabilityStore()
    store.update(PROBS[:2], TARGET[:2])
    store.update(PROBS[2:], TARGET[2:])
    probs, target = store.compute()
    assert torch.equal(probs, PROBS) and torch.equal(target, TARGET)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="probs must be"):
        C.auroc(SCORES, TARGET)
    with pytest.raises(ValueError, match="n_bins"):
        C.reliability_bins(PROBS, TARGET, 0)


def test_multiclass_macro_leaves_out_classes_absent_from_the_targets():
    """A class no row belongs to has no ROC curve: the macro mean is over the two present classes (torchmetrics'
    own macro AUROC would count the absent class as 0)."""
    g = torch.Generator().manual_seed(2)
    target = torch.tensor([0, 1] * 15)  # class 2 never occurs
    logits = torch.randn(30, 3, generator=g)
    logits[torch.arange(30), target] += 1.0
    probs = logits.softmax(-1)
    per_class = []
    for c in range(2):
        pos, neg = probs[target == c, c], probs[target != c, c]
        per_class.append((pos[:, None] > neg[None, :]).float().mean().item())
    assert C.auroc(probs, target).item() == pytest.approx(sum(per_class) / 2, abs=1e-6)
    curves = C.roc_curves(probs, target)
    assert [c.index for c in curves] == [0, 1] and [c.area for c in curves] == pytest.approx(per_class, abs=1e-6)
    pr = C.pr_curves(probs, target)
    assert [c.index for c in pr] == [0, 1]
    assert C.average_precision(probs, target).item() == pytest.approx(sum(c.area for c in pr) / 2, abs=1e-6)


def test_curve_figures_name_each_curve_by_its_class():
    from lightning_ft.evaluation.figures import roc_figure

    probs = torch.tensor([[0.7, 0.1, 0.2], [0.2, 0.1, 0.7], [0.6, 0.2, 0.2], [0.1, 0.2, 0.7]])
    target = torch.tensor([0, 2, 0, 2])  # class 1 absent
    fig = roc_figure(C.roc_curves(probs, target), ["abbr", "desc", "loc"])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0].startswith("abbr") and legend[1].startswith("loc")
