"""LoRA speed and memory, paired: lightning-ft (fused, unfused, DoRA, compiled) vs Hugging Face peft vs the floor.

    python benchmarks/bench_lora.py [--pairs 20] [--warmup 2] [--inference-pairs 20] [--no-compile] [--no-rss]
    python benchmarks/bench_lora.py --quick --out /tmp/x       # tiny random Llama, seconds; what the test runs

Protocol (issue 13). Every training configuration lives in this one process; a *round* runs one single step
(forward + backward + AdamW) of each, in an order that is reversed every other round, so the slow and fast phases
of a shared machine fall on all of them alike. Each ratio (``ours / peft``, ``DoRA / LoRA``, ...) is taken per round
from the two steps of that round: the table gives the median over the rounds with the interquartile range and the
min-max. Inference (forward, no grad) of the base model, the unmerged adapter and the merged model is timed the same
way. Peak RSS needs a process of its own per configuration: each runs ``--rss-steps`` steps in a fresh subprocess.
The load average (``os.getloadavg``) before and after is recorded. SmolLM2-135M on MR instruction batches of 4 packed
rows x 256 tokens; every configuration computes its loss the same way (logits only at target positions).
Writes ``benchmarks/results/lora.{json,md,png}`` (or under ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import BATCH_SHAPES, ROOT, machine, mr_batches, peak_rss_mb, write_results

MODEL = BATCH_SHAPES["smollm2"]["model"]
QV = ["q_proj", "v_proj"]
ALL = "all-linear"
CONFIGS = {  # name -> how to build it
    "ours r=16 all-linear (fused)": {"kind": "ours", "r": 16, "targets": ALL},
    "peft r=16 all-linear": {"kind": "peft", "r": 16, "targets": ALL},
    "ours r=16 all-linear (unfused)": {"kind": "ours", "r": 16, "targets": ALL, "fuse": False},
    "floor (frozen base)": {"kind": "floor"},
    "ours r=8 q,v": {"kind": "ours", "r": 8, "targets": QV},
    "peft r=8 q,v": {"kind": "peft", "r": 8, "targets": QV},
    "ours DoRA r=16 all-linear": {"kind": "ours", "r": 16, "targets": ALL, "use_dora": True},
    "peft DoRA r=16 all-linear": {"kind": "peft", "r": 16, "targets": ALL, "use_dora": True},
    "ours r=16 all-linear (compiled)": {"kind": "ours", "r": 16, "targets": ALL, "compile": True},
}
# (label, numerator, denominator, target: the ratio must be <= it; None: reported only)
RATIOS = [
    ("r=16 all-linear: fused / peft", "ours r=16 all-linear (fused)", "peft r=16 all-linear", 0.90),
    ("r=16 all-linear: unfused / peft", "ours r=16 all-linear (unfused)", "peft r=16 all-linear", None),
    ("r=16 all-linear: fused / unfused", "ours r=16 all-linear (fused)", "ours r=16 all-linear (unfused)", None),
    ("r=16 all-linear: fused / floor", "ours r=16 all-linear (fused)", "floor (frozen base)", 1.10),
    ("r=16 all-linear: peft / floor", "peft r=16 all-linear", "floor (frozen base)", None),
    ("r=8 q,v: ours / peft", "ours r=8 q,v", "peft r=8 q,v", 0.97),
    ("DoRA r=16: ours / our LoRA", "ours DoRA r=16 all-linear", "ours r=16 all-linear (fused)", 1.30),
    ("DoRA r=16: ours / peft DoRA", "ours DoRA r=16 all-linear", "peft DoRA r=16 all-linear", 1.00),
    ("DoRA r=16: peft DoRA / peft LoRA", "peft DoRA r=16 all-linear", "peft r=16 all-linear", None),
    ("compiled / eager (fused, r=16)", "ours r=16 all-linear (compiled)", "ours r=16 all-linear (fused)", None),
]
INFERENCE_RATIOS = [
    ("unmerged adapter / base", "unmerged adapter", "base", 1.03),
    ("merged / base", "merged", "base", None),
]
MIN_PAIRS = 20  # a target is judged only on at least this many paired rounds
RSS_CONFIGS = [
    "ours r=16 all-linear (fused)",
    "peft r=16 all-linear",
    "ours r=16 all-linear (unfused)",
    "floor (frozen base)",
]
RSS_RATIOS = [("peak RSS r=16: fused / peft", "ours r=16 all-linear (fused)", "peft r=16 all-linear", 0.90)]


# ---- models and batches ----------------------------------------------------------------------------------------
def base_model(quick: bool):
    import torch

    torch.manual_seed(0)
    if not quick:
        from lightning_ft.models import load_model

        return load_model(MODEL)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def batches(quick: bool, n: int) -> list[dict]:
    """``n`` training batches (``input_ids``, ``position_ids``, ``labels``): MR, or random for ``--quick``."""
    import torch

    if not quick:
        return mr_batches(BATCH_SHAPES["smollm2"], n)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (2, 32), generator=gen)
        labels = ids.clone()
        labels[:, :8] = -100
        out.append({"input_ids": ids, "position_ids": torch.arange(32).expand(2, -1), "labels": labels})
    return out


def shared_copy(base):
    """A copy of ``base`` whose frozen weights are ``base``'s own tensors: every configuration in the process adds
    only its adapters to memory (nothing here writes the base weights; the merged inference model is a real copy)."""
    return copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})


def build(cfg: dict, base):
    """The model of one configuration, from a copy of ``base`` (adapters injected, base frozen as each method does)."""
    import torch

    from lightning_ft.lora import inject_lora

    torch.manual_seed(0)
    model = shared_copy(base)
    if cfg["kind"] == "ours":
        extra = {k: cfg[k] for k in ("fuse", "use_dora", "compile") if k in cfg}
        inject_lora(model, r=cfg["r"], alpha=2 * cfg["r"], target_modules=cfg["targets"], **extra)
    elif cfg["kind"] == "peft":
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=cfg["r"], lora_alpha=2 * cfg["r"], target_modules=cfg["targets"], use_dora=cfg.get("use_dora", False)
        )
        model = get_peft_model(model, peft_cfg)
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


class Trainee:
    """One configuration's model and AdamW; ``step(batch)`` times one forward + backward + optimizer step."""

    def __init__(self, cfg: dict, base) -> None:
        import torch

        self.model = build(cfg, base)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step(self, batch: dict) -> float:
        start = time.perf_counter()
        loss_of(self.model, batch).backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


# ---- the paired protocol ---------------------------------------------------------------------------------------
def rounds(runners: dict, pairs: int, warmup: int, run_one, budget_s: float | None = None) -> dict[str, list[float]]:
    """``pairs`` rounds of one timed call per runner (order reversed every other round) after ``warmup`` untimed;
    stops early (fewer rounds, all complete) once ``budget_s`` seconds have passed."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    start = time.monotonic()
    for i in range(warmup + pairs):
        if budget_s is not None and i > warmup and time.monotonic() - start > budget_s:
            print(f"time budget reached after {i - warmup} rounds", flush=True)
            break
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            t = run_one(runners[name], i)
            if i >= warmup:
                times[name].append(t)
        if i >= warmup:
            print(
                f"round {i - warmup + 1}/{pairs}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True
            )
    return times


def spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}


def ratio_rows(times: dict[str, list[float]], specs: list) -> list[dict]:
    rows = []
    for label, num, den, target in specs:
        if num not in times or den not in times:
            continue
        per_round = [a / b for a, b in zip(times[num], times[den])]
        row = {"ratio": label, "numerator": num, "denominator": den, "target": target, **spread(per_round)}
        # the protocol needs >= MIN_PAIRS rounds: fewer leave the target unjudged (met: None)
        judged = target is not None and len(per_round) >= MIN_PAIRS
        row["met"] = row["median"] <= target if judged else None
        row["pairs"] = len(per_round)
        row["per_round"] = per_round
        rows.append(row)
    return rows


def train_phase(args, base) -> tuple[dict, list[dict]]:
    names = [n for n in CONFIGS if args.compile or not CONFIGS[n].get("compile")]
    if args.only:
        names = [n for n in names if n in args.only]
    data = batches(args.quick, args.batches)
    runners = {}
    for name in names:
        print(f"building {name}", flush=True)
        runners[name] = Trainee(CONFIGS[name], base)
    budget = args.budget_min * 60 if args.budget_min else None
    times = rounds(runners, args.pairs, args.warmup, lambda r, i: r.step(data[i % len(data)]), budget)
    return times, ratio_rows(times, RATIOS)


def inference_phase(args, base) -> tuple[dict, list[dict]]:
    import torch

    from lightning_ft.lora import inject_lora, lora_layers, merge_lora

    batch = batches(args.quick, 1)[0]
    plain = shared_copy(base).eval()
    unmerged = inject_lora(shared_copy(base), r=16, alpha=32).eval()
    for layer in lora_layers(unmerged).values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)  # a trained-looking adapter, not the zero init
    merged = merge_lora(copy.deepcopy(unmerged)).eval()
    models = {"base": plain, "unmerged adapter": unmerged, "merged": merged}

    def forward(model, _i) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        return time.perf_counter() - start

    times = rounds(models, args.inference_pairs, 1, forward)
    return times, ratio_rows(times, INFERENCE_RATIOS)


def rss_phase(args) -> tuple[dict, list[dict]]:
    """Peak RSS of each ``RSS_CONFIGS`` entry, each in a fresh subprocess (a process has one peak)."""
    rss: dict[str, list[float]] = {n: [] for n in RSS_CONFIGS}
    for _ in range(args.rss_repeats):
        for name in RSS_CONFIGS:
            cmd = [sys.executable, __file__, "--rss-worker", name, "--rss-steps", str(args.rss_steps)]
            cmd += ["--quick"] if args.quick else []
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RSS ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            rss[name].append(float(line.split()[1]))
            print(f"peak RSS {name}: {rss[name][-1]:.0f} MB", flush=True)
    return rss, ratio_rows(rss, RSS_RATIOS)


def rss_worker(args) -> None:
    base = base_model(args.quick)
    trainee = Trainee(CONFIGS[args.rss_worker], base)
    del base
    for batch in batches(args.quick, args.rss_steps):
        trainee.step(batch)
    print(f"RSS {peak_rss_mb():.1f}", flush=True)


# ---- report ----------------------------------------------------------------------------------------------------
def table(rows: list[dict], unit: str = "") -> list[str]:
    lines = ["| ratio | median | IQR | min-max | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        target = "" if r["target"] is None else f"<= {r['target']:.2f}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        if r["target"] is not None and r["met"] is None:
            met = f"not judged ({r.get('pairs', '?')} < {MIN_PAIRS} pairs)"
        lines.append(
            f"| {r['ratio']} | {r['median']:.3f}{unit} | {r['q1']:.3f}-{r['q3']:.3f} | {r['min']:.3f}-{r['max']:.3f} "
            f"| {target} | {met} |"
        )
    return lines


def plot(train_rows: list[dict], other_rows: list[dict], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_ft.io import save_with_atomic

    rows = train_rows + other_rows
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    labels = [r["ratio"] for r in rows]
    med = [r["median"] for r in rows]
    err = [[m - r["q1"] for m, r in zip(med, rows)], [r["q3"] - m for m, r in zip(med, rows)]]
    colors = ["tab:gray" if r["met"] is None else ("tab:green" if r["met"] else "tab:red") for r in rows]
    ax.barh(labels, med, xerr=err, color=colors, capsize=3)
    for i, r in enumerate(rows):
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
    ax.axvline(1.0, color="black", lw=0.5, ls="--")
    ax.invert_yaxis()
    ax.set_xlabel("ratio (median over paired rounds, bars: IQR; black tick: target; green met, red missed)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_with_atomic(out_png, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20, help="timed rounds of training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation happens here)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--inference-pairs", type=int, default=20)
    parser.add_argument("--budget-min", type=float, help="stop the training rounds after this many minutes")
    parser.add_argument("--rss-steps", type=int, default=2)
    parser.add_argument("--rss-repeats", type=int, default=1)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-rss", dest="rss", action="store_false")
    parser.add_argument("--no-inference", dest="inference", action="store_false")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="train only these configurations")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama and random tokens (a smoke test)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--rss-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        return rss_worker(args)

    load_before = os.getloadavg()
    started = time.time()
    base = base_model(args.quick)
    train_times, train_rows = train_phase(args, base)
    inference_times, inference_rows = inference_phase(args, base) if args.inference else ({}, [])
    rss, rss_rows = rss_phase(args) if args.rss else ({}, [])
    info = machine()
    command = " ".join(["python benchmarks/bench_lora.py", *sys.argv[1:]])
    what = "tiny random Llama, 2 x 32 tokens" if args.quick else "SmolLM2-135M, MR batches of 4 x 256 packed tokens"
    load_after = os.getloadavg()
    n_rounds = len(next(iter(train_times.values())))
    lines = [
        f"{what}; forward + backward + AdamW single steps, {n_rounds} paired rounds (order reversed every other "
        f"round), ratio per round, median with interquartile range and min-max. {info['cpus']} CPUs, torch "
        f"{info['torch']}, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after (shared machine). "
        f"Command: `{command}`",
        "",
        "| configuration | median step (s) | IQR (s) |",
        "|---|---|---|",
    ]
    for name, ts in train_times.items():
        s = spread(ts)
        lines.append(f"| {name} | {s['median']:.3f} | {s['q1']:.3f}-{s['q3']:.3f} |")
    lines += ["", "Training step ratios:", "", *table(train_rows)]
    if inference_rows:
        lines += [
            "",
            f"Inference (forward, no grad, {args.inference_pairs} paired rounds):",
            "",
            *table(inference_rows),
        ]
    if rss_rows:
        lines += ["", "| peak RSS (MB, own process) | " + " | ".join(RSS_CONFIGS) + " |", "|---" * 5 + "|"]
        lines.append("| median | " + " | ".join(f"{statistics.median(rss[n]):.0f}" for n in RSS_CONFIGS) + " |")
        lines += ["", *table(rss_rows)]
    payload = {
        "command": command,
        "machine": info,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "wall_s": time.time() - started,
        "train_step_s": train_times,
        "train_ratios": train_rows,
        "inference_s": inference_times,
        "inference_ratios": inference_rows,
        "peak_rss_mb": rss,
        "rss_ratios": rss_rows,
    }
    write_results(args.out, "lora", payload, lines)
    plot(train_rows, inference_rows + rss_rows, Path(args.out) / "lora.png", what)
    print("\n".join(lines))
    print(json.dumps({"wall_s": payload["wall_s"]}))


if __name__ == "__main__":
    main()
