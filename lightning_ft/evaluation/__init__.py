"""Evaluation beyond accuracy: ROC / PR curves, AUROC, average precision and calibration of classifiers and of
multiple-choice scoring; batched generation and text metrics for free-text answers; figures for every logger; a
side-by-side report of runs.

    curves.py         AUROC, AP, ROC / PR curves, reliability bins, ECE (pure torch)
    generation.py     left-padded batched generation with a KV cache, stopping at EOS / end of turn
    text_metrics.py   exact match, token F1, ROUGE-L, BLEU, chrF
    figures.py        matplotlib figures
    loggers.py        figures to TensorBoard / W&B / PNG files in the run folder
    evaluator.py      the per-stage state FineTuneModule keeps
    run_outputs.py    metrics / generations / figures / loss curve files written at the end of a stage
    run_report.py     ``lightning-ft report RUN_DIR ...``: runs side by side in one Markdown file
"""

from lightning_ft.evaluation.curves import (
    auroc,
    average_precision,
    expected_calibration_error,
    pr_curves,
    reliability_bins,
    roc_curves,
)
from lightning_ft.evaluation.generation import generate, generate_text, stop_token_ids
from lightning_ft.evaluation.text_metrics import GenerationMetrics, exact_match, rouge_l, token_f1

__all__ = [
    "GenerationMetrics",
    "auroc",
    "average_precision",
    "exact_match",
    "expected_calibration_error",
    "generate",
    "generate_text",
    "pr_curves",
    "reliability_bins",
    "roc_curves",
    "rouge_l",
    "stop_token_ids",
    "token_f1",
]
