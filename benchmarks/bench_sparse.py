"""Sparse fine-tuning (delta mode) vs LoRA vs full fine-tuning at equal budget; low-rank compression with recovery.

Side by side: sparse with ``lora_equivalent_rank=r`` against LoRA rank r, and svd against asvd compression.

    python benchmarks/bench_sparse.py [--repeats 2] [--steps 3] [--accuracy-steps 60] [--recovery-steps 40]

Three parts, each configuration in a fresh subprocess (``harness.py``):

1. Step time and memory (MiniLM-L6 on MR classification batches of 32 x <=64 tokens, SmolLM2-135M on MR instruction
   batches of 4 x 256 packed tokens): LoRA r on every linear layer, sparse delta mode with ``lora_equivalent_rank=r``
   (the ``random`` criterion: the criterion decides which entries train, not what a step costs) and full fine-tuning.
   Forward + backward + AdamW; median step time, peak RSS, bytes of gradients and of optimizer state after a step.
2. Accuracy (MiniLM on MR classification; SmolLM2 with ``--smollm2-accuracy``): LoRA, sparse with criteria
   random / gradient / fisher, and full fine-tuning, each trained for a fixed number of steps through the library's
   modules and a Lightning ``Trainer``, then tested on the MR test split.
3. Compression (MiniLM classification): the fully fine-tuned model of part 2 is factorised to ``--param-ratio`` of
   its targeted linear parameters by ``svd`` and by ``asvd``, tested, recovered by a short LoRA run, tested again.

Writes ``sparse.{json,md,png}`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    BATCH_SHAPES,
    ROOT,
    machine,
    median_of,
    mr_batches,
    mr_datamodule,
    peak_rss_mb,
    run_interleaved,
    worker_main,
    write_results,
)

MODELS = {  # the batch shapes of harness.BATCH_SHAPES (those of bench_full_ft.py and bench_lora.py)
    "minilm": {**BATCH_SHAPES["minilm"], "title": "MiniLM-L6"},
    "smollm2": {**BATCH_SHAPES["smollm2"], "title": "SmolLM2-135M"},
}
METHOD_TITLES = {
    "lora": "LoRA r={r} all-linear",
    "sparse": "sparse delta {criterion} (r={r} equiv.)",
    "full": "full fine-tuning",
}
MB = 2**20


def method_name(method: str, rank: int, criterion: str | None = None) -> str:
    return METHOD_TITLES[method].format(r=rank, criterion=criterion)


# ---- part 1: step time and memory ------------------------------------------------------------------------------
def build(spec: dict, method: str, rank: int):
    """The Hugging Face model of one configuration, with adapters / sparse deltas injected and the base frozen."""
    import torch

    from lightning_ft.lora import inject_lora
    from lightning_ft.models import load_model
    from lightning_ft.modules.adapter import classification_heads
    from lightning_ft.sparse import inject_sparse, select_sparse

    torch.manual_seed(0)
    model = load_model(spec["model"], task=spec["module_task"], labels=spec["labels"])
    heads = classification_heads(model) if spec["module_task"] == "classification" else []
    if method == "lora":
        inject_lora(model, r=rank, alpha=2 * rank, target_modules="all-linear", modules_to_save=heads or None)
    elif method == "sparse":
        indices = select_sparse(model, criterion="random", lora_equivalent_rank=rank, target_modules="all-linear")
        inject_sparse(model, indices, "delta", modules_to_save=heads or None)
    else:
        model.requires_grad_(True)
    return model


def tensor_bytes(values) -> int:
    import torch

    return sum(v.nbytes for v in values if isinstance(v, torch.Tensor))


def timing_worker(cfg: dict) -> dict:
    """Median forward + backward + AdamW step over ``cfg['steps']`` real batches after ``cfg['warmup']`` untimed."""
    import torch

    from lightning_ft.modules.base import FineTuneModule
    from lightning_ft.sparse import sparse_layers

    spec = MODELS[cfg["model"]]
    batches = mr_batches(spec, cfg["warmup"] + cfg["steps"])
    model = build(spec, cfg["method"], cfg["rank"])
    # FineTuneModule.step: the loss exactly as in Trainer.fit (logits at target positions only for causal LMs)
    module = FineTuneModule(model=model, task=spec["module_task"], labels=spec["labels"])
    module.configure_model()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times, grad_bytes, state_bytes = [], None, None
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        module.step(batch, "train").backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if grad_bytes is None:  # measured outside the timed region, while the gradients still exist
            grad_bytes = tensor_bytes(p.grad for p in params if p.grad is not None)
            state_bytes = tensor_bytes(v for s in optimizer.state.values() for v in s.values())
        optimizer.zero_grad(set_to_none=True)
        if i >= cfg["warmup"]:
            times.append(elapsed)
    index_bytes = sum(layer.indices.nbytes for layer in sparse_layers(model).values())
    return {
        "step_s": times,
        "peak_rss_mb": peak_rss_mb(),
        "trainable_params": sum(p.numel() for p in params),
        "grad_bytes": grad_bytes,
        "optimizer_state_bytes": state_bytes,
        "index_bytes": index_bytes,
        "tokens_per_batch": int(batches[0]["input_ids"].numel()),
    }


# ---- parts 2 and 3: training runs through the library's modules -----------------------------------------------
def datamodule(spec: dict, batch_size: int, seed: int, max_test_examples: int | None):
    extra = {"system_prompt": ""} if spec["data"] == "instruction" else {}  # as recipes/smollm2_mr_lora.yaml
    return mr_datamodule(
        spec["model"],
        spec["data"],
        test=True,
        labels=spec["labels"],
        max_length=spec["max_length"],
        batch_size=batch_size,
        eval_batch_size=64,
        group_by_length=True,
        seed=seed,
        max_eval_examples=max_test_examples,
        **extra,
    )


def make_module(spec: dict, cfg: dict, model=None):
    """LoRAModule / SparseModule / SFTModule for one configuration (``model``: an already built model)."""
    from lightning_ft import LoRAModule, SFTModule, SparseModule

    common = {
        "model_name_or_path": None if model is not None else spec["model"],
        "model": model,
        "task": spec["module_task"],
        "labels": spec["labels"],
        "learning_rate": cfg["lr"],
        "weight_decay": cfg["weight_decay"],
        "warmup_ratio": cfg["warmup_ratio"],
        "scheduler": "linear",
    }
    if spec["module_task"] == "causal_lm":
        common["eval_lm_loss"] = False  # only the answers are scored at test (test/choice_acc)
    if cfg["method"] == "lora":
        return LoRAModule(
            **common,
            r=cfg["rank"],
            alpha=2 * cfg["rank"],
            target_modules="all-linear",
            quantize_base=cfg.get("quantize_base"),
        )
    if cfg["method"] == "sparse":
        return SparseModule(
            **common,
            lora_equivalent_rank=cfg["rank"],
            criterion=cfg["criterion"],
            allocation=cfg.get("allocation", "per_matrix"),
            mode="delta",
            target_modules="all-linear",
            calibration_batches=cfg["calibration_batches"],
            seed=cfg["seed"],
            **cfg.get("sparse_settings", {}),
        )
    return SFTModule(**common)


def step_recorder():
    """A callback recording the wall time and loss of every training batch (forward + backward + optimizer)."""
    import lightning as L

    class StepRecorder(L.Callback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.loss: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step_s.append(time.perf_counter() - self._start)
            self.loss.append(float(outputs["loss"]))

    return StepRecorder()


def trainer_for(steps: int, root: str, callbacks: list, gradient_clip_val: float | None = None):
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
        gradient_clip_val=gradient_clip_val,
    )


def test_metrics(metrics: dict) -> dict:
    """Accuracy (choice accuracy for instructions) and loss of a ``trainer.test`` result."""
    acc = metrics.get("test/acc", metrics.get("test/choice_acc"))
    return {"acc": float(acc), "loss": float(metrics["test/loss"]) if "test/loss" in metrics else None}


def fit_then_test(module, dm, steps: int, gradient_clip_val: float | None = None) -> tuple[dict, object, float, float]:
    """Fit ``module`` for ``steps`` steps (global gradient norm clipped to ``gradient_clip_val`` when given), then
    test it: (test metrics, the step recorder, fit s, test s)."""
    recorder = step_recorder()
    with tempfile.TemporaryDirectory() as root:  # the test confusion matrix is written there
        trainer = trainer_for(steps, root, [recorder], gradient_clip_val)
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
        test_s = time.perf_counter() - start
    return metrics, recorder, fit_s, test_s


def fit_and_test(spec: dict, cfg: dict, dm, model=None) -> tuple[dict, object]:
    """Train one configuration for ``cfg['steps']`` steps and test it; (results, the trained module)."""
    from lightning_ft.modules.base import count_parameters

    module = make_module(spec, cfg, model)
    metrics, recorder, fit_s, test_s = fit_then_test(module, dm, cfg["steps"])
    trainable, total = count_parameters(module)
    tail = recorder.loss[-max(1, len(recorder.loss) // 10) :]
    result = {
        **test_metrics(metrics),
        "step_s": recorder.step_s,
        "train_loss": recorder.loss,
        "final_train_loss": statistics.mean(tail),
        "fit_s": fit_s,
        "test_s": test_s,
        "trainable_params": trainable,
        "total_params": total,
        "test_examples": len(dm.splits["test"].examples),
    }
    return result, module


def accuracy_worker(cfg: dict) -> dict:
    import lightning as L

    spec = MODELS[cfg["model"]]
    L.seed_everything(cfg["seed"], verbose=False)
    dm = datamodule(spec, cfg["batch_size"], cfg["seed"], cfg["max_test_examples"])
    result, module = fit_and_test(spec, cfg, dm)
    if cfg.get("save_dir"):  # the fine-tuned model that the compression part starts from
        module.model.save_pretrained(cfg["save_dir"])
    return {**result, "peak_rss_mb": peak_rss_mb()}


def evaluate(spec: dict, model, dm) -> dict:
    """Test metrics of a plain Hugging Face model (no training)."""
    from lightning_ft.modules.base import FineTuneModule

    module = FineTuneModule(model=model, task=spec["module_task"], labels=spec["labels"])
    with tempfile.TemporaryDirectory() as root:
        return test_metrics(trainer_for(1, root, []).test(module, datamodule=dm, verbose=False)[0])


def compress_worker(cfg: dict) -> dict:
    """Fine-tuned model -> test; compress (svd / asvd) -> test; LoRA recovery -> test."""
    import lightning as L

    from lightning_ft.compress import compress_low_rank, parameter_counts
    from lightning_ft.modeling import MODEL_INPUTS
    from lightning_ft.models import load_model

    spec = MODELS["minilm"]
    L.seed_everything(0, verbose=False)
    dm = datamodule(spec, spec["batch_size"], 0, cfg["max_test_examples"])
    dm.setup("fit")
    model = load_model(cfg["base_dir"], task="classification", labels=spec["labels"])
    counts_before = parameter_counts(model).to_dict()
    before = evaluate(spec, model, dm)
    calibration = None
    if cfg["method"] == "asvd":  # the first train batches (seeded shuffle), model inputs only
        loader = dm.train_dataloader()
        calibration = [
            {k: b[k] for k in MODEL_INPUTS if k in b} for b in itertools.islice(loader, cfg["calibration_batches"])
        ]
    start = time.perf_counter()
    report = compress_low_rank(
        model,
        param_ratio=cfg["param_ratio"],
        method=cfg["method"],
        calibration=calibration,
        target_modules="all-linear",
    )
    compress_s = time.perf_counter() - start
    counts_after = parameter_counts(model).to_dict()
    compressed = evaluate(spec, model, dm)
    recovery_cfg = {
        "method": "lora",
        "rank": cfg["rank"],
        "lr": cfg["lr"],
        "weight_decay": 0.0,
        "warmup_ratio": cfg["warmup_ratio"],
        "steps": cfg["steps"],
    }
    L.seed_everything(0, verbose=False)
    recovered, _ = fit_and_test(spec, recovery_cfg, dm, model=model)
    return {
        "before": before,
        "compressed": compressed,
        "recovered": {k: recovered[k] for k in ("acc", "loss")},
        "recovery_step_s": recovered["step_s"],
        "recovery_fit_s": recovered["fit_s"],
        "recovery_trainable_params": recovered["trainable_params"],
        "compress_s": compress_s,
        "params_before": counts_before,
        "params_after": counts_after,
        "targeted_before": report.targeted_before,
        "targeted_after": report.targeted_after,
        "layers_factorized": len(report.factorized),
        "layers_targeted": len(report.layers),
        "peak_rss_mb": peak_rss_mb(),
        "test_examples": len(dm.splits["test"].examples),
    }


def run_worker(cfg: dict, args: argparse.Namespace) -> dict:
    return {"timing": timing_worker, "accuracy": accuracy_worker, "compress": compress_worker}[cfg["kind"]](cfg)


# ---- the report ------------------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def fmt_acc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def summarise_timing(configs: list[dict], runs: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for c in configs:
        rs = runs[c["name"]]
        out.setdefault(c["model"], {})[c["method"]] = {
            "name": c["name"],
            "step_s": median_of(rs, "step_s"),
            "peak_rss_mb": median_of(rs, "peak_rss_mb"),
            "trainable_params": rs[0]["trainable_params"],
            "grad_bytes": rs[0]["grad_bytes"],
            "optimizer_state_bytes": rs[0]["optimizer_state_bytes"],
            "index_bytes": rs[0]["index_bytes"],
            "grad_opt_bytes": rs[0]["grad_bytes"] + rs[0]["optimizer_state_bytes"],
            "tokens_per_batch": rs[0]["tokens_per_batch"],
        }
    for per_method in out.values():
        lora = per_method.get("lora")
        for r in per_method.values():
            r["step_vs_lora"] = ratio(r["step_s"], lora["step_s"]) if lora else None
            r["bytes_vs_lora"] = ratio(r["grad_opt_bytes"], lora["grad_opt_bytes"]) if lora else None
            with_indices = r["grad_opt_bytes"] + r["index_bytes"]
            r["bytes_with_indices_vs_lora"] = ratio(with_indices, lora["grad_opt_bytes"]) if lora else None
    return out


def summarise_accuracy(configs: list[dict], runs: dict) -> dict[str, list[dict]]:
    """Per model: one row per method (median over seeds), with the difference to LoRA in points."""
    out: dict[str, list[dict]] = {}
    for c in configs:
        if c.get("base_only"):
            continue
        rows = out.setdefault(c["model"], [])
        row = next((r for r in rows if r["label"] == c["label"]), None)
        if row is None:
            row = {
                "label": c["label"],
                "method": c["method"],
                "criterion": c.get("criterion"),
                "lr": c["lr"],
                "steps": c["steps"],
                "batch_size": c["batch_size"],
                "seeds": [],
                "acc": [],
                "loss": [],
                "step_s": [],
                "fit_s": [],
                "final_train_loss": [],
                "peak_rss_mb": [],
                "trainable_params": None,
            }
            rows.append(row)
        r = runs[c["name"]][0]
        row["seeds"].append(c["seed"])
        for k in ("acc", "loss", "fit_s", "final_train_loss", "peak_rss_mb"):
            row[k].append(r[k])
        row["step_s"].extend(r["step_s"][1:])  # the first step includes the optimizer's lazy set-up
        row["trainable_params"] = r["trainable_params"]
        row["test_examples"] = r["test_examples"]
    for rows in out.values():
        for row in rows:
            row["acc_median"] = statistics.median(row["acc"])
            row["loss_median"] = statistics.median(row["loss"]) if None not in row["loss"] else None
            row["step_s_median"] = statistics.median(row["step_s"]) if row["step_s"] else None
        lora = next((r for r in rows if r["method"] == "lora"), None)
        for row in rows:
            row["acc_vs_lora_points"] = 100 * (row["acc_median"] - lora["acc_median"]) if lora else None
    return out


def summarise_compression(configs: list[dict], runs: dict) -> list[dict]:
    rows = []
    for c in configs:
        r = runs[c["name"]][0]
        gap = r["before"]["acc"] - r["compressed"]["acc"]
        closed = (r["recovered"]["acc"] - r["compressed"]["acc"]) / gap if gap > 0 else None
        loss_gap = r["compressed"]["loss"] - r["before"]["loss"]
        loss_closed = (r["compressed"]["loss"] - r["recovered"]["loss"]) / loss_gap if loss_gap > 0 else None
        rows.append(
            {
                "method": c["method"],
                "param_ratio": c["param_ratio"],
                **r,
                "acc_lost": gap,
                "gap_closed": closed,
                "loss_gap_closed": loss_closed,
            }
        )
    return rows


def targets(timing: dict, accuracy: dict, compression: list[dict]) -> list[tuple[str, str, str, bool | None]]:
    """(target, where, measured, met) rows."""
    out = []
    for model, rows in accuracy.items():
        lora = next((r for r in rows if r["method"] == "lora"), None)
        sparse = [r for r in rows if r["method"] == "sparse"]
        if lora and sparse:
            best = max(sparse, key=lambda r: r["acc_median"])
            diff = best["acc_median"] - lora["acc_median"]
            out.append(
                (
                    "best sparse criterion accuracy >= LoRA's - 1 point",
                    MODELS[model]["title"],
                    f"{best['criterion']}: {fmt_acc(best['acc_median'])} vs LoRA {fmt_acc(lora['acc_median'])} "
                    f"({100 * diff:+.2f} points)",
                    diff >= -0.01,
                )
            )
    for model, per_method in timing.items():
        s = per_method.get("sparse")
        if s and s.get("bytes_vs_lora") is not None:
            out.append(
                (
                    "gradient + optimizer bytes (delta) <= 1.5 x LoRA's",
                    MODELS[model]["title"],
                    f"{s['bytes_vs_lora']:.3f} x ({s['bytes_with_indices_vs_lora']:.3f} x counting the int64 indices)",
                    s["bytes_vs_lora"] <= 1.5,
                )
            )
            out.append(
                (
                    "step time (delta) <= 1.3 x LoRA's",
                    MODELS[model]["title"],
                    f"{s['step_vs_lora']:.3f} x",
                    s["step_vs_lora"] <= 1.3,
                )
            )
    by = {r["method"]: r for r in compression}
    if "svd" in by and "asvd" in by:
        s, a = by["svd"], by["asvd"]
        out.append(
            (
                "asvd loses less than svd (accuracy)",
                "MiniLM-L6 MR",
                f"asvd -{100 * a['acc_lost']:.2f} vs svd -{100 * s['acc_lost']:.2f} points (test loss "
                f"{a['compressed']['loss']:.4f} vs {s['compressed']['loss']:.4f}, before {s['before']['loss']:.4f})",
                a["acc_lost"] < s["acc_lost"],
            )
        )
    for r in compression:
        closed = r["gap_closed"]
        out.append(
            (
                f"recovery closes >= half the gap ({r['method']})",
                "MiniLM-L6 MR",
                "no gap to close" if closed is None else f"{100 * closed:.0f}% of {100 * r['acc_lost']:.2f} points",
                None if closed is None else closed >= 0.5,
            )
        )
    return out


def markdown(
    args,
    info: dict,
    command: str,
    timing: dict,
    accuracy: dict,
    compression: list[dict],
    target_rows: list,
    part_s: dict,
) -> list[str]:
    r = args.rank
    lines = [
        f"Sparse fine-tuning (delta mode, `lora_equivalent_rank={r}`) vs LoRA r={r} (all linear layers) vs full "
        f"fine-tuning, and low-rank compression with LoRA recovery ({info['cpus']} CPUs, torch {info['torch']}, "
        f"{info['torch_threads']} threads). Command: `{command}`",
        "",
        "**Protocol** (reduced to fit a 2-core CPU; every count below is a flag):",
    ]
    if "timing" in args.parts:
        lines.append(
            f"- Step time / memory: {', '.join(MODELS[m]['title'] for m in args.models)}; real MR batches (MiniLM 32 x "
            f"<=64 tokens, SmolLM2 4 x 256 packed tokens); forward + backward + AdamW; each configuration in a fresh "
            f"process, {args.repeats} interleaved repeats x {args.steps} timed steps after {args.warmup} warm-up "
            "step(s); "
            "medians. Sparse timing uses the `random` criterion only: the criterion chooses which entries train, not "
            "what a step costs. Gradient / optimizer bytes: sum of `.grad` and AdamW state tensors after one step."
        )
    if "accuracy" in args.parts:
        acc_models = ["MiniLM-L6 (MR classification)"]
        if args.smollm2_accuracy:
            acc_models.append("SmolLM2-135M (MR instructions, answer likelihood)")
        lines.append(
            f"- Accuracy: {', '.join(acc_models)}; MiniLM: {args.accuracy_steps} steps of batch 32 (<=64 tokens, "
            f"grouped by length), AdamW, 10% linear warm-up then linear decay; lr LoRA {args.lora_lr:g}, sparse "
            f"{args.sparse_lr:g}, full {args.full_lr:g} (weight decay 0.01 for full as in "
            "`recipes/minilm_mr_sft.yaml`, "
            f"0 otherwise); gradient / fisher masks from {args.calibration_batches} calibration batches; no "
            f"validation, no checkpoint selection; test on {_test_rows(accuracy)} MR test rows; seeds {args.seeds} "
            "(median). Learning rates were not tuned per method."
        )
        if args.smollm2_accuracy:
            lines.append(
                f"  SmolLM2: {args.smollm2_steps} steps of batch {args.smollm2_batch_size} (<=256 tokens), "
                f"lr LoRA / sparse as above, full {args.smollm2_full_lr:g}; test/choice_acc."
            )
    if "compression" in args.parts:
        lines.append(
            f"- Compression: MiniLM fine-tuned in full for {args.accuracy_steps} steps (the accuracy part's run, seed "
            f"{args.seeds[0]}), factorised "
            f"to {args.param_ratio:g} of each targeted linear layer's parameters (`param_ratio`), all linear layers "
            f"but the classifier; `asvd` calibrated on {args.compress_calibration_batches} train batches; recovery: "
            f"LoRA r={r} on the factors (+ classifier head) for {args.recovery_steps} steps at lr {args.recovery_lr:g}."
        )
    lines.append("")
    if timing:
        lines += [
            "### Step time and memory",
            "",
            "| model | configuration | trainable params | median step (s) | step / LoRA | peak RSS (MB) | grads (MB) "
            "| optimizer state (MB) | grads + opt / LoRA | index buffers (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model, per_method in timing.items():
            for t in per_method.values():
                lines.append(
                    f"| {MODELS[model]['title']} | {t['name'].split(': ', 1)[1]} | {t['trainable_params'] / 1e6:.3f}M "
                    f"| {t['step_s']:.3f} "
                    f"| {_x(t['step_vs_lora'])} | {t['peak_rss_mb']:.0f} | {t['grad_bytes'] / MB:.2f} "
                    f"| {t['optimizer_state_bytes'] / MB:.2f} | {_x(t['bytes_vs_lora'])} | "
                    f"{t['index_bytes'] / MB:.2f} |"
                )
        lines.append("")
    if accuracy:
        lines += [
            "### Accuracy (MR test)",
            "",
            "| model | method | lr | trainable params | test acc (%) | vs LoRA (points) | test loss | final train loss "
            "| median step in fit (s) | fit (s) | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model, rows in accuracy.items():
            for row in rows:
                per_seed = "" if len(row["acc"]) == 1 else " (" + ", ".join(fmt_acc(a) for a in row["acc"]) + ")"
                vs = "-" if row["acc_vs_lora_points"] is None else f"{row['acc_vs_lora_points']:+.2f}"
                step = "-" if row["step_s_median"] is None else f"{row['step_s_median']:.2f}"
                lines.append(
                    f"| {MODELS[model]['title']} | {row['label']} | {row['lr']:g} | "
                    f"{row['trainable_params'] / 1e6:.3f}M "
                    f"| {fmt_acc(row['acc_median'])}{per_seed} | {vs} | {fmt_loss(row['loss_median'])} "
                    f"| {statistics.median(row['final_train_loss']):.4f} | {step} | "
                    f"{statistics.median(row['fit_s']):.0f} "
                    f"| {statistics.median(row['peak_rss_mb']):.0f} |"
                )
        lines.append("")
    if compression:
        lines += [
            f"### Low-rank compression at param_ratio={args.param_ratio:g} (MiniLM-L6, MR test)",
            "",
            "| method | params (model) | targeted linear params | layers factorised | acc before (%) | compressed "
            "| recovered | gap closed | loss before | compressed | recovered |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in compression:
            closed = "-" if c["gap_closed"] is None else f"{100 * c['gap_closed']:.0f}%"
            lines.append(
                f"| {c['method']} | {c['params_before']['total'] / 1e6:.2f}M -> "
                f"{c['params_after']['total'] / 1e6:.2f}M "
                f"| {c['targeted_before'] / 1e6:.2f}M -> {c['targeted_after'] / 1e6:.2f}M "
                f"| {c['layers_factorized']} / {c['layers_targeted']} | {fmt_acc(c['before']['acc'])} "
                f"| {fmt_acc(c['compressed']['acc'])} | {fmt_acc(c['recovered']['acc'])} | {closed} "
                f"| {fmt_loss(c['before']['loss'])} | {fmt_loss(c['compressed']['loss'])} | "
                f"{fmt_loss(c['recovered']['loss'])} |"
            )
        lines.append("")
    if target_rows:
        lines += ["### Targets (issue 4)", "", "| target | where | measured | result |", "|---|---|---|---|"]
        lines += [f"| {t} | {w} | {m} | {verdict(ok)} |" for t, w, m, ok in target_rows]
        lines.append("")
    lines += [
        "Notes: delta mode keeps gradients and AdamW state for the selected entries only, and its backward pass "
        "computes the weight gradient at those entries only (a sampled matmul), so a step costs about what LoRA's "
        "does. The int64 `indices` (8 bytes per entry) are persistent "
        "memory that LoRA does not have; they are listed apart, not counted as gradient or optimizer state. "
        "Part wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in part_s.items()) + ".",
    ]
    return lines


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _test_rows(accuracy: dict) -> str:
    rows = [r for rs in accuracy.values() for r in rs]
    return str(rows[0]["test_examples"]) if rows else "?"


def plot(timing: dict, accuracy: dict, compression: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_ft.io import save_with_atomic

    panels = [
        p
        for p, present in (("step", timing), ("bytes", timing), ("acc", accuracy), ("compress", compression))
        if present
    ]
    if not panels:
        return
    cols = min(2, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    colors = {"lora": "tab:blue", "sparse": "tab:orange", "full": "tab:gray"}
    for ax, panel in zip(axes.flat, panels):
        if panel in ("step", "bytes"):
            labels, values, cs = [], [], []
            for model, per_method in timing.items():
                for method, t in per_method.items():
                    labels.append(f"{MODELS[model]['title']}\n{method}")
                    values.append(t["step_vs_lora"] if panel == "step" else t["grad_opt_bytes"] / MB)
                    cs.append(colors[method])
            ax.bar(range(len(values)), values, color=cs)
            ax.set_xticks(range(len(values)), labels, fontsize=7)
            if panel == "step":
                ax.axhline(1.3, color="red", ls="--", lw=1, label="target 1.3 x LoRA")
                ax.set_ylabel("median step time / LoRA's")
                ax.legend(fontsize=7)
            else:
                ax.set_yscale("log")
                ax.set_ylabel("gradients + AdamW state (MB, log)")
        elif panel == "acc":
            rows = [(MODELS[m]["title"], r) for m, rs in accuracy.items() for r in rs]
            ax.barh(
                range(len(rows)), [100 * r["acc_median"] for _, r in rows], color=[colors[r["method"]] for _, r in rows]
            )
            ax.set_yticks(range(len(rows)), [f"{t}: {r['label']}" for t, r in rows], fontsize=7)
            lo = min(100 * r["acc_median"] for _, r in rows)
            ax.set_xlim(max(0, lo - 5), 100 * max(r["acc_median"] for _, r in rows) + 2)
            ax.invert_yaxis()
            ax.set_xlabel("MR test accuracy (%)")
        else:
            stages = ("before", "compressed", "recovered")
            width = 0.8 / len(compression)
            for i, c in enumerate(compression):
                ax.bar([s + i * width for s in range(3)], [100 * c[s]["acc"] for s in stages], width, label=c["method"])
            ax.set_xticks([s + 0.4 - width / 2 for s in range(3)], list(stages))
            lo = min(100 * c[s]["acc"] for c in compression for s in stages)
            ax.set_ylim(max(0, lo - 5), 100 * max(c[s]["acc"] for c in compression for s in stages) + 3)
            ax.set_ylabel("MR test accuracy (%)")
            ax.legend(fontsize=8)
            ax.set_title(f"MiniLM, low rank at param_ratio={compression[0]['param_ratio']:g}", fontsize=9)
        ax.grid(axis="y" if panel != "acc" else "x", alpha=0.3)
    fig.suptitle("Sparse fine-tuning (delta) vs LoRA vs full fine-tuning; low-rank compression (CPU)")
    fig.tight_layout()
    save_with_atomic(out_png, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------------------
def timing_configs(args) -> list[dict]:
    return [
        {
            "name": f"{MODELS[m]['title']}: {method_name(method, args.rank, 'random')}",
            "kind": "timing",
            "model": m,
            "method": method,
            "rank": args.rank,
            "steps": args.steps,
            "warmup": args.warmup,
        }
        for m in args.models
        for method in ("lora", "sparse", "full")
    ]


def accuracy_configs(args, save_dir: str | None) -> list[dict]:
    configs = []
    plans = [("minilm", args.accuracy_steps, 32, args.full_lr)]
    if args.smollm2_accuracy:
        plans.append(("smollm2", args.smollm2_steps, args.smollm2_batch_size, args.smollm2_full_lr))
    for seed in args.seeds:  # seeds outermost: a scaled-up run interleaves the methods
        for model, steps, batch_size, full_lr in plans:
            methods = [
                ("lora", None, args.lora_lr),
                *(("sparse", c, args.sparse_lr) for c in args.criteria),
                ("full", None, full_lr),
            ]
            for method, criterion, lr in methods:
                label = method_name(method, args.rank, criterion)
                cfg = {
                    "name": f"{MODELS[model]['title']}: {label} seed {seed}",
                    "kind": "accuracy",
                    "model": model,
                    "label": label,
                    "method": method,
                    "criterion": criterion,
                    "rank": args.rank,
                    "lr": lr,
                    "weight_decay": 0.01 if method == "full" else 0.0,
                    "warmup_ratio": 0.1,
                    "steps": steps,
                    "batch_size": batch_size,
                    "seed": seed,
                    "calibration_batches": args.calibration_batches,
                    "max_test_examples": args.max_test_examples,
                }
                if save_dir and model == "minilm" and method == "full" and seed == args.seeds[0]:
                    cfg["save_dir"] = save_dir
                configs.append(cfg)
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["timing", "accuracy", "compression"],
        default=["timing", "accuracy", "compression"],
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank = sparse lora_equivalent_rank")
    g = parser.add_argument_group("step time / memory")
    g.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    g.add_argument("--repeats", type=int, default=2)
    g.add_argument("--steps", type=int, default=3)
    g.add_argument("--warmup", type=int, default=1)
    g = parser.add_argument_group("accuracy")
    g.add_argument("--accuracy-steps", type=int, default=60, help="MiniLM training steps per method")
    g.add_argument("--seeds", type=int, nargs="+", default=[0])
    g.add_argument("--criteria", nargs="+", default=["random", "gradient", "fisher"])
    g.add_argument("--calibration-batches", type=int, default=8)
    g.add_argument("--lora-lr", type=float, default=1e-3)
    g.add_argument("--sparse-lr", type=float, default=1e-3)
    g.add_argument("--full-lr", type=float, default=1e-4)
    g.add_argument("--max-test-examples", type=int, default=None, help="test on the first N rows (default: all 1060)")
    g.add_argument("--smollm2-accuracy", action="store_true", help="also train / test SmolLM2 (slow on CPU)")
    g.add_argument("--smollm2-steps", type=int, default=60)
    g.add_argument("--smollm2-batch-size", type=int, default=8)
    g.add_argument("--smollm2-full-lr", type=float, default=2e-5)
    g = parser.add_argument_group("compression")
    g.add_argument("--param-ratio", type=float, default=0.5)
    g.add_argument("--compress-methods", nargs="+", choices=["svd", "asvd"], default=["svd", "asvd"])
    g.add_argument("--compress-calibration-batches", type=int, default=4)
    g.add_argument("--recovery-steps", type=int, default=40)
    g.add_argument("--recovery-lr", type=float, default=1e-3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(run_worker, args)

    command = " ".join(["python benchmarks/bench_sparse.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="bench_sparse_"))
    base_dir = str(work / "minilm_full_ft")
    runs: dict[str, list[dict]] = {}
    part_s: dict[str, float] = {}
    t_configs = a_configs = c_configs = []
    try:
        if "timing" in args.parts:
            start = time.perf_counter()
            t_configs = timing_configs(args)
            runs.update(run_interleaved(__file__, t_configs, args.repeats, []))
            part_s["timing"] = time.perf_counter() - start
        if "accuracy" in args.parts or "compression" in args.parts:
            start = time.perf_counter()
            want_base = "compression" in args.parts
            if "accuracy" in args.parts:
                a_configs = accuracy_configs(args, base_dir if want_base else None)
            else:  # only the fully fine-tuned MiniLM that compression starts from
                a_configs = [dict(c, base_only=True) for c in accuracy_configs(args, base_dir) if c.get("save_dir")]
            runs.update(run_interleaved(__file__, a_configs, 1, []))
            part_s["accuracy" if "accuracy" in args.parts else "compression base"] = time.perf_counter() - start
        if "compression" in args.parts:
            start = time.perf_counter()
            c_configs = [
                {
                    "name": f"MiniLM-L6: {m} param_ratio={args.param_ratio:g}",
                    "kind": "compress",
                    "method": m,
                    "param_ratio": args.param_ratio,
                    "base_dir": base_dir,
                    "rank": args.rank,
                    "lr": args.recovery_lr,
                    "warmup_ratio": 0.1,
                    "steps": args.recovery_steps,
                    "calibration_batches": args.compress_calibration_batches,
                    "max_test_examples": args.max_test_examples,
                }
                for m in args.compress_methods
            ]
            runs.update(run_interleaved(__file__, c_configs, 1, []))
            part_s["compression"] = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    timing = summarise_timing(t_configs, runs)
    accuracy = summarise_accuracy(a_configs, runs)
    compression = summarise_compression(c_configs, runs)
    target_rows = targets(timing, accuracy, compression)
    info = machine()
    lines = markdown(args, info, command, timing, accuracy, compression, target_rows, part_s)
    payload = {
        "command": command,
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "timing": timing,
        "accuracy": accuracy,
        "compression": compression,
        "targets": [{"target": t, "where": w, "measured": m, "met": ok} for t, w, m, ok in target_rows],
        "part_wall_s": part_s,
        "configs": t_configs + a_configs + c_configs,
        "runs": runs,
    }
    write_results(args.out, "sparse", payload, lines)
    plot(timing, accuracy, compression, Path(args.out) / "sparse.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
