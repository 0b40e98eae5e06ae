"""Metrics shared by every module: perplexity, token accuracy, classification metrics, confusion tables and PNGs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from lightning_ft.metrics import (
    CausalLMMetrics,
    Perplexity,
    TokenAccuracy,
    classification_metrics,
    confusion_matrix,
    confusion_table,
    flatten_per_class,
    save_confusion_png,
)
from lightning_ft.modules.objectives import causal_lm_sums

IGNORE = -100
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ["a", "b", "c"]
# hand-made example: rows are (target, prediction)
TARGET = [0, 0, 0, 0, 1, 1, 2, 2]
PREDS = [0, 0, 0, 1, 1, 1, 1, 2]
# per class: a: TP 3 FP 0 FN 1; b: TP 2 FP 2 FN 0; c: TP 1 FP 0 FN 1
PRECISION = [1.0, 0.5, 1.0]
RECALL = [0.75, 1.0, 0.5]
F1 = [6 / 7, 2 / 3, 2 / 3]
ACC = 6 / 8


# --- helpers ---------------------------------------------------------------------------------------------------


def random_batch(seed: int, batch: int = 2, length: int = 7, vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels with a masked prompt and masked padding, different per row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :3] = IGNORE  # prompt
    labels[-1, -2:] = IGNORE  # padding
    if batch > 1:
        labels[1, :1] = IGNORE  # never a target anyway: position 0 is predicted by nothing
    return logits, labels


def nll_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """Summed next-token NLL, target count and argmax hits, one position at a time."""
    total, count, correct = 0.0, 0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[target])
            count += 1
            correct += int(int(row.argmax()) == target)
    return total, count, correct


def fed_metrics(prefix: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> CausalLMMetrics:
    metrics = CausalLMMetrics(prefix)
    for logits, labels in batches:
        metrics.update(*causal_lm_sums(logits, labels))
    return metrics


def hand_metric_values() -> dict[str, torch.Tensor]:
    m = classification_metrics(LABELS, prefix="val/")
    m.update(torch.tensor(PREDS), torch.tensor(TARGET))
    return m.compute()


# --- causal LM -------------------------------------------------------------------------------------------------


def test_causal_lm_sums_match_hand_computation() -> None:
    logits, labels = random_batch(0)
    nll, n, correct = causal_lm_sums(logits, labels)
    total, count, hits = nll_by_hand(logits, labels)
    assert int(n) == count == 6 * 2 - 2 - 2  # (T-1) targets per row minus masked ones
    assert float(nll) == pytest.approx(total, rel=1e-5)
    assert int(correct) == hits


def test_perplexity_is_exp_of_total_nll_over_tokens() -> None:
    batches = [random_batch(s) for s in range(3)]
    ppl = Perplexity()
    for logits, labels in batches:
        nll, n, _ = causal_lm_sums(logits, labels)
        ppl.update(nll, n)
    hand = [nll_by_hand(*b) for b in batches]
    expected = math.exp(sum(h[0] for h in hand) / sum(h[1] for h in hand))
    assert float(ppl.compute()) == pytest.approx(expected, rel=1e-5)
    # not the mean of per-batch perplexities
    mean_of_batches = sum(math.exp(h[0] / h[1]) for h in hand) / len(hand)
    assert float(ppl.compute()) != pytest.approx(mean_of_batches, rel=1e-5)


def test_perplexity_state_is_summed_and_resettable() -> None:
    ppl = Perplexity()
    ppl.update(torch.tensor(4.0), torch.tensor(2))
    ppl.update(torch.tensor(2.0), torch.tensor(4))
    assert float(ppl.compute()) == pytest.approx(math.exp(6 / 6))
    ppl.reset()
    ppl.update(torch.tensor(3.0), torch.tensor(3))
    assert float(ppl.compute()) == pytest.approx(math.e)


def test_token_accuracy() -> None:
    acc = TokenAccuracy()
    acc.update(torch.tensor(3), torch.tensor(4))
    acc.update(torch.tensor(0), torch.tensor(4))
    assert float(acc.compute()) == pytest.approx(3 / 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute() before update()
        assert float(TokenAccuracy().compute()) == 0.0  # no tokens: 0, not NaN


def test_causal_lm_metrics_names_and_values() -> None:
    batches = [random_batch(0, batch=1), random_batch(1, batch=2, length=9)]  # different token counts per batch
    values = fed_metrics("val/", batches).compute()
    assert set(values) == {"val/loss", "val/ppl", "val/acc"}
    hand = [nll_by_hand(*b) for b in batches]
    total, count, hits = (sum(h[i] for h in hand) for i in range(3))
    assert float(values["val/loss"]) == pytest.approx(total / count, rel=1e-5)  # token-weighted, not per batch
    assert float(values["val/ppl"]) == pytest.approx(math.exp(total / count), rel=1e-5)
    assert float(values["val/acc"]) == pytest.approx(hits / count)


def test_causal_lm_metrics_reset() -> None:
    metrics = fed_metrics("train/", [random_batch(0)])
    metrics.reset()
    logits, labels = random_batch(5)
    metrics.update(*causal_lm_sums(logits, labels))
    total, count, _ = nll_by_hand(logits, labels)
    assert float(metrics.compute()["train/loss"]) == pytest.approx(total / count, rel=1e-5)


def test_perfect_predictions_give_perplexity_one() -> None:
    labels = torch.tensor([[IGNORE, 3, 1, 4, 1]])
    logits = torch.full((1, 5, 6), -1e4)
    for t in range(4):
        logits[0, t, labels[0, t + 1]] = 1e4
    values = fed_metrics("test/", [(logits, labels)]).compute()
    assert float(values["test/ppl"]) == pytest.approx(1.0)
    assert float(values["test/acc"]) == 1.0 and float(values["test/loss"]) == pytest.approx(0.0, abs=1e-6)


# --- classification --------------------------------------------------------------------------------------------


def test_classification_metrics_hand_example() -> None:
    values = hand_metric_values()
    assert set(values) == {"val/acc", "val/f1", "val/precision", "val/recall"}
    assert float(values["val/acc"]) == pytest.approx(ACC)
    assert float(values["val/f1"]) == pytest.approx(sum(F1) / 3)  # macro: 46/63
    assert values["val/precision"].tolist() == pytest.approx(PRECISION)
    assert values["val/recall"].tolist() == pytest.approx(RECALL)


def test_classification_metrics_accept_logits() -> None:
    m = classification_metrics(LABELS, prefix="test/")
    logits = torch.nn.functional.one_hot(torch.tensor(PREDS), 3).float() * 5 - 1
    m.update(logits, torch.tensor(TARGET))
    values = m.compute()
    assert float(values["test/acc"]) == pytest.approx(ACC)
    assert float(values["test/f1"]) == pytest.approx(sum(F1) / 3)


def test_flatten_per_class_names() -> None:
    flat = flatten_per_class(hand_metric_values(), LABELS)
    assert set(flat) == {"val/acc", "val/f1"} | {f"val/{m}_{c}" for m in ("precision", "recall") for c in LABELS}
    assert all(v.ndim == 0 for v in flat.values())
    assert float(flat["val/precision_b"]) == pytest.approx(0.5)
    assert float(flat["val/recall_a"]) == pytest.approx(0.75)
    assert float(flat["val/recall_c"]) == pytest.approx(0.5)


def hand_confusion() -> torch.Tensor:
    cm = confusion_matrix(LABELS)
    cm.update(torch.tensor(PREDS), torch.tensor(TARGET))
    return cm.compute()


def test_confusion_matrix_rows_are_true_labels() -> None:
    assert hand_confusion().tolist() == [[3, 1, 0], [0, 2, 0], [0, 1, 1]]


def test_confusion_table_text() -> None:
    expected = "\n".join(
        [
            "| true \\ pred | a | b | c |",
            "|---|---|---|---|",
            "| a | 3 | 1 | 0 |",
            "| b | 0 | 2 | 0 |",
            "| c | 0 | 1 | 1 |",
        ]
    )
    assert confusion_table(hand_confusion(), LABELS) == expected


def test_save_confusion_png_atomic(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "confusion.png"  # the folder is created
    save_confusion_png(hand_confusion(), LABELS, out, title="val")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["confusion.png"]
    first = out.read_bytes()
    save_confusion_png(torch.tensor([[5, 0, 0], [0, 5, 0], [0, 0, 5]]), LABELS, out)  # overwrite in place
    assert out.read_bytes()[:8] == PNG_MAGIC and out.read_bytes() != first
    assert [p.name for p in out.parent.iterdir()] == ["confusion.png"]


def test_save_confusion_png_failure_leaves_old_file(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    out = tmp_path / "confusion.png"
    out.write_bytes(b"old")

    def broken_savefig(self, path, **kwargs):
        Path(path).write_bytes(PNG_MAGIC)  # half written
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        save_confusion_png(hand_confusion(), LABELS, out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]
