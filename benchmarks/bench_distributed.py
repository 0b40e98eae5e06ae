"""Distributed adapter training on 2 CPU processes: what each step communicates, what each rank holds, how long a step
takes; and, with ``--gpu``, bf16 LoRA throughput, memory and MFU with FSDP2 on one GPU.

    python benchmarks/bench_distributed.py [--steps 3] [--warmup 1] [--repeats 1] [--only DDP]
    python benchmarks/bench_distributed.py --gpu [--peak-flops 989e12]        # needs CUDA; at most ~10 minutes

CPU mode: SmolLM2-135M-Instruct on real MR instruction batches (2 packed rows x 256 tokens per rank, global batch 4),
LoRA r=8 on every linear layer (the ``LoRA`` callback of ``LoRAModule``) and full fine-tuning (``SFTModule``), under
``AdapterDDPStrategy(measure_communication=True)`` and ``AdapterFSDP2Strategy``. Every configuration and repeat is
its own ``torchrun --nproc_per_node=2`` job (gloo, ``OMP_NUM_THREADS=1``: the two processes share the machine's
cores); each rank writes a JSON file that this script collects. Per step it records the bytes DDP all-reduces (its
communication hook) and the bytes FSDP2 all-gathers and reduce-scatters (``torch.distributed``'s collectives, counted
as the unsharded tensor sizes); per rank the bytes of parameters, gradients and AdamW state it holds (local shards
for FSDP2) and its peak RSS, both over the whole process (model loading included) and over the training steps alone.
Writes ``benchmarks/results/distributed.{json,md,png}``. ``--tiny`` swaps SmolLM2 for a tiny random Llama (a smoke
test of the script, not a measurement).

GPU mode (``--gpu``): one process per model on one GPU, Lightning ``devices=1`` with ``AdapterFSDP2Strategy`` and
a bf16 mixed-precision policy (bf16 compute, float32 sharded weights, adapters and AdamW); LoRA r=8 all-linear on
SmolLM2-135M and on a randomly initialised ~1.07B Llama (Llama-3.2-1B's shape with SmolLM2's 49k vocabulary), MR
batches packed to 8 x 2048 tokens. Reports tokens/s, ``torch.cuda.max_memory_allocated`` and model FLOPs utilisation
``MFU = 6 * N_params * tokens/s / peak`` (``--peak-flops``, default the H200's 989 TFLOPS dense bf16). Writes
``distributed_gpu.{json,md}``. ``--gpu --dry-run`` runs that pipeline on the CPU with tiny models (measures nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    BATCH_SHAPES,
    RESULT_PREFIX,
    ROOT,
    current_rss_mb,
    failure_lines,
    machine,
    mr_datamodule,
    peak_rss_mb,
    quiet_trainer,
    vm_hwm_mb,
    write_results,
)

MODEL = BATCH_SHAPES["smollm2"]["model"]
MB = 2**20
NPROC = 2
CONFIGS = [
    {"name": "DDP LoRA r=8", "strategy": "ddp", "method": "lora"},
    {"name": "DDP full FT", "strategy": "ddp", "method": "full"},
    {"name": "FSDP2 LoRA r=8", "strategy": "fsdp2", "method": "lora"},
    {"name": "FSDP2 full FT", "strategy": "fsdp2", "method": "full"},
]
LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}
# CPU batches: per rank, the single-process benchmarks' 4 x 256 (harness.BATCH_SHAPES) split over the ranks
CPU_BATCH = BATCH_SHAPES["smollm2"]["batch_size"] // NPROC
CPU_MAX_LENGTH, CPU_ROWS = BATCH_SHAPES["smollm2"]["max_length"], BATCH_SHAPES["smollm2"]["max_train_examples"]
TINY_BATCH, TINY_MAX_LENGTH = 2, 256  # MR prompts with the chat template run past 64 tokens
# GPU: the ~1B Llama is Llama-3.2-1B's shape (16 x 2048, GQA 32/8 heads, MLP 8192, tied embeddings)
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
GPU_CONFIGS = [
    {"name": "SmolLM2-135M LoRA r=8", "model": "smollm2"},
    {"name": "Llama ~1B (random init) LoRA r=8", "model": "llama-1b"},
]
H200_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak of an H200 SXM (the H100 SXM's figure)


# ---- measuring inside a rank -----------------------------------------------------------------------------------
def local_bytes(t) -> int:
    """Bytes this rank holds of ``t``: its local shard for a DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(module, optimizer) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes held by this rank (shards under FSDP2)."""
    import torch

    params = list(module.parameters())
    optim = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": optim,
    }


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where not allowed.

    First hand freed heap memory back to the OS (glibc's ``malloc_trim``), so that memory freed after loading (the
    full model, once FSDP2 has sharded it) does not stay in the RSS the training peak starts from.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class CollectiveCounter:
    """Count the bytes FSDP2 all-gathers (unsharded output) and reduce-scatters (unsharded input).

    FSDP2 calls ``torch.distributed.all_gather_single`` / ``reduce_scatter_single`` through the module attribute at
    call time, so wrapping those two functions sees every collective it issues.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.all_gather = self.reduce_scatter = 0
        self.calls = 0
        self.installed = hasattr(dist, "all_gather_single") and hasattr(dist, "reduce_scatter_single")
        if not self.installed:
            return
        gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

        def all_gather_single(output_tensor, input_tensor, *args, **kwargs):
            self.all_gather += output_tensor.numel() * output_tensor.element_size()
            self.calls += 1
            return gather(output_tensor, input_tensor, *args, **kwargs)

        def reduce_scatter_single(output, input, *args, **kwargs):
            self.reduce_scatter += input.numel() * input.element_size()
            self.calls += 1
            return scatter(output, input, *args, **kwargs)

        dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single

    def reset(self) -> None:
        self.all_gather = self.reduce_scatter = self.calls = 0


def probe_class():
    import lightning as L

    from lightning_ft.callbacks.throughput import count_tokens
    from lightning_ft.strategies import trainable_bytes

    class Probe(L.Callback):
        """Per training step: wall time, tokens, loss and bytes communicated; at the end, what the rank holds."""

        def __init__(self, warmup: int, comm=None, collectives: CollectiveCounter | None = None) -> None:
            self.warmup, self.comm, self.collectives = warmup, comm, collectives
            self.rec: dict = {
                "step_s": [],
                "tokens": [],
                "loss": [],
                "allreduce_bytes": [],
                "allreduce_buckets": [],
                "all_gather_bytes": [],
                "reduce_scatter_bytes": [],
            }
            self._start = 0.0
            self._seen = 0

        def on_train_start(self, trainer, pl_module) -> None:
            self.rec["trainable_bytes"] = trainable_bytes(pl_module)  # global sizes, DTensor or not
            self.rec["trainable_params"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            self.rec["total_params"] = sum(p.numel() for p in pl_module.parameters())
            self.rec["setup_peak_rss_mb"] = peak_rss_mb()  # loading, injecting, wrapping / sharding
            self.rec["rss_reset"] = reset_peak_rss()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            for counter in (self.comm, self.collectives):
                if counter is not None:
                    counter.reset()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            elapsed = time.perf_counter() - self._start
            self._seen += 1
            if self._seen <= self.warmup:
                return
            rec = self.rec
            rec["step_s"].append(elapsed)
            rec["tokens"].append(count_tokens(batch))
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            rec["loss"].append(float(loss))
            if self.comm is not None:
                rec["allreduce_bytes"].append(self.comm.bytes)
                rec["allreduce_buckets"].append(self.comm.buckets)
            if self.collectives is not None:
                rec["all_gather_bytes"].append(self.collectives.all_gather)
                rec["reduce_scatter_bytes"].append(self.collectives.reduce_scatter)
            rec["state_bytes"] = state_bytes(pl_module, trainer.optimizers[0])  # grads and AdamW state now exist

        def on_train_end(self, trainer, pl_module) -> None:
            self.rec["train_peak_rss_mb"] = vm_hwm_mb() if self.rec.get("rss_reset") else None
            # peak_rss_mb (VmHWM) follows the reset: the setup peak taken before it keeps loading in
            self.rec["peak_rss_mb"] = max(peak_rss_mb(), self.rec["setup_peak_rss_mb"])

    return Probe


# ---- one CPU configuration, in each torchrun process -----------------------------------------------------------
def rank_worker(cfg: dict, args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    from lightning_ft import LoRAModule, SFTModule
    from lightning_ft.strategies import AdapterDDPStrategy, AdapterFSDP2Strategy

    L.seed_everything(0, verbose=False)
    devices = int(os.environ["LOCAL_WORLD_SIZE"])
    model = cfg["model"]
    data = instruction_data(model, cfg)
    if cfg["method"] == "lora":
        module = LoRAModule(model, **LORA, gradient_checkpointing=cfg.get("checkpointing", False))
    else:
        module = SFTModule(model)
    comm = collectives = None
    if cfg["strategy"] == "ddp":
        strategy = AdapterDDPStrategy(measure_communication=True, timeout=args.collective_timeout)
        comm = strategy.comm_counter
    else:
        sharded = cfg.get("sharded_loading", False)
        strategy = AdapterFSDP2Strategy(timeout=args.collective_timeout, sharded_loading=sharded)
        collectives = CollectiveCounter()
    probe = probe_class()(args.warmup, comm, collectives)
    trainer = quiet_trainer(
        args.warmup + args.steps,
        [probe],
        devices=devices,
        strategy=strategy,
        default_root_dir=args.result_dir,
    )
    before_fit = current_rss_mb()  # libraries imported, no model yet
    trainer.fit(module, data)
    rec = {
        "before_fit_rss_mb": before_fit,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "threads": torch.get_num_threads(),
        "collectives_counted": collectives.installed if collectives else None,
        "load_report": getattr(strategy, "load_report", None),  # sharded loading: what this rank read
        **probe.rec,
    }
    out = Path(args.result_dir) / f"rank{trainer.global_rank}.json"
    out.write_text(json.dumps(rec))


def instruction_data(model: str, cfg: dict):
    """Packed instruction batches of ``cfg["batch_size"]`` x ``cfg["max_length"]``: MR's training split, or the rows
    of ``cfg["train_file"]`` (a JSONL file) when given; the first ``cfg["max_train_examples"]`` rows (default
    ``CPU_ROWS``; ``None``: all)."""
    rows = cfg.get("max_train_examples", CPU_ROWS)  # None: the whole split
    kwargs = dict(max_length=cfg["max_length"], batch_size=cfg["batch_size"], packing=True, max_train_examples=rows)
    if cfg.get("train_file"):
        from lightning_ft import FineTuneDataModule

        return FineTuneDataModule(model, task="instruction", train=cfg["train_file"], **kwargs)
    return mr_datamodule(model, "instruction", **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(cfg: dict, args: argparse.Namespace, work: Path) -> list[dict]:
    """One configuration as its own 2-process torchrun job; the ranks' records, rank 0 first."""
    work.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={NPROC}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        __file__,
        "--rank-worker",
        json.dumps(cfg),
        "--result-dir",
        str(work),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    log = work / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks: the group this job started
            proc.wait()
            rc = f"timeout after {args.timeout} s"
    files = [work / f"rank{r}.json" for r in range(NPROC)]
    if rc != 0 or not all(f.exists() for f in files):
        text = log.read_text(errors="replace")
        first = text.find("Traceback")  # a rank's own error, not torchrun's summary of it
        sys.exit(
            f"{cfg['name']} failed ({rc}); from {log}:\n{text[first : first + 5000] if first >= 0 else text[-5000:]}"
        )
    return [json.loads(f.read_text()) for f in files]


def make_tiny_model(folder: Path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer, saved to ``folder`` (for --tiny and --dry-run)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_ft.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        **TINY_LLAMA,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ---- CPU summary -----------------------------------------------------------------------------------------------
def summarise_config(cfg: dict, runs: list[list[dict]]) -> dict:
    """Medians over repeats and steps; a step's time is its slowest rank's; memory is the largest rank's."""
    step_s = [max(ranks) for run in runs for ranks in zip(*(r["step_s"] for r in run))]
    tokens = [sum(toks) for run in runs for toks in zip(*(r["tokens"] for r in run))]
    rank0 = [run[0] for run in runs]

    def med(key: str) -> float | None:
        values = [v for r in rank0 for v in r[key]]
        return statistics.median(values) if values else None

    def worst(key: str) -> float | None:
        values = [r[key] for run in runs for r in run if r.get(key) is not None]
        return max(values) if values else None

    state = {k: max(r["state_bytes"][k] for run in runs for r in run) for k in ("params", "grads", "optimizer")}
    res = {
        **{k: v for k, v in cfg.items() if k not in ("model",)},
        "trainable_params": rank0[0]["trainable_params"],
        "total_params": rank0[0]["total_params"],
        "trainable_bytes": rank0[0]["trainable_bytes"],
        "allreduce_bytes": med("allreduce_bytes"),
        "allreduce_buckets": med("allreduce_buckets"),
        "all_gather_bytes": med("all_gather_bytes"),
        "reduce_scatter_bytes": med("reduce_scatter_bytes"),
        "step_s": statistics.median(step_s),
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, step_s)),
        "state_bytes": state,
        "state_total_bytes": sum(state.values()),
        "setup_peak_rss_mb": worst("setup_peak_rss_mb"),
        "train_peak_rss_mb": worst("train_peak_rss_mb"),
        "peak_rss_mb": worst("peak_rss_mb"),
        "loss": statistics.median(v for r in rank0 for v in r["loss"]),
    }
    if res["allreduce_bytes"] is not None:
        res["allreduce_vs_trainable"] = res["allreduce_bytes"] / res["trainable_bytes"]
    return res


def mb(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x / MB:,.{digits}f}"


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def plot_cpu(results: list[dict], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_ft.io import save_with_atomic

    names = [r["name"] for r in results]
    y = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(names) + 2.2))
    ax = axes[0]
    h = 0.27
    for i, (key, label, color) in enumerate(
        (
            ("allreduce_bytes", "all-reduce (DDP)", "tab:blue"),
            ("all_gather_bytes", "all-gather (FSDP2)", "tab:purple"),
            ("reduce_scatter_bytes", "reduce-scatter (FSDP2)", "tab:red"),
        )
    ):
        ax.barh([v + (i - 1) * h for v in y], [(r[key] or 0) / MB for r in results], height=h, label=label, color=color)
    ax.scatter(
        [r["trainable_bytes"] / MB for r in results],
        y,
        marker="|",
        s=300,
        color="black",
        zorder=3,
        label="trainable parameters",
    )
    ax.set_xscale("log")
    ax.set_xlabel("MB per step (unsharded tensor sizes)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    ax = axes[1]
    left = [0.0] * len(results)
    for key, color in (("params", "tab:gray"), ("grads", "tab:orange"), ("optimizer", "tab:green")):
        vals = [r["state_bytes"][key] / MB for r in results]
        ax.barh(y, vals, left=left, color=color, label=key, height=0.5)
        left = [a + b for a, b in zip(left, vals)]
    ax.scatter(
        [r["train_peak_rss_mb"] or r["peak_rss_mb"] for r in results],
        y,
        marker="D",
        color="black",
        label="peak RSS in training",
        zorder=3,
    )
    ax.set_xlabel("MB per rank")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    axes[2].barh(y, [r["step_s"] for r in results], color="tab:blue", height=0.5)
    axes[2].set_xlabel("median step time (s)")
    for i, ax in enumerate(axes):
        ax.set_yticks(y)
        ax.set_yticklabels(names if i == 0 else [])
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_with_atomic(out_png, lambda p: fig.savefig(p, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def cpu_main(args: argparse.Namespace) -> None:
    configs = [c for c in CONFIGS if not args.only or any(o.lower() in c["name"].lower() for o in args.only)]
    if not configs:
        sys.exit(f"--only {args.only} matches no configuration of {[c['name'] for c in CONFIGS]}")
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        if args.tiny:
            model, batch, length, label = (
                make_tiny_model(Path(tmp) / "tiny"),
                TINY_BATCH,
                TINY_MAX_LENGTH,
                "tiny random Llama",
            )
        else:
            model, batch, length, label = MODEL, CPU_BATCH, CPU_MAX_LENGTH, "SmolLM2-135M-Instruct"
        runs: dict[str, list[list[dict]]] = {c["name"]: [] for c in configs}
        for rep in range(args.repeats):
            for i, c in enumerate(configs):
                cfg = {**c, "model": model, "batch_size": batch, "max_length": length}
                start = time.perf_counter()
                ranks = run_torchrun(cfg, args, Path(tmp) / f"r{rep}_c{i}")
                runs[c["name"]].append(ranks)
                print(
                    f"repeat {rep + 1}/{args.repeats} {c['name']}: {time.perf_counter() - start:.0f} s, median step "
                    f"{statistics.median(max(s) for s in zip(*(r['step_s'] for r in ranks))):.2f} s",
                    flush=True,
                )
    results = [summarise_config(c, runs[c["name"]]) for c in configs]
    by = {r["name"]: r for r in results}
    ratios = {}
    if {"DDP LoRA r=8", "DDP full FT"} <= by.keys():
        ratios["allreduce_lora_vs_full"] = by["DDP LoRA r=8"]["allreduce_bytes"] / by["DDP full FT"]["allreduce_bytes"]
    for method in ("LoRA r=8", "full FT"):
        ddp, fsdp = by.get(f"DDP {method}"), by.get(f"FSDP2 {method}")
        if ddp and fsdp:
            key = method.split()[0].lower()
            ratios[f"{key}_fsdp2_vs_ddp_state"] = fsdp["state_total_bytes"] / ddp["state_total_bytes"]
            if fsdp["train_peak_rss_mb"] and ddp["train_peak_rss_mb"]:
                ratios[f"{key}_fsdp2_vs_ddp_train_peak_rss"] = fsdp["train_peak_rss_mb"] / ddp["train_peak_rss_mb"]
            ratios[f"{key}_fsdp2_vs_ddp_peak_rss"] = fsdp["peak_rss_mb"] / ddp["peak_rss_mb"]
            ratios[f"{key}_fsdp2_vs_ddp_step"] = fsdp["step_s"] / ddp["step_s"]

    info = machine()  # this process's; the ranks' own thread counts follow
    info["rank_threads"] = sorted({r["threads"] for rs in runs.values() for run in rs for r in run})
    command = " ".join(["python benchmarks/bench_distributed.py", *sys.argv[1:]])
    title = f"{label}, 2 CPU processes (gloo, 1 thread each), {batch} x {length} packed tokens per rank"
    lines = [
        f"{title}, MR instruction batches, forward + backward + AdamW; medians of {args.repeats} run(s) x "
        f"{args.steps} steps after {args.warmup} warm-up ({info['cpus']} CPUs shared by the 2 processes, "
        f"torch {info['torch']}). Each configuration is its own `torchrun --nproc_per_node=2` job. "
        f"Command: `{command}`",
        "",
        "Communication per optimizer step (per rank; collective payload = unsharded tensor size):",
        "",
        "| configuration | trainable params | trainable MB | all-reduced MB (DDP) | buckets | all-reduced / trainable "
        "| all-gathered MB (FSDP2) | reduce-scattered MB (FSDP2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = fmt(r.get("allreduce_vs_trainable"), ".4f")
        lines.append(
            f"| {r['name']} | {r['trainable_params'] / 1e6:.2f}M | {mb(r['trainable_bytes'], 2)} | "
            f"{mb(r['allreduce_bytes'], 2)} | {fmt(r['allreduce_buckets'])} | {ratio} | "
            f"{mb(r['all_gather_bytes'])} | {mb(r['reduce_scatter_bytes'], 2)} |"
        )
    lines += [
        "",
        "Memory per rank (largest rank) and step time:",
        "",
        "| configuration | params MB | grads MB | AdamW state MB | sum MB | peak RSS in training (MB) "
        "| peak RSS incl. loading (MB) | median step (s) | tokens/s (both ranks) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["state_bytes"]
        lines.append(
            f"| {r['name']} | {mb(s['params'], 0)} | {mb(s['grads'], 0)} | {mb(s['optimizer'], 0)} | "
            f"{mb(r['state_total_bytes'], 0)} | {fmt(r['train_peak_rss_mb'])} | {fmt(r['peak_rss_mb'])} | "
            f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} |"
        )
    if ratios:
        lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    lines += [
        "",
        "Notes: the 2 processes share the machine's cores, so step times compare configurations with each other, not "
        "with single-process runs. DDP also holds gradient buckets of the trainable size (not in the sums). Every "
        "rank loads the whole model before FSDP2 shards it, so the peak RSS including loading does not show the "
        "sharding; the training peak is measured from the first step on (VmHWM reset at train start).",
    ]
    payload = {
        "command": command,
        "machine": info,
        "model": label,
        "batch_per_rank": batch,
        "max_length": length,
        "world_size": NPROC,
        "results": results,
        "ratios": ratios,
        "runs": runs,
    }
    write_results(args.out, "distributed", payload, lines)
    plot_cpu(results, Path(args.out) / "distributed.png", title)
    print("\n".join(lines))


# ---- GPU mode --------------------------------------------------------------------------------------------------
def gpu_worker(cfg: dict, args: argparse.Namespace) -> dict:
    """One model on one GPU (or, dry run, the CPU): LoRA r=8, FSDP2 with bf16 compute; tokens/s, memory, MFU."""
    import lightning as L
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_ft import LoRAModule
    from lightning_ft.callbacks.throughput import count_tokens
    from lightning_ft.models import load_model, load_tokenizer
    from lightning_ft.strategies import AdapterFSDP2Strategy

    dry = cfg["dry_run"]
    cuda = not dry
    torch.set_float32_matmul_precision("high")
    L.seed_everything(0, verbose=False)
    tokenizer = load_tokenizer(cfg["tokenizer"])
    if cfg["model"] == "smollm2" and not dry:
        model = load_model(MODEL)
    else:
        shape = TINY_LLAMA if dry else LLAMA_1B
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max(4096, args.max_length),
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            **shape,
        )
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(config)
    base_params = sum(p.numel() for p in model.parameters())
    data = mr_datamodule(
        tokenizer,
        "instruction",
        max_length=args.max_length,
        batch_size=args.batch,
        packing=True,
        max_train_examples=400 if dry else None,
    )
    module = LoRAModule(model=model, **LORA)
    strategy = AdapterFSDP2Strategy(param_dtype="bfloat16", reduce_dtype="float32", timeout=300)
    times: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []
    seen = {"n": 0, "start": 0.0, "params": 0, "trainable": 0}

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen["params"] = sum(p.numel() for p in pl_module.parameters())
            seen["trainable"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            seen["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - seen["start"]
            seen["n"] += 1
            if seen["n"] > args.warmup:
                times.append(elapsed)
                tokens.append(count_tokens(batch))
                losses.append(float(outputs["loss"]))

    trainer = quiet_trainer(
        args.warmup + args.steps,
        [Clock()],
        accelerator="cuda" if cuda else "cpu",
        strategy=strategy,
        default_root_dir=cfg["workdir"],
    )
    trainer.fit(module, data)
    if not times:
        raise RuntimeError("no timed steps: the data ran out before warm-up ended")
    tokens_per_s = [t / s for t, s in zip(tokens, times)]
    n = seen["params"]
    res = {
        "step_s": times,
        "tokens": tokens,
        "tokens_per_s": tokens_per_s,
        "loss": losses,
        "params": n,
        "base_params": base_params,
        "trainable_params": seen["trainable"],
        "mfu_6n": [6 * n * t / args.peak_flops for t in tokens_per_s],
        "mfu_4n": [4 * n * t / args.peak_flops for t in tokens_per_s],
    }
    if cuda:
        res.update(
            max_memory_allocated=torch.cuda.max_memory_allocated(),
            max_memory_reserved=torch.cuda.max_memory_reserved(),
            gpu=torch.cuda.get_device_name(0),
            gpu_memory=torch.cuda.get_device_properties(0).total_memory,
            cuda=torch.version.cuda,
        )
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def check_gpu_available(dry_run: bool) -> None:
    """Stop with a clear message, before any work, when --gpu has no CUDA device."""
    import torch

    if dry_run or torch.cuda.is_available():
        return
    built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    sys.exit(
        f"--gpu needs a CUDA GPU, but torch.cuda.is_available() is False (torch {torch.__version__}, {built}). "
        "Run it on a machine with an NVIDIA GPU and a CUDA build of torch (see the Makefile), or add --dry-run to "
        "check this script's GPU pipeline on the CPU with tiny models."
    )


def gpu_main(args: argparse.Namespace) -> None:
    check_gpu_available(args.dry_run)
    deadline = time.monotonic() + args.time_limit
    results, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_distributed_gpu_") as tmp:
        tokenizer = make_tiny_model(Path(tmp) / "tiny") if args.dry_run else MODEL
        for c in GPU_CONFIGS:
            left = deadline - time.monotonic()
            if left < 30:
                errors[c["name"]] = "skipped: --time-limit reached"
                continue
            cfg = {**c, "dry_run": args.dry_run, "tokenizer": tokenizer, "workdir": tmp}
            cmd = [
                sys.executable,
                __file__,
                "--gpu-worker",
                json.dumps(cfg),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--batch",
                str(args.batch),
                "--max-length",
                str(args.max_length),
                "--peak-flops",
                str(args.peak_flops),
            ]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
            start = time.perf_counter()
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=left)
            except subprocess.TimeoutExpired:
                errors[c["name"]] = f"timed out after {left:.0f} s (--time-limit {args.time_limit})"
                print(f"{c['name']}: {errors[c['name']]}", flush=True)
                continue
            line = next((x for x in out.stdout.splitlines() if x.startswith(RESULT_PREFIX)), None)
            if line is None:
                errors[c["name"]] = out.stderr[-3000:]
                print(f"{c['name']} failed:\n{out.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(line[len(RESULT_PREFIX) :])
            r.update(name=c["name"], model=c["model"], wall_s=time.perf_counter() - start)
            for key in ("step_s", "tokens_per_s", "mfu_6n", "mfu_4n"):
                r[f"median_{key}"] = statistics.median(r[key])
            results.append(r)
            print(
                f"{c['name']}: {r['median_tokens_per_s']:.0f} tokens/s, MFU {100 * r['median_mfu_6n']:.1f}% "
                f"({r['wall_s']:.0f} s)",
                flush=True,
            )
    info = machine()
    gpu = next((r["gpu"] for r in results if "gpu" in r), "CPU (dry run)" if args.dry_run else "?")
    info["gpu"] = gpu
    command = " ".join(["python benchmarks/bench_distributed.py", *sys.argv[1:]])
    lines = [
        f"bf16 LoRA r=8 (all linear layers) on one {gpu}: Lightning `devices=1`, `AdapterFSDP2Strategy(param_dtype="
        f"'bfloat16', reduce_dtype='float32')`, MR instruction batches packed to {args.batch} x {args.max_length} "
        f"tokens, AdamW; medians of {args.steps} steps after {args.warmup} warm-up (torch {info['torch']}). "
        f"MFU = 6 x N_params x tokens/s / {args.peak_flops:.3g} FLOP/s; a frozen base computes no weight gradients, "
        f"so the hardware does about 4 x N_params per token (the 4N column). Command: `{command}`",
        "",
        "| model | params | trainable | median step (s) | tokens/s | max_memory_allocated (GiB) | MFU (6N) | MFU "
        "(4N) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mem = r.get("max_memory_allocated")
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:,.0f}M | {r['trainable_params'] / 1e6:.2f}M | "
            f"{r['median_step_s']:.3f} | {r['median_tokens_per_s']:,.0f} | "
            f"{'-' if mem is None else f'{mem / 2**30:.1f}'} | {100 * r['median_mfu_6n']:.1f}% | "
            f"{100 * r['median_mfu_4n']:.1f}% |"
        )
    lines += failure_lines(errors)
    if args.dry_run:
        lines.insert(0, "DRY RUN on the CPU with tiny random models: these figures measure nothing.\n")
    payload = {
        "command": command,
        "machine": info,
        "peak_flops": args.peak_flops,
        "batch": args.batch,
        "max_length": args.max_length,
        "dry_run": args.dry_run,
        "results": results,
        "errors": errors,
    }
    write_results(args.out, "distributed_gpu", payload, lines)
    print("\n".join(lines))
    if errors:
        sys.exit(f"{len(errors)} GPU configuration(s) failed: {sorted(errors)}")


# ---- command line ----------------------------------------------------------------------------------------------
def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive(int), help="timed steps per run (default 3; --gpu: 10)")
    parser.add_argument("--warmup", type=non_negative, help="untimed steps first (default 1; --gpu: 3)")
    parser.add_argument("--repeats", type=positive(int), default=1, help="torchrun jobs per configuration (CPU)")
    parser.add_argument("--only", nargs="*", help="CPU configurations whose name contains one of these")
    parser.add_argument("--tiny", action="store_true", help="CPU: a tiny random Llama instead of SmolLM2 (smoke test)")
    parser.add_argument("--timeout", type=positive(float), default=900, help="seconds for one torchrun job (CPU)")
    parser.add_argument("--collective-timeout", type=positive(float), default=300, help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark instead (needs CUDA)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: run its pipeline on the CPU, tiny models")
    parser.add_argument(
        "--peak-flops",
        type=positive(float),
        default=H200_BF16_FLOPS,
        help="--gpu: the GPU's peak dense bf16 FLOP/s for MFU (default H200: 989e12)",
    )
    parser.add_argument("--batch", type=positive(int), help="--gpu: packed rows per step (default 8)")
    parser.add_argument("--max-length", type=positive(int), help="--gpu: tokens per packed row (default 2048)")
    parser.add_argument("--time-limit", type=positive(float), default=570, help="--gpu: seconds for the whole run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.gpu or bool(args.gpu_worker)
    if args.dry_run and not gpu:
        parser.error("--dry-run goes with --gpu (for the CPU benchmark, --tiny is the smoke test)")
    if gpu and (args.tiny or args.only or args.repeats != 1):
        parser.error("--tiny, --only and --repeats apply to the CPU benchmark, not --gpu")
    if not gpu and (args.batch or args.max_length):
        parser.error("--batch and --max-length apply to --gpu (the CPU batch is fixed at 2 x 256 per rank)")
    if args.steps is None:
        args.steps = 10 if gpu else 3
    if args.warmup is None:
        args.warmup = 3 if gpu else 1
    if gpu:
        dry = args.dry_run or (args.gpu_worker and json.loads(args.gpu_worker).get("dry_run"))
        args.batch = args.batch or (2 if dry else 8)
        args.max_length = args.max_length or (256 if dry else 2048)
        if args.max_length < 2:
            parser.error("--max-length must be at least 2")
    return args


def main() -> None:
    args = parse_args()
    if args.rank_worker:
        return rank_worker(json.loads(args.rank_worker), args)
    if args.gpu_worker:
        print(RESULT_PREFIX + json.dumps(gpu_worker(json.loads(args.gpu_worker), args)), flush=True)
        return None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return gpu_main(args) if args.gpu else cpu_main(args)


if __name__ == "__main__":
    main()
