"""Generation metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ft.evaluation.text_metrics import (
    GenerationMetrics,
    exact_match,
    lcs_length,
    normalize_answer,
    rouge_l,
    token_f1,
)


def test_normalisation_and_exact_match():
    assert normalize_answer("  The Cat,  sat! ") == "cat sat"
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("a cat", "cats") == 0.0


def test_token_f1_by_hand():
    # "cat sat on mat" vs "cat on mat": 3 common words, P = 3/4, R = 3/3
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert token_f1("location: city", "location: country") == pytest.approx(0.5)  # 1 of 2 words each way
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("dog", "cat") == 0.0
    # repeated words count once per occurrence (multiset overlap): "dog dog dog" vs "dog" -> P 1/3, R 1
    assert token_f1("dog dog dog", "dog") == pytest.approx(0.5)


def test_rouge_l_by_hand():
    assert lcs_length("a b c d".split(), "a c b d".split()) == 3
    # LCS of "the cat sat on the mat" and "the cat on the mat" is the whole reference: P 5/6, R 1 -> 10/11
    assert rouge_l("the cat sat on the mat", "The cat on the mat.") == pytest.approx(10 / 11)
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)  # reversed: LCS 1
    assert rouge_l("", "a") == 0.0


def test_bleu_and_chrf_by_hand():
    m = GenerationMetrics()
    m.update(["the quick brown fox jumps over the dog"], ["the quick brown fox jumped over the lazy dog"])
    out = m.compute("x/")
    # clipped n-gram precisions 7/8, 4/7, 2/6, 1/5; brevity penalty exp(1 - 9/8)
    bleu = math.exp(1 - 9 / 8) * (7 / 8 * 4 / 7 * 2 / 6 * 1 / 5) ** 0.25
    assert float(out["x/bleu"]) == pytest.approx(bleu, abs=1e-5)
    assert 0 < float(out["x/chrf"]) < 1
    m.reset()
    m.update(["abc def"], ["abc def"])
    assert float(m.compute()["chrf"]) == pytest.approx(1.0) and float(m.compute()["bleu"]) == 0.0  # 2 words: no 4-grams
    m.reset()
    m.update(["xyz"], ["abc"])
    assert float(m.compute()["chrf"]) == 0.0


def test_generation_metrics_average_over_batches():
    m = GenerationMetrics()
    m.update(["location: city", "number: date"], ["location: city", "number: count"])
    m.update(["human"], ["human: person"])
    out = m.compute("test/gen_")
    assert set(out) == {f"test/gen_{k}" for k in ("exact_match", "token_f1", "rouge_l", "bleu", "chrf")}
    assert float(out["test/gen_exact_match"]) == pytest.approx(1 / 3)
    assert float(out["test/gen_token_f1"]) == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in out.values())
    with pytest.raises(ValueError, match="references"):
        m.update(["a"], [])
