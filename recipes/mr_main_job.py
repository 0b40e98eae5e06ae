"""The main job: fine-tune on MR, test, and print a summary.

    python recipes/mr_main_job.py [--config recipes/smollm2_mr_lora.yaml] [any lightning-ft override ...]

With an instruction recipe (rows with ``choices``, e.g. the default LoRA recipe for SmolLM2) it also:
  * tests the base model first (zero-shot accuracy, by comparing the likelihood of the answers) on a fixed subset:
    the first ``--zero-shot-examples`` rows of the test file (default 256; the file's order is a seeded shuffle,
    stratified by label), with a 95 % Wilson confidence interval; ``0`` skips it, ``-1`` uses every row. The tuned
    model is always tested on the whole test set;
  * after ``fit`` (where ``MergeAdapters`` writes the peft adapter and the merged model), tests the merged model;
  * reloads the merged folder with plain ``transformers`` and checks that it gives the same answer scores as the
    in-memory model on the first ``--reload-check-examples`` test rows (default 64).
With a classification recipe (``recipes/minilm_mr_sft.yaml``) it tests the best checkpoint by validation accuracy.

The training budget is the recipe's ``trainer.max_steps``; its ``trainer.max_time`` is a guard that ends ``fit``
early on a machine much slower than the one the recipe was sized on (``summary.json`` then says so:
``stopped_early``). The summary records each phase's wall time and the load average, since a shared machine
slows every phase alike.

Writes ``<default_root_dir>/summary.json`` and ``loss_curve.png`` next to the CSV logs and the confusion matrix, and,
after a zero-shot test, ``report.md`` in the logger's version folder: the base model and the tuned one side by side
(``lightning-ft report``: metrics, ROC / PR / reliability / confusion-matrix figures of each), with the base model's
test outputs in ``zero_shot/`` next to it. The zero-shot column covers the zero-shot subset only.
"""

from __future__ import annotations

import math
import os
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_ft.callbacks import MergeAdapters, TokenThroughput
from lightning_ft.cli import make_cli
from lightning_ft.evaluation.run_report import move_test_outputs, write_run_report
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


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``accuracy`` measured on ``n`` rows."""
    if n == 0:
        return (0.0, 1.0)
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def first_rows_loader(loader: DataLoader, n: int) -> DataLoader:
    """The first ``n`` rows of an evaluation loader's data set, in its batch size and collation (longest first)."""
    rows = list(loader.dataset)[:n]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    return DataLoader(rows, batch_size=loader.batch_size, sampler=order, collate_fn=loader.collate_fn)


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
    load_start = os.getloadavg()
    argv, reload_examples = pop_option(list(argv), "--reload-check-examples", 64)
    argv, zero_shot_examples = pop_option(argv, "--zero-shot-examples", 256)
    if "--config" not in argv and "-c" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    cli = make_cli(argv, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    data.setup("test")
    scored = "choice_ids" in data.splits["test"].examples[0]

    phases = {"setup": time.perf_counter() - start}
    zero_shot, zero_shot_rows = None, 0
    if scored and zero_shot_examples != 0:
        loader = data.test_dataloader()
        zero_shot_rows = len(loader.dataset) if zero_shot_examples < 0 else min(zero_shot_examples, len(loader.dataset))
        zero_shot = trainer.test(model, dataloaders=first_rows_loader(loader, zero_shot_rows))[0]
    run = Path(trainer.log_dir) if zero_shot is not None and trainer.logger is not None else None
    if run is not None and trainer.is_global_zero:  # keep them apart from the tuned model's test outputs
        move_test_outputs(run, run / "zero_shot")
    phases["zero_shot_test"] = time.perf_counter() - start - sum(phases.values())
    fit_start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_time = time.perf_counter() - fit_start
    phases["fit"] = fit_time
    # the module's own callbacks (configure_callbacks) are in trainer.callbacks only once a run has started
    merge = next((c for c in trainer.callbacks if isinstance(c, MergeAdapters)), None)
    # after MergeAdapters the module holds the merged model, which adapter-only checkpoints no longer fit
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
    ckpt = "best" if best and merge is None else None
    test = trainer.test(model, datamodule=data, ckpt_path=ckpt)[0]
    phases["test"] = time.perf_counter() - start - sum(phases.values())
    reload = None
    if scored and merge is not None and merge.merged_dir is not None and trainer.is_global_zero:
        reload = reload_check(merge.merged_dir, model.model, data, reload_examples)
    wall = time.perf_counter() - start
    phases["reload_check"] = wall - sum(phases.values())

    throughput = next((c for c in trainer.callbacks if isinstance(c, TokenThroughput)), None)
    acc_key = "test/choice_acc" if scored else "test/acc"
    test_labels = [e.get("choice_label", e.get("label")) for e in data.splits["test"].examples]
    zero_shot_acc = zero_shot.get(acc_key) if zero_shot else None
    summary = {
        "recipe": argv[argv.index("--config") + 1] if "--config" in argv else None,
        "zero_shot_test_accuracy": zero_shot_acc,
        "zero_shot_examples": zero_shot_rows,
        "zero_shot_ci95": wilson_interval(zero_shot_acc, zero_shot_rows) if zero_shot else None,
        "test_examples": len(test_labels),
        "test_accuracy": test.get(acc_key),
        "test_ci95": wilson_interval(test[acc_key], len(test_labels)) if acc_key in test else None,
        "test_f1": test.get(acc_key.replace("acc", "f1")),
        "majority_class_accuracy": majority_baseline([y for y in test_labels if y is not None and y != -100]),
        "wall_time_s": round(wall, 1),
        "fit_time_s": round(fit_time, 1),
        "train_tokens_per_s": round(throughput.tokens_per_second, 1) if throughput else None,
        "train_tokens": throughput.tokens if throughput else None,
        "steps": trainer.global_step,
        "max_steps": trainer.max_steps,
        "stopped_early": trainer.max_steps > 0 and trainer.global_step < trainer.max_steps,
        "phase_s": {k: round(v, 1) for k, v in phases.items()},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
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
    if run is not None and trainer.is_global_zero:
        names = [f"zero-shot (first {zero_shot_rows} test rows)", f"tuned (all {len(test_labels)} test rows)"]
        title = f"MR: base model vs tuned ({summary['recipe']})"
        summary["report"] = str(write_run_report([run / "zero_shot", run], run / "report.md", names=names, title=title))
    write_json_atomic(out / "summary.json", summary)
    print_summary(summary, out)
    if reload is not None and not reload["same_predictions"]:
        raise SystemExit(f"the reloaded merged model scores differently from the trained one: {reload}")
    return summary


def print_summary(summary: dict, out: Path) -> None:
    print("\n==== lightning-ft main job ====")
    if summary["zero_shot_test_accuracy"] is not None:
        lo, hi = summary["zero_shot_ci95"]
        print(
            f"zero-shot test accuracy   {summary['zero_shot_test_accuracy']:.4f}  (base model, answer likelihood; "
            f"first {summary['zero_shot_examples']} test rows, 95 % CI {lo:.3f}-{hi:.3f})"
        )
    rows = summary["test_examples"]
    lo, hi = summary["test_ci95"] or (float("nan"), float("nan"))
    print(
        f"test accuracy             {summary['test_accuracy']:.4f}  (after fine-tuning, all {rows} test rows, "
        f"95 % CI {lo:.3f}-{hi:.3f})"
    )
    print(f"majority class            {summary['majority_class_accuracy']:.4f}")
    print(f"test macro-F1             {summary['test_f1']:.4f}")
    if summary["reload_check"]:
        r = summary["reload_check"]
        print(
            f"reloaded merged model     same predictions on {r['examples']} test rows: {r['same_predictions']}, "
            f"max |score difference| {r['max_abs_score_difference']:.2e}"
        )
    for key in ("adapter_dir", "merged_dir", "report"):
        if summary.get(key):
            print(f"{key:<25} {summary[key]}")
    print(
        f"wall time                 {summary['wall_time_s']:.0f} s (everything in this script; fit "
        f"{summary['fit_time_s']:.0f} s, {summary['steps']} steps"
        + (f", stopped by trainer.max_time before {summary['max_steps']}" if summary["stopped_early"] else "")
        + ")"
    )
    print("phases (s)                " + ", ".join(f"{k} {v:.0f}" for k, v in summary["phase_s"].items()))
    print(
        f"load average (1 min)      {summary['load_average']['start'][0]:.1f} at start, "
        f"{summary['load_average']['end'][0]:.1f} at end ({summary['cpus']} CPUs)"
    )
    if summary["train_tokens_per_s"]:
        print(f"training tokens/s         {summary['train_tokens_per_s']:.0f}")
    print(f"summary                   {out / 'summary.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
