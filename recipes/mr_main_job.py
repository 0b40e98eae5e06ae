"""The main job: fine-tune on MR, test, and print a summary (accuracy vs the majority class, time, tokens/s).

    python recipes/mr_main_job.py [--config recipes/minilm_mr_sft.yaml] [any lightning-ft override ...]

Writes ``<default_root_dir>/summary.json`` and ``loss_curve.png`` next to the CSV logs and the test confusion matrix.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lightning_ft.callbacks import TokenThroughput
from lightning_ft.cli import make_cli
from lightning_ft.io import write_json_atomic
from lightning_ft.report import find_metrics_csv, majority_baseline, plot_loss_curve

DEFAULT_CONFIG = "recipes/minilm_mr_sft.yaml"


def main(argv: list[str]) -> dict:
    start = time.perf_counter()
    if "--config" not in argv and "-c" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    cli = make_cli(argv, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=data)
    ckpt = "best" if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path else None
    test = trainer.test(model, datamodule=data, ckpt_path=ckpt)[0]
    wall = time.perf_counter() - start

    throughput = next((c for c in trainer.callbacks if isinstance(c, TokenThroughput)), None)
    test_labels = [e.get("label", e.get("choice_label")) for e in data.splits["test"].examples]
    test_labels = [y for y in test_labels if y is not None and y != -100]
    acc_key = "test/acc" if "test/choice_acc" not in test else "test/choice_acc"
    summary = {
        "recipe": argv[argv.index("--config") + 1] if "--config" in argv else None,
        "test_accuracy": test.get(acc_key),
        "test_f1": test.get(acc_key.replace("acc", "f1")),
        "majority_class_accuracy": majority_baseline(test_labels) if test_labels else None,
        "wall_time_s": round(wall, 1),
        "train_tokens_per_s": round(throughput.tokens_per_second, 1) if throughput else None,
        "train_tokens": throughput.tokens if throughput else None,
        "steps": trainer.global_step,
        "best_checkpoint": ckpt and trainer.checkpoint_callback.best_model_path,
        "test_metrics": test,
    }
    out = Path(trainer.default_root_dir)
    metrics_csv = find_metrics_csv(trainer.logger.log_dir if trainer.logger else None)
    if metrics_csv is not None:
        plot_loss_curve(metrics_csv, out / "loss_curve.png", title=summary["recipe"] or "")
        summary["loss_curve"] = str(out / "loss_curve.png")
    write_json_atomic(out / "summary.json", summary)

    print("\n==== lightning-ft main job ====")
    print(f"test accuracy          {summary['test_accuracy']:.4f}")
    if summary["majority_class_accuracy"] is not None:
        print(f"majority-class         {summary['majority_class_accuracy']:.4f}")
    print(f"test macro-F1          {summary['test_f1']:.4f}")
    print(f"wall time              {wall:.0f} s (everything in this script)")
    if throughput:
        print(f"training tokens/s      {throughput.tokens_per_second:.0f}")
    print(f"summary                {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
