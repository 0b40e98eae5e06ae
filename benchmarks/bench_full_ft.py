"""Full fine-tuning throughput on real MR batches: median step time, training tokens/s and peak RSS.

    python benchmarks/bench_full_ft.py [--repeats 3] [--steps 5] [--out benchmarks/results]

Each configuration runs in a fresh subprocess, interleaved repeat by repeat (``harness.py``). A step is forward +
backward + AdamW through ``SFTModule.step``, the same code path as ``Trainer.fit``. Writes ``full_ft.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time

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

CONFIGS = [  # the batch shapes of harness.BATCH_SHAPES
    {"name": "smollm2-135m fp32", **BATCH_SHAPES["smollm2"], "precision": "32"},
    {"name": "minilm-l6 fp32", **BATCH_SHAPES["minilm"], "precision": "32"},
]
# bf16 autocast: only with --bf16. On CPUs without native bf16 (AVX2 only, as on the 2-core dev machines) a bf16
# matmul runs at about 1 GFLOPS against 60 in float32, so a step takes minutes.
BF16_CONFIG = {"name": "smollm2-135m bf16-autocast", **BATCH_SHAPES["smollm2"], "precision": "bf16"}


def run_worker(cfg: dict, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` optimizer steps after ``args.warmup`` untimed ones."""
    import torch

    from lightning_ft import SFTModule
    from lightning_ft.callbacks.throughput import count_tokens
    from lightning_ft.modules.optim import decay_groups

    torch.manual_seed(0)
    batches = iter(mr_batches(cfg, args.warmup + args.steps))
    module = SFTModule(cfg["model"], task=cfg["module_task"], labels=cfg["labels"])
    module.configure_model()
    optimizer = torch.optim.AdamW(decay_groups(module.named_parameters(), 0.0), lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
    times, tokens = [], []
    for i in range(args.warmup + args.steps):
        batch = next(batches)
        start = time.perf_counter()
        with autocast:
            loss = module.step(batch, "train")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(count_tokens(batch))
    return {
        "step_s": times,
        "tokens_per_s": [t / s for t, s in zip(tokens, times)],
        "peak_rss_mb": peak_rss_mb(),
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also run SmolLM2 with bf16 autocast")
    parser.add_argument("--only", nargs="*", help="run only configurations whose name contains one of these")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(run_worker, args)

    configs = CONFIGS + ([BF16_CONFIG] if args.bf16 else [])
    configs = [c for c in configs if not args.only or any(o in c["name"] for o in args.only)]
    runs = run_interleaved(__file__, configs, args.repeats, ["--steps", str(args.steps), "--warmup", str(args.warmup)])
    results = [
        {
            **c,
            **{k: median_of(runs[c["name"]], k) for k in ("step_s", "tokens_per_s", "peak_rss_mb")},
            "trainable_params": runs[c["name"]][0]["trainable_params"],
        }
        for c in configs
    ]
    info = machine()
    command = " ".join(["python benchmarks/bench_full_ft.py", *sys.argv[1:]])
    lines = [
        f"Full fine-tuning, forward + backward + AdamW, medians of {args.repeats} x {args.steps} steps "
        f"({info['cpus']} CPUs, torch {info['torch']}). Command: `{command}`",
        "",
        "| configuration | batch | trainable params | median step (s) | tokens/s | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        batch = f"{r['batch_size']} x {'packed ' if r['packing'] else '<='}{r['max_length']}"
        lines.append(
            f"| {r['name']} | {batch} | {r['trainable_params'] / 1e6:.1f}M | {r['step_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    write_results(args.out, "full_ft", {"command": command, "machine": info, "results": results, "runs": runs}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
