"""LoRA speed and memory on SmolLM2-135M, side by side: lightning-ft vs Hugging Face peft vs full fine-tuning vs the
floor (frozen base, gradient flowing through every layer, no adapter).

    python benchmarks/bench_lora.py [--repeats 2] [--steps 3] [--inference-repeats 5]

Training: real MR instruction batches, 4 packed rows x 256 tokens, forward + backward + AdamW; every configuration
computes its loss the same way (logits only at target positions). Inference: forward latency of the base model, the
unmerged adapter (r=16, all linear layers) and the merged model, interleaved in one process. Writes
``benchmarks/results/lora.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
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
    peak_rss_mb,
    run_interleaved,
    worker_main,
    write_results,
)

MODEL = BATCH_SHAPES["smollm2"]["model"]
QV = ["q_proj", "v_proj"]
CONFIGS = [
    {"name": "lightning-ft r=8 q,v", "kind": "ours", "r": 8, "targets": QV},
    {"name": "peft r=8 q,v", "kind": "peft", "r": 8, "targets": QV},
    {"name": "lightning-ft r=16 all-linear", "kind": "ours", "r": 16, "targets": "all-linear"},
    {"name": "peft r=16 all-linear", "kind": "peft", "r": 16, "targets": "all-linear"},
    {"name": "full fine-tuning", "kind": "full"},
    {"name": "floor (frozen base)", "kind": "floor"},
]


def build(cfg: dict):
    """The model of one configuration (adapters injected, base frozen as each method does)."""
    import torch

    from lightning_ft.lora import inject_lora
    from lightning_ft.models import load_model

    torch.manual_seed(0)
    model = load_model(MODEL)
    if cfg["kind"] == "ours":
        inject_lora(model, r=cfg["r"], alpha=2 * cfg["r"], target_modules=cfg["targets"])
    elif cfg["kind"] == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=2 * cfg["r"], target_modules=cfg["targets"]))
    elif cfg["kind"] == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # backward runs through every layer, as under any adapter
    return model.train()


def loss_of(model, batch):
    import torch.nn.functional as F

    from lightning_ft.modules.objectives import next_token_targets, target_mask

    logits = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=target_mask(batch["labels"]),
    ).logits
    return F.cross_entropy(logits.float(), next_token_targets(batch["labels"]))


def checkpoint_bytes(model) -> int:
    """Size of a safetensors file of what a checkpoint must hold: the trainable parameters (all of them for full)."""
    from safetensors.torch import save_file

    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if not state:
        return 0
    with tempfile.TemporaryDirectory() as d:
        save_file(state, f"{d}/ckpt.safetensors")
        return Path(f"{d}/ckpt.safetensors").stat().st_size


def train_worker(cfg: dict, args: argparse.Namespace) -> dict:
    import torch

    batches = mr_batches(BATCH_SHAPES["smollm2"], args.warmup + args.steps)
    model = build(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss_of(model, batch).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    tokens = batches[0]["input_ids"].numel()
    return {
        "step_s": times,
        "tokens_per_s": [tokens / t for t in times],
        "peak_rss_mb": peak_rss_mb(),
        "trainable_params": sum(p.numel() for p in params),
        "checkpoint_bytes": checkpoint_bytes(model),
    }


def inference_worker(cfg: dict, args: argparse.Namespace) -> dict:
    """Forward latency of base / unmerged / merged, interleaved in this one process."""
    import torch

    from lightning_ft.lora import inject_lora, lora_layers, merge_lora

    batch = mr_batches(BATCH_SHAPES["smollm2"], 1)[0]
    base = build({"kind": "full"}).eval()
    unmerged = inject_lora(copy.deepcopy(base), r=16, alpha=32).eval()
    for layer in lora_layers(unmerged).values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)  # a trained-looking adapter, not the zero init
    merged = merge_lora(copy.deepcopy(unmerged)).eval()
    models = {"base": base, "unmerged adapter": unmerged, "merged": merged}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        for _ in range(args.inference_repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
                times[name].append(time.perf_counter() - start)
    return {"forward_s": times}


def run_worker(cfg: dict, args: argparse.Namespace) -> dict:
    return inference_worker(cfg, args) if cfg["kind"] == "inference" else train_worker(cfg, args)


def plot(results: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_ft.io import save_with_atomic

    names = [r["name"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].barh(names, [r["step_s"] for r in results], color="tab:blue")
    axes[0].set_xlabel("median step time (s), 4 x 256 tokens")
    axes[1].barh(names, [r["peak_rss_mb"] for r in results], color="tab:orange")
    axes[1].set_xlabel("peak RSS (MB)")
    axes[1].set_yticklabels([])
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("SmolLM2-135M, forward + backward + AdamW (CPU)")
    fig.tight_layout()
    save_with_atomic(out_png, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inference-repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(run_worker, args)

    passthrough = [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--inference-repeats",
        str(args.inference_repeats),
    ]
    runs = run_interleaved(__file__, CONFIGS + [{"name": "inference", "kind": "inference"}], args.repeats, passthrough)
    results = []
    for c in CONFIGS:
        rs = runs[c["name"]]
        results.append(
            {
                **c,
                **{k: median_of(rs, k) for k in ("step_s", "tokens_per_s", "peak_rss_mb")},
                "trainable_params": rs[0]["trainable_params"],
                "checkpoint_bytes": rs[0]["checkpoint_bytes"],
            }
        )
    by = {r["name"]: r for r in results}
    inference = {
        k: statistics.median(t for r in runs["inference"] for t in r["forward_s"][k])
        for k in ("base", "unmerged adapter", "merged")
    }
    full, floor = by["full fine-tuning"], by["floor (frozen base)"]
    ratios = {}
    for r in ("8 q,v", "16 all-linear"):
        ours, peft = by[f"lightning-ft r={r}"], by[f"peft r={r}"]
        ratios[f"r={r}"] = {
            "step_vs_peft": ours["step_s"] / peft["step_s"],
            "step_vs_floor": ours["step_s"] / floor["step_s"],
            "step_vs_full": ours["step_s"] / full["step_s"],
            "rss_vs_full": ours["peak_rss_mb"] / full["peak_rss_mb"],
        }
    ratios["inference"] = {
        "merged_vs_base": inference["merged"] / inference["base"],
        "unmerged_vs_base": inference["unmerged adapter"] / inference["base"],
    }

    info = machine()
    command = " ".join(["python benchmarks/bench_lora.py", *sys.argv[1:]])
    lines = [
        f"SmolLM2-135M, MR batches of 4 x 256 packed tokens, forward + backward + AdamW, medians of {args.repeats} "
        f"x {args.steps} steps ({info['cpus']} CPUs, torch {info['torch']}). Command: `{command}`",
        "",
        "| configuration | trainable params | median step (s) | tokens/s | peak RSS (MB) | checkpoint (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['trainable_params'] / 1e6:.2f}M | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} "
            f"| {r['peak_rss_mb']:.0f} | {r['checkpoint_bytes'] / 2**20:.1f} |"
        )
    lines += ["", "| ratio | r=8 q,v | r=16 all-linear | target |", "|---|---|---|---|"]
    for key, target in (
        ("step_vs_peft", "<= 0.97"),
        ("step_vs_floor", "<= 1.05"),
        ("step_vs_full", "<= 0.55"),
        ("rss_vs_full", "<= 0.7"),
    ):
        lines.append(f"| {key} | {ratios['r=8 q,v'][key]:.3f} | {ratios['r=16 all-linear'][key]:.3f} | {target} |")
    lines += ["", "| inference (forward, no grad) | median (s) | vs base | target |", "|---|---|---|---|"]
    for name, target in (("base", ""), ("unmerged adapter", "<= 1.10"), ("merged", "<= 1.02")):
        lines.append(f"| {name} | {inference[name]:.3f} | {inference[name] / inference['base']:.3f} | {target} |")
    payload = {
        "command": command,
        "machine": info,
        "results": results,
        "inference_s": inference,
        "ratios": ratios,
        "runs": runs,
    }
    write_results(args.out, "lora", payload, lines)
    plot(results, Path(args.out) / "lora.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
