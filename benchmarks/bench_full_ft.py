"""Full fine-tuning throughput on real MR batches: median step time, training tokens/s and peak RSS.

    python benchmarks/bench_full_ft.py [--repeats 3] [--steps 5] [--out benchmarks/results]

Each configuration runs in a fresh subprocess (so its peak RSS is its own), and the configurations are interleaved
repeat by repeat, so slow phases of a shared machine hit all of them alike. A step is forward + backward + AdamW
through ``SFTModule.step``, the same code path as ``Trainer.fit``. Writes ``full_ft.json`` and ``full_ft.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [
    # SmolLM2 batches: 4 rows of 256 tokens, packed from MR instructions (the batch shape in DESIGN.md)
    {"name": "smollm2-135m fp32", "model": "smollm2-135m-instruct", "task": "instruction", "batch_size": 4,
     "max_length": 256, "packing": True, "precision": "32"},
    # MiniLM batches as in the main job: 32 sentences, dynamic padding, max 64 tokens
    {"name": "minilm-l6 fp32", "model": "all-minilm-l6-v2", "task": "classification", "batch_size": 32,
     "max_length": 64, "packing": False, "precision": "32"},
]  # fmt: skip
# bf16 autocast: only with --bf16. On CPUs without native bf16 (AVX2 only, as on the 2-core dev machines) a bf16
# matmul runs at about 1 GFLOPS against 60 in float32, so a step takes minutes.
BF16_CONFIG = {"name": "smollm2-135m bf16-autocast", "model": "smollm2-135m-instruct", "task": "instruction",
               "batch_size": 4, "max_length": 256, "packing": True, "precision": "bf16"}  # fmt: skip


def run_worker(cfg: dict, steps: int, warmup: int) -> dict:
    """Time ``steps`` optimizer steps after ``warmup`` untimed ones; return medians and peak RSS."""
    import torch

    from lightning_ft import FineTuneDataModule, SFTModule
    from lightning_ft.callbacks.throughput import count_tokens
    from lightning_ft.modules.optim import decay_groups

    torch.manual_seed(0)
    mr = ROOT / "data" / "mr" / ("classification" if cfg["task"] == "classification" else "instruction")
    labels = ["negative", "positive"] if cfg["task"] == "classification" else None
    dm = FineTuneDataModule(
        cfg["model"], task=cfg["task"], train=str(mr / "train.jsonl"), labels=labels, max_length=cfg["max_length"],
        batch_size=cfg["batch_size"], packing=cfg["packing"], max_train_examples=4000,
    )  # fmt: skip
    dm.setup("fit")
    module = SFTModule(cfg["model"], task="classification" if labels else "causal_lm", labels=labels)
    module.configure_model()
    module.model.train()
    optimizer = torch.optim.AdamW(decay_groups(module.named_parameters(), 0.0), lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
    batches = iter(dm.train_dataloader())
    times, tokens = [], []
    for i in range(warmup + steps):
        batch = next(batches)
        start = time.perf_counter()
        with autocast:
            loss = module.step(batch, "train")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tokens.append(count_tokens(batch))
    return {
        "step_s": times,
        "tokens": tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
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
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker), args.steps, args.warmup)))
        return

    configs = CONFIGS + ([BF16_CONFIG] if args.bf16 else [])
    configs = [c for c in configs if not args.only or any(o in c["name"] for o in args.only)]
    runs: dict[str, list[dict]] = {c["name"]: [] for c in configs}
    for r in range(args.repeats):
        for cfg in configs:
            cmd = [sys.executable, __file__, "--worker", json.dumps(cfg), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{cfg['name']} failed:\n{out.stderr[-3000:]}")
            runs[cfg["name"]].append(json.loads(line[len("RESULT ") :]))
            print(f"repeat {r + 1}/{args.repeats} {cfg['name']}: median step {statistics.median(runs[cfg['name']][-1]['step_s']):.2f} s", flush=True)

    import torch

    results = []
    for cfg in configs:
        rs = runs[cfg["name"]]
        steps = [s for r in rs for s in r["step_s"]]
        tok_per_s = [t / s for r in rs for t, s in zip(r["tokens"], r["step_s"])]
        results.append({
            **cfg,
            "median_step_s": statistics.median(steps),
            "median_tokens_per_s": statistics.median(tok_per_s),
            "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
            "trainable_params": rs[0]["trainable_params"],
            "timed_steps": len(steps),
        })  # fmt: skip
    machine = {"cpus": __import__("os").cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "torch_threads": runs[configs[0]["name"]][0]["torch_threads"], "platform": platform.platform()}  # fmt: skip
    command = "python benchmarks/bench_full_ft.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    from lightning_ft.io import write_json_atomic, write_text_atomic

    write_json_atomic(out / "full_ft.json", {"command": command.strip(), "machine": machine, "results": results, "runs": runs})
    lines = [
        f"Full fine-tuning, forward + backward + AdamW, medians of {args.repeats} x {args.steps} steps "
        f"({machine['cpus']} CPUs, torch {machine['torch']}). Command: `{command.strip()}`",
        "",
        "| configuration | batch | trainable params | median step (s) | tokens/s | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        batch = f"{r['batch_size']} x {'packed ' if r['packing'] else '<='}{r['max_length']}"
        lines.append(f"| {r['name']} | {batch} | {r['trainable_params'] / 1e6:.1f}M | {r['median_step_s']:.2f} | "
                     f"{r['median_tokens_per_s']:.0f} | {r['median_peak_rss_mb']:.0f} |")  # fmt: skip
    write_text_atomic(out / "full_ft.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
