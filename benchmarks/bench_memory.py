"""Peak memory and step time of the ways to fine-tune SmolLM2-135M on one batch shape: full fine-tuning, LoRA over a
float32 / int8 / NF4 base in one process, and LoRA on 2 processes (DDP, FSDP2 loading the whole model on every rank,
FSDP2 with sharded loading), per process and including model loading.

    python benchmarks/bench_memory.py [--steps 3] [--warmup 1] [--repeats 1] [--only NF4 FSDP2]
    python benchmarks/bench_memory.py --quick     # tiny random Llama and synthetic rows: checks the pipeline only
    python benchmarks/bench_memory.py --gpu       # needs CUDA: a ~1B random Llama in bf16 (memory, tokens/s, MFU)

CPU mode: real MR instruction batches, a global batch of 4 packed rows x 256 tokens for every row (the 2-process rows
take 2 rows per rank), LoRA r=8 alpha=16 on every linear layer (``LoRAModule``, ``quantize_base`` for the quantised
rows), full fine-tuning with ``SFTModule``, AdamW, Lightning ``Trainer``. Every configuration and repeat runs in its
own process (single-process rows through ``harness.run_interleaved``, 2-process rows as their own
``torchrun --nproc_per_node=2`` job through ``bench_distributed.run_torchrun``), so peaks never mix. Per process it
records the peak RSS over its whole life (``VmHWM``: imports, loading, sharding, training), the RSS right before
``Trainer.fit`` (libraries imported, no model yet: the floor every row pays), the peak in training alone (VmHWM reset
at the first step) and the median step time; a 2-process row reports its larger rank. Writes
``benchmarks/results/memory.{json,md,png}``.

GPU mode (``--gpu``): one process per row on one GPU: a randomly initialised ~1.07B Llama (Llama-3.2-1B's shape,
``bench_distributed.LLAMA_1B``) in bf16: full fine-tuning, LoRA over the bf16 base, over int8 and over NF4, MR batches
packed to 8 x 2048 tokens; ``torch.cuda.max_memory_allocated`` (whole run and training alone), tokens/s and MFU
(``6 N tokens/s / peak``; 4N for the adapter rows, whose frozen base computes no weight gradients). Writes
``memory_gpu.{json,md}``. ``--gpu --dry-run`` runs that pipeline on the CPU with a tiny model (measures nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_distributed import (
    H200_BF16_FLOPS,
    LLAMA_1B,
    LORA,
    TINY_LLAMA,
    check_gpu_available,
    fmt,
    make_tiny_model,
    positive,
    probe_class,
    run_torchrun,
)
from harness import (
    BATCH_SHAPES,
    RESULT_PREFIX,
    ROOT,
    current_rss_mb,
    failure_lines,
    machine,
    quiet_trainer,
    run_worker,
    worker_main,
    write_results,
)

MODEL = BATCH_SHAPES["smollm2"]["model"]
BATCH, MAX_LENGTH = BATCH_SHAPES["smollm2"]["batch_size"], BATCH_SHAPES["smollm2"]["max_length"]
NPROC = 2
# "kind": single (one process) or the strategy of a 2-process row
CONFIGS = [
    {"name": "full FT", "kind": "single", "method": "full"},
    {"name": "LoRA, fp32 base", "kind": "single", "method": "lora"},
    {"name": "LoRA, int8 base", "kind": "single", "method": "lora", "quantize_base": "int8"},
    {"name": "LoRA, NF4 base", "kind": "single", "method": "lora", "quantize_base": "nf4"},
    # activations dominate the rows above; with them recomputed, the weights' share (what a quantised base saves) shows
    {"name": "LoRA, fp32 base, grad. checkpointing", "kind": "single", "method": "lora", "checkpointing": True},
    {
        "name": "LoRA, NF4 base, grad. checkpointing",
        "kind": "single",
        "method": "lora",
        "quantize_base": "nf4",
        "checkpointing": True,
    },
    {"name": "DDP LoRA, 2 ranks", "kind": "ddp", "method": "lora"},
    {"name": "FSDP2 LoRA, 2 ranks, full load per rank", "kind": "fsdp2", "method": "lora"},
    {"name": "FSDP2 LoRA, 2 ranks, sharded loading", "kind": "fsdp2", "method": "lora", "sharded_loading": True},
    # the same pair with activations recomputed: what sharding the weights saves once activations are small
    {"name": "DDP LoRA, 2 ranks, grad. checkpointing", "kind": "ddp", "method": "lora", "checkpointing": True},
    {
        "name": "FSDP2 LoRA, 2 ranks, sharded loading, grad. checkpointing",
        "kind": "fsdp2",
        "method": "lora",
        "sharded_loading": True,
        "checkpointing": True,
    },
]
GPU_CONFIGS = [
    {"name": "full FT (bf16)", "method": "full"},
    {"name": "LoRA, bf16 base", "method": "lora"},
    {"name": "LoRA, int8 base", "method": "lora", "quantize_base": "int8"},
    {"name": "LoRA, NF4 base", "method": "lora", "quantize_base": "nf4"},
]
QUICK_ROWS = 64


# ---- one single-process configuration, in its own process ---------------------------------------------------------
def build_module(cfg: dict, model):
    from lightning_ft import LoRAModule, SFTModule

    if cfg["method"] == "full":
        return SFTModule(model) if isinstance(model, str) else SFTModule(model=model)
    kwargs = {
        **LORA,
        "quantize_base": cfg.get("quantize_base"),
        "gradient_checkpointing": cfg.get("checkpointing", False),
    }
    return LoRAModule(model, **kwargs) if isinstance(model, str) else LoRAModule(model=model, **kwargs)


def single_worker(cfg: dict, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch
    from bench_distributed import instruction_data

    L.seed_everything(0, verbose=False)
    data = instruction_data(cfg["model"], cfg)
    module = build_module(cfg, cfg["model"])
    probe = probe_class()(args.warmup)
    trainer = quiet_trainer(
        args.warmup + args.steps,
        [probe],
    )
    before_fit = current_rss_mb()
    trainer.fit(module, data)
    return {"ranks": [{**probe.rec, "before_fit_rss_mb": before_fit, "threads": torch.get_num_threads()}]}


# ---- summary -----------------------------------------------------------------------------------------------------
def summarise(cfg: dict, runs: list[list[dict]]) -> dict:
    """Medians over repeats and steps (a step's time is its slowest rank's); memory is the largest rank's, the
    median over repeats."""
    step_s = [max(steps) for run in runs for steps in zip(*(r["step_s"] for r in run))]
    tokens = [sum(toks) for run in runs for toks in zip(*(r["tokens"] for r in run))]

    def per_run(key: str) -> float | None:
        values = [max(r[key] for r in run) for run in runs if all(r.get(key) is not None for r in run)]
        return statistics.median(values) if values else None

    state = {k: max(r["state_bytes"][k] for run in runs for r in run) for k in ("params", "grads", "optimizer")}
    reports = [r.get("load_report") for run in runs for r in run if r.get("load_report")]
    return {
        **{k: v for k, v in cfg.items() if k not in ("model", "train_file")},
        "processes": len(runs[0]),
        "trainable_params": runs[0][0]["trainable_params"],
        "total_params": runs[0][0]["total_params"],
        "peak_rss_mb": per_run("peak_rss_mb"),
        "setup_peak_rss_mb": per_run("setup_peak_rss_mb"),
        "train_peak_rss_mb": per_run("train_peak_rss_mb"),
        "before_fit_rss_mb": per_run("before_fit_rss_mb"),
        "step_s": statistics.median(step_s),
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, step_s)),
        "state_bytes": state,
        "loss": statistics.median(v for run in runs for v in run[0]["loss"]),
        "read_share": max(r["elements_read"] / r["elements_full"] for r in reports) if reports else None,
    }


def ratio(by: dict, a: str, b: str, key: str = "peak_rss_mb") -> float | None:
    if a in by and b in by and by[a].get(key) and by[b].get(key):
        return by[a][key] / by[b][key]
    return None


def ratios_of(by: dict) -> dict[str, float]:
    pairs = {
        "nf4_vs_fp32_lora_peak_rss": ("LoRA, NF4 base", "LoRA, fp32 base", "peak_rss_mb"),
        "int8_vs_fp32_lora_peak_rss": ("LoRA, int8 base", "LoRA, fp32 base", "peak_rss_mb"),
        "nf4_vs_fp32_lora_step": ("LoRA, NF4 base", "LoRA, fp32 base", "step_s"),
        "int8_vs_fp32_lora_step": ("LoRA, int8 base", "LoRA, fp32 base", "step_s"),
        "nf4_vs_fp32_lora_checkpointed_peak_rss": (
            "LoRA, NF4 base, grad. checkpointing",
            "LoRA, fp32 base, grad. checkpointing",
            "peak_rss_mb",
        ),
        "nf4_vs_fp32_lora_checkpointed_step": (
            "LoRA, NF4 base, grad. checkpointing",
            "LoRA, fp32 base, grad. checkpointing",
            "step_s",
        ),
        "fsdp2_sharded_vs_ddp_peak_rss": ("FSDP2 LoRA, 2 ranks, sharded loading", "DDP LoRA, 2 ranks", "peak_rss_mb"),
        "fsdp2_full_load_vs_ddp_peak_rss": (
            "FSDP2 LoRA, 2 ranks, full load per rank",
            "DDP LoRA, 2 ranks",
            "peak_rss_mb",
        ),
        "fsdp2_sharded_vs_ddp_setup_peak_rss": (
            "FSDP2 LoRA, 2 ranks, sharded loading",
            "DDP LoRA, 2 ranks",
            "setup_peak_rss_mb",
        ),
        "fsdp2_sharded_vs_full_load_setup_peak_rss": (
            "FSDP2 LoRA, 2 ranks, sharded loading",
            "FSDP2 LoRA, 2 ranks, full load per rank",
            "setup_peak_rss_mb",
        ),
        "fsdp2_sharded_vs_ddp_step": ("FSDP2 LoRA, 2 ranks, sharded loading", "DDP LoRA, 2 ranks", "step_s"),
        "fsdp2_sharded_vs_ddp_checkpointed_peak_rss": (
            "FSDP2 LoRA, 2 ranks, sharded loading, grad. checkpointing",
            "DDP LoRA, 2 ranks, grad. checkpointing",
            "peak_rss_mb",
        ),
    }
    out = {}
    for name, (a, b, key) in pairs.items():
        value = ratio(by, a, b, key)
        if value is not None:
            out[name] = value
    # the same ratios over the memory above the floor every process pays (libraries imported, before fit)
    for name, (a, b, key) in pairs.items():
        if key == "peak_rss_mb" and a in by and b in by:
            if by[a]["before_fit_rss_mb"] is None or by[b]["before_fit_rss_mb"] is None:
                continue
            above = [by[x]["peak_rss_mb"] - by[x]["before_fit_rss_mb"] for x in (a, b)]
            if above[1] > 0:
                out[name.replace("_peak_rss", "_peak_rss_above_floor")] = above[0] / above[1]
    return out


def markdown(results: list[dict], ratios: dict, header: str) -> list[str]:
    lines = [
        header,
        "",
        "| configuration | processes | trainable params | peak RSS per process, incl. loading (MB) | RSS before fit "
        "(MB) | peak above it (MB) | peak loading + setting up (MB) | peak in training (MB) | median step (s) | "
        "tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        above = None if r["before_fit_rss_mb"] is None else r["peak_rss_mb"] - r["before_fit_rss_mb"]
        lines.append(
            f"| {r['name']} | {r['processes']} | {r['trainable_params'] / 1e6:.2f}M | {fmt(r['peak_rss_mb'])} | "
            f"{fmt(r['before_fit_rss_mb'])} | {fmt(above)} | {fmt(r['setup_peak_rss_mb'])} | "
            f"{fmt(r['train_peak_rss_mb'])} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} |"
        )
    if ratios:
        lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    return lines


def plot(results: list[dict], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_ft.io import save_with_atomic

    names = [r["name"] for r in results]
    y = list(range(len(names)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.55 * len(names) + 2.2))
    floor = [r["before_fit_rss_mb"] or 0 for r in results]
    axes[0].barh(y, floor, color="tab:gray", height=0.5, label="RSS before fit (libraries)")
    axes[0].barh(
        y,
        [r["peak_rss_mb"] - f for r, f in zip(results, floor)],
        left=floor,
        color="tab:blue",
        height=0.5,
        label="peak above it (model, loading, training)",
    )
    setup = [(i, r["setup_peak_rss_mb"]) for i, r in zip(y, results) if r["setup_peak_rss_mb"]]
    axes[0].scatter(
        [v for _, v in setup], [i for i, _ in setup], marker="D", color="black", zorder=3, label="peak loading + setup"
    )
    axes[0].set_xlabel("peak RSS per process, incl. loading (MB)")
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    axes[1].barh(y, [r["step_s"] for r in results], color="tab:orange", height=0.5)
    axes[1].set_xlabel("median step time (s)")
    for i, ax in enumerate(axes):
        ax.set_yticks(y)
        ax.set_yticklabels(names if i == 0 else [])
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_with_atomic(out_png, lambda p: fig.savefig(p, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


# ---- CPU mode ----------------------------------------------------------------------------------------------------
def quick_rows(path: Path, n: int = QUICK_ROWS) -> str:
    """Synthetic instruction rows with answers of unequal lengths (for --quick)."""
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
    with open(path, "w") as f:
        for i in range(n):
            answer = " ".join(words[(i + j) % len(words)] for j in range(1 + i % 24))
            f.write(json.dumps({"prompt": f"repeat after me {words[i % len(words)]}", "response": answer}) + "\n")
    return str(path)


def cpu_main(args: argparse.Namespace) -> None:
    if args.malloc_mmap_threshold:
        # inherited by every process of every row (glibc reads it at start-up): allocations above it are mmap'd
        # and go back to the system when freed, so a peak is memory in use, not heap glibc kept after a step
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    configs = [c for c in CONFIGS if not args.only or any(o.lower() in c["name"].lower() for o in args.only)]
    if args.skip:
        configs = [c for c in configs if not any(s.lower() in c["name"].lower() for s in args.skip)]
    if not configs:
        sys.exit(f"--only / --skip leave no configuration of {[c['name'] for c in CONFIGS]}")
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        common: dict = {"batch_size": BATCH, "max_length": MAX_LENGTH, "model": MODEL}
        label = "SmolLM2-135M-Instruct"
        if args.quick:
            label = "tiny random Llama (--quick: checks the pipeline, measures nothing)"
            common.update(model=make_tiny_model(Path(tmp) / "tiny"), train_file=quick_rows(Path(tmp) / "rows.jsonl"))
        runs: dict[str, list[list[dict]]] = {c["name"]: [] for c in configs}
        errors: dict[str, str] = {}
        # 2-process rows first (the table keeps CONFIGS' order); the files are rewritten after every row, so an
        # interrupted run still leaves the rows it finished
        order = sorted(range(len(configs)), key=lambda i: configs[i]["kind"] == "single")
        for rep in range(args.repeats):
            for i in order:
                c = configs[i]
                if c["name"] in errors:
                    continue
                start = time.perf_counter()
                if c["kind"] == "single":
                    extra = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                    result, error = run_worker(__file__, {**c, **common}, extra)
                    ranks = result["ranks"] if result else None
                else:
                    cfg = {**c, **common, "strategy": c["kind"], "batch_size": BATCH // NPROC}
                    try:
                        ranks, error = run_torchrun(cfg, args, Path(tmp) / f"r{rep}_c{i}"), None
                    except SystemExit as exit_:  # run_torchrun's report of a failed job
                        ranks, error = None, str(exit_)
                if error is not None:
                    errors[c["name"]] = error
                    print(f"{c['name']} failed: {error[-2000:]}", flush=True)
                else:
                    runs[c["name"]].append(ranks)
                    peak = max(r["peak_rss_mb"] for r in ranks)
                    print(
                        f"repeat {rep + 1}/{args.repeats} {c['name']}: {time.perf_counter() - start:.0f} s, peak "
                        f"RSS {peak:.0f} MB",
                        flush=True,
                    )
                report(args, configs, runs, errors, label, quiet=True)
    report(args, configs, runs, errors, label)


def report(
    args: argparse.Namespace,
    configs: list[dict],
    runs: dict[str, list[list[dict]]],
    errors: dict[str, str],
    label: str,
    quiet: bool = False,
    command: str | None = None,
) -> None:
    """Write the table, JSON and PNG of the rows measured so far (``command``: the one that measured them)."""
    results = [summarise(c, runs[c["name"]]) for c in configs if runs[c["name"]]]
    if not results:
        return
    ratios = ratios_of({r["name"]: r for r in results})
    info = machine()
    command = command or shlex.join(["python", "benchmarks/bench_memory.py", *sys.argv[1:]])
    if args.note:
        info["note"] = args.note
    title = (
        f"{label}: global batch {BATCH} x {MAX_LENGTH} packed tokens, forward + backward + AdamW, LoRA r=8 all-linear"
    )
    header = (
        f"{title}; medians of {args.repeats} run(s) x {args.steps} steps after {args.warmup} warm-up, "
        f"{info['cpus']} CPUs, torch {info['torch']}. Every configuration runs in its own process (2-process rows: "
        f"their own `torchrun --nproc_per_node=2` job, gloo, 1 thread per rank; the larger rank is shown). "
        f"Single-process rows use every core, so step times compare within each group. "
        + (
            f"Every process ran with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (freed tensors go back to "
            "the system at once, so peaks are memory in use, not heap kept by glibc). "
            if args.malloc_mmap_threshold
            else "glibc's default (adaptive) malloc settings. "
        )
        + f"Command: `{command}`"
        + (f". {args.note}" if args.note else "")
    )
    lines = markdown(results, ratios, header)
    for name, error in errors.items():
        last = [x for x in error.strip().splitlines() if x.strip()]
        lines.append(f"\n{name} failed: {error.splitlines()[0]}; {last[-1] if last else ''}")
    if pending := [c["name"] for c in configs if not runs[c["name"]] and c["name"] not in errors]:
        lines.append(f"\nNot measured (the run was stopped before them): {', '.join(pending)}")
    payload = {
        "errors": errors,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "command": command,
        "machine": info,
        "model": label,
        "global_batch": BATCH,
        "max_length": MAX_LENGTH,
        "lora": LORA,
        "results": results,
        "ratios": ratios,
        "runs": runs,
    }
    stem = "memory_quick" if args.quick else "memory"
    write_results(args.out, stem, payload, lines)
    plot(results, Path(args.out) / f"{stem}.png", title)
    if not quiet:
        print("\n".join(lines))


# ---- GPU mode ----------------------------------------------------------------------------------------------------
def gpu_worker(cfg: dict, args: argparse.Namespace) -> dict:
    """One row on one GPU (or, dry run, the CPU): a random bf16 Llama, tokens/s, memory, MFU."""
    import lightning as L
    import torch
    from bench_distributed import instruction_data
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_ft.callbacks.throughput import count_tokens
    from lightning_ft.models import load_tokenizer

    dry = cfg["dry_run"]
    device = "cpu" if dry else "cuda"
    torch.set_float32_matmul_precision("high")
    L.seed_everything(0, verbose=False)
    tokenizer = load_tokenizer(cfg["tokenizer"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(4096, args.max_length),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        **(TINY_LLAMA if dry else LLAMA_1B),
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    shape = {"batch_size": args.batch, "max_length": args.max_length, "max_train_examples": 400 if dry else None}
    data = instruction_data(tokenizer, {**shape, **cfg})  # the whole MR split on a GPU: enough 8 x 2048 batches
    module = build_module(cfg, model)
    times: list[float] = []
    tokens: list[int] = []
    seen = {"n": 0, "start": 0.0, "trainable": 0, "setup_peak": 0}

    def sync() -> None:
        if not dry:
            torch.cuda.synchronize()

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen["trainable"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            if not dry:
                seen["setup_peak"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync()
            seen["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync()
            seen["n"] += 1
            if seen["n"] > args.warmup:
                times.append(time.perf_counter() - seen["start"])
                tokens.append(count_tokens(batch))

    trainer = quiet_trainer(
        args.warmup + args.steps,
        [Clock()],
        accelerator="cpu" if dry else "cuda",
    )
    trainer.fit(module, data)
    if not times:
        raise RuntimeError("no timed steps: the data ran out before warm-up ended")
    flops_per_token = (6 if cfg["method"] == "full" else 4) * n_params
    tokens_per_s = statistics.median(t / s for t, s in zip(tokens, times))
    res = {
        "step_s": statistics.median(times),
        "tokens_per_s": tokens_per_s,
        "params": n_params,
        "trainable_params": seen["trainable"],
        "mfu": flops_per_token * tokens_per_s / args.peak_flops,
        "mfu_6n": 6 * n_params * tokens_per_s / args.peak_flops,
    }
    if not dry:
        res.update(
            setup_max_memory_allocated=seen["setup_peak"],
            train_max_memory_allocated=torch.cuda.max_memory_allocated(),
            gpu=torch.cuda.get_device_name(0),
        )
    return res


def gpu_main(args: argparse.Namespace) -> None:
    import subprocess

    check_gpu_available(args.dry_run)
    results, errors = [], {}
    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory(prefix="bench_memory_gpu_") as tmp:
        tokenizer = make_tiny_model(Path(tmp) / "tiny") if args.dry_run else MODEL
        extra = {"train_file": quick_rows(Path(tmp) / "rows.jsonl")} if args.dry_run else {}
        for c in GPU_CONFIGS:
            left = deadline - time.monotonic()
            if left < 30:
                errors[c["name"]] = "skipped: --time-limit reached"
                continue
            cfg = {**c, **extra, "dry_run": args.dry_run, "tokenizer": tokenizer}
            cmd = [sys.executable, __file__, "--gpu-worker", json.dumps(cfg), "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length)]
            cmd += ["--peak-flops", str(args.peak_flops)]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=left)
            except subprocess.TimeoutExpired:
                errors[c["name"]] = f"timed out (--time-limit {args.time_limit})"
                continue
            line = next((x for x in out.stdout.splitlines() if x.startswith(RESULT_PREFIX)), None)
            if line is None:
                errors[c["name"]] = out.stderr[-3000:]
                print(f"{c['name']} failed:\n{out.stderr[-3000:]}", flush=True)
                continue
            results.append({**c, **json.loads(line[len(RESULT_PREFIX) :])})
            print(f"{c['name']}: {results[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    gpu = next((r["gpu"] for r in results if "gpu" in r), "CPU (dry run)" if args.dry_run else "?")
    command = " ".join(["python benchmarks/bench_memory.py", *sys.argv[1:]])
    lines = [
        f"Random ~1.07B Llama (Llama-3.2-1B's shape) in bf16 on one {gpu}, MR batches packed to {args.batch} x "
        f"{args.max_length} tokens, AdamW; medians of {args.steps} steps after {args.warmup} warm-up. MFU = "
        f"(6 N for full FT, 4 N for adapters over a frozen base) x tokens/s / {args.peak_flops:.3g}. "
        f"Command: `{command}`",
        "",
        "| configuration | trainable | max_memory_allocated incl. loading (GiB) | in training (GiB) | step (s) | "
        "tokens/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]

    def gib(r: dict, key: str) -> str:
        return "-" if r.get(key) is None else f"{r[key] / 2**30:.2f}"

    for r in results:
        lines.append(
            f"| {r['name']} | {r['trainable_params'] / 1e6:.1f}M | {gib(r, 'setup_max_memory_allocated')} | "
            f"{gib(r, 'train_max_memory_allocated')} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.1f}% |"
        )
    lines += failure_lines(errors)
    if args.dry_run:
        lines.insert(0, "DRY RUN on the CPU with a tiny random model: these figures measure nothing.\n")
    payload = {"command": command, "machine": machine(), "results": results, "errors": errors, "gpu": gpu}
    write_results(args.out, "memory_gpu_dry_run" if args.dry_run else "memory_gpu", payload, lines)
    print("\n".join(lines))
    if errors:
        sys.exit(f"{len(errors)} GPU configuration(s) failed: {sorted(errors)}")


# ---- command line ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive(int), help="timed steps per run (default 3; --quick 1; --gpu 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 1; --gpu 3)")
    parser.add_argument("--repeats", type=positive(int), default=1, help="runs per configuration (CPU)")
    parser.add_argument("--only", nargs="*", help="configurations whose name contains one of these")
    parser.add_argument("--skip", nargs="*", help="leave out configurations whose name contains one of these")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, synthetic rows (a pipeline check)")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=131072,
        help="glibc MALLOC_MMAP_THRESHOLD_ for every process (bytes; 0: glibc's own adaptive threshold)",
    )
    parser.add_argument("--note", help="a remark recorded with the results (e.g. that the machine was shared)")
    parser.add_argument("--timeout", type=positive(float), default=1200, help="seconds for one torchrun job")
    parser.add_argument("--collective-timeout", type=positive(float), default=300, help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (needs CUDA)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: its pipeline on the CPU, tiny model")
    parser.add_argument("--peak-flops", type=positive(float), default=H200_BF16_FLOPS, help="--gpu: peak bf16 FLOP/s")
    parser.add_argument("--batch", type=positive(int), help="--gpu: packed rows per step (default 8)")
    parser.add_argument("--max-length", type=positive(int), help="--gpu: tokens per packed row (default 2048)")
    parser.add_argument("--time-limit", type=positive(float), default=570, help="--gpu: seconds for the whole run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the table from the saved JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.gpu or bool(args.gpu_worker)
    if args.dry_run and not gpu:
        parser.error("--dry-run goes with --gpu (for the CPU benchmark, --quick is the pipeline check)")
    if gpu and (args.quick or args.only or args.skip or args.repeats != 1):
        parser.error("--quick, --only, --skip and --repeats apply to the CPU benchmark, not --gpu")
    quick = args.quick or bool(args.worker and json.loads(args.worker).get("train_file"))
    args.steps = args.steps or (10 if gpu else 1 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if gpu:
        dry = args.dry_run or bool(args.gpu_worker and json.loads(args.gpu_worker).get("dry_run"))
        args.batch = args.batch or (2 if dry else 8)
        args.max_length = args.max_length or (256 if dry else 2048)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker_main(single_worker, args)
    if args.gpu_worker:
        print(RESULT_PREFIX + json.dumps(gpu_worker(json.loads(args.gpu_worker), args)), flush=True)
        return None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.render_only:
        return render_only(args)
    return gpu_main(args) if args.gpu else cpu_main(args)


def render_only(args: argparse.Namespace) -> None:
    """Write the table, JSON and PNG again from the runs a previous run recorded in ``memory(_quick).json`` (pass
    the settings it ran with: ``--steps``, ``--note``, ...)."""
    payload = json.loads((Path(args.out) / f"{'memory_quick' if args.quick else 'memory'}.json").read_text())
    names = set(payload["runs"])
    configs = [c for c in CONFIGS if c["name"] in names]
    report(args, configs, payload["runs"], payload.get("errors", {}), payload["model"], command=payload["command"])


if __name__ == "__main__":
    main()
