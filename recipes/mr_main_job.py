"""The main job: fine-tune on MR, test, and print a summary.

    python recipes/mr_main_job.py [--config recipes/smollm2_mr_lora.yaml] [any lightning-ft override ...]

With an instruction recipe (rows with ``choices``, e.g. the default LoRA recipe for SmolLM2) it also:
  * tests the base model first (zero-shot accuracy, by comparing the likelihood of the answers);
  * after ``fit`` (where ``MergeAdapters`` writes the peft adapter and the merged model), tests the merged model;
  * reloads the merged folder with plain ``transformers`` and checks that it gives the same answer scores as the
    in-memory model on the first ``--reload-check-examples`` test rows (default 64).
With a classification recipe (``recipes/minilm_mr_sft.yaml``) it tests the best checkpoint by validation accuracy.

Writes ``<default_root_dir>/summary.json`` and ``loss_curve.png`` next to the CSV logs and the confusion matrix.
"""

from __future__ import annotations

import sys
import time
from itertools import islice
from pathlib import Path

import torch

from lightning_ft.callbacks import MergeAdapters, TokenThroughput
from lightning_ft.cli import make_cli
from lightning_ft.io import write_json_atomic
from lightning_ft.report import find_metrics_csv, majority_baseline, plot_loss_curve
from lightning_ft.scoring import score_choices

DEFAULT_CONFIG = "recipes/smollm2_mr_lora.yaml"


def pop_option(argv: list[str], name: str, default: int) -> tuple[list[str], int]:
    """Remove ``name VALUE`` (this script's own option) from ``argv``."""
    if name not in argv:
        return argv, default
    i = argv.index(name)
    return argv[:i] + argv[i + 2 :], int(argv[i + 1])


def choice_scores(model: torch.nn.Module, batches) -> torch.Tensor:
    """(N, K) answer log-likelihoods of ``model`` over the batches of a choice-scoring data loader."""
    model.eval()
    keys = ("choice_prompt_ids", "choice_prompt_mask", "choice_ids", "choice_mask")
    return torch.cat([score_choices(model, *(b[k] for k in keys)) for b in batches])


def reload_check(merged_dir: Path, model: torch.nn.Module, data, examples: int) -> dict:
    """Reload ``merged_dir`` with plain transformers; compare its answer scores with the in-memory ``model``'s."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir)
    loader = data.test_dataloader()
    num_batches = -(-examples // loader.batch_size)
    ours = choice_scores(model, islice(loader, num_batches))
    theirs = choice_scores(reloaded, islice(loader, num_batches))
    return {
        "examples": len(ours),
        "max_abs_score_difference": float((ours - theirs).abs().max()),
        "same_predictions": bool((ours.argmax(-1) == theirs.argmax(-1)).all()),
    }


def main(argv: list[str]) -> dict:
    start = time.perf_counter()
    argv, reload_examples = pop_option(list(argv), "--reload-check-examples", 64)
    if "--config" not in argv and "-c" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    cli = make_cli(argv, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    data.setup("test")
    scored = "choice_ids" in data.splits["test"].examples[0]

    zero_shot = trainer.test(model, datamodule=data)[0] if scored else None
    fit_start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_time = time.perf_counter() - fit_start
    # the module's own callbacks (configure_callbacks) are in trainer.callbacks only once a run has started
    merge = next((c for c in trainer.callbacks if isinstance(c, MergeAdapters)), None)
    # after MergeAdapters the module holds the merged model, which adapter-only checkpoints no longer fit
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
    ckpt = "best" if best and merge is None else None
    test = trainer.test(model, datamodule=data, ckpt_path=ckpt)[0]
    reload = None
    if scored and merge is not None and merge.merged_dir is not None and trainer.is_global_zero:
        reload = reload_check(merge.merged_dir, model.model, data, reload_examples)
    wall = time.perf_counter() - start

    throughput = next((c for c in trainer.callbacks if isinstance(c, TokenThroughput)), None)
    acc_key = "test/choice_acc" if scored else "test/acc"
    test_labels = [e.get("choice_label", e.get("label")) for e in data.splits["test"].examples]
    summary = {
        "recipe": argv[argv.index("--config") + 1] if "--config" in argv else None,
        "zero_shot_test_accuracy": zero_shot.get(acc_key) if zero_shot else None,
        "test_accuracy": test.get(acc_key),
        "test_f1": test.get(acc_key.replace("acc", "f1")),
        "majority_class_accuracy": majority_baseline([y for y in test_labels if y is not None and y != -100]),
        "wall_time_s": round(wall, 1),
        "fit_time_s": round(fit_time, 1),
        "train_tokens_per_s": round(throughput.tokens_per_second, 1) if throughput else None,
        "train_tokens": throughput.tokens if throughput else None,
        "steps": trainer.global_step,
        "tested_checkpoint": best if ckpt else "in-memory model at the end of fit" + (" (merged)" if merge else ""),
        "adapter_dir": str(merge.adapter_dir) if merge and merge.adapter_dir else None,
        "merged_dir": str(merge.merged_dir) if merge and merge.merged_dir else None,
        "reload_check": reload,
        "test_metrics": test,
    }
    out = Path(trainer.default_root_dir)
    metrics_csv = find_metrics_csv(trainer.logger.log_dir if trainer.logger else None)
    if metrics_csv is not None:
        plot_loss_curve(metrics_csv, out / "loss_curve.png", title=summary["recipe"] or "")
        summary["loss_curve"] = str(out / "loss_curve.png")
    write_json_atomic(out / "summary.json", summary)
    print_summary(summary, out)
    if reload is not None and not reload["same_predictions"]:
        raise SystemExit(f"the reloaded merged model scores differently from the trained one: {reload}")
    return summary


def print_summary(summary: dict, out: Path) -> None:
    print("\n==== lightning-ft main job ====")
    if summary["zero_shot_test_accuracy"] is not None:
        print(f"zero-shot test accuracy   {summary['zero_shot_test_accuracy']:.4f}  (base model, answer likelihood)")
    print(f"test accuracy             {summary['test_accuracy']:.4f}  (after fine-tuning)")
    print(f"majority class            {summary['majority_class_accuracy']:.4f}")
    print(f"test macro-F1             {summary['test_f1']:.4f}")
    if summary["reload_check"]:
        r = summary["reload_check"]
        print(
            f"reloaded merged model     same predictions on {r['examples']} test rows: {r['same_predictions']}, "
            f"max |score difference| {r['max_abs_score_difference']:.2e}"
        )
    for key in ("adapter_dir", "merged_dir"):
        if summary[key]:
            print(f"{key:<25} {summary[key]}")
    print(
        f"wall time                 {summary['wall_time_s']:.0f} s (everything in this script; fit "
        f"{summary['fit_time_s']:.0f} s)"
    )
    if summary["train_tokens_per_s"]:
        print(f"training tokens/s         {summary['train_tokens_per_s']:.0f}")
    print(f"summary                   {out / 'summary.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
