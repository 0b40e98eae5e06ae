"""Shared benchmark plumbing: run each configuration in a fresh subprocess, interleave repeats, take medians.

A fresh process per configuration and repeat gives each its own peak RSS; interleaving the configurations repeat by
repeat spreads the slow phases of a shared machine over all of them alike, so ratios of medians are fair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT "
MR = ROOT / "data" / "mr"  # written by ``lightning-ft prepare-mr``: <format>/{train,test}.jsonl
LABELS = ["negative", "positive"]
# The batch shapes every benchmark measures, those of the MR main job: SmolLM2 on instructions packed into 4 rows of
# 256 tokens, MiniLM on 32 sentences padded per batch to at most 64 tokens. ``max_train_examples``: enough rows for
# the few batches a timing run takes (read and tokenized at start-up, so not more).
BATCH_SHAPES = {
    "smollm2": {
        "model": "smollm2-135m-instruct",
        "data": "instruction",
        "module_task": "causal_lm",
        "labels": None,
        "batch_size": 4,
        "max_length": 256,
        "packing": True,
        "max_train_examples": 600,
    },
    "minilm": {
        "model": "all-minilm-l6-v2",
        "data": "classification",
        "module_task": "classification",
        "labels": LABELS,
        "batch_size": 32,
        "max_length": 64,
        "packing": False,
        "max_train_examples": 4000,
    },
}


def worker_main(run: Callable[[dict, argparse.Namespace], dict], args: argparse.Namespace) -> None:
    """In the subprocess: run one configuration and print its result as one JSON line."""
    print(RESULT_PREFIX + json.dumps(run(json.loads(args.worker), args)), flush=True)


def run_worker(script: str, cfg: dict, extra_args: list[str]) -> tuple[dict | None, str | None]:
    """Run ``script --worker <cfg>`` once in a fresh process: ``(its result, None)``, or ``(None, what went wrong)``
    (the exit status, a signal such as the out-of-memory killer's SIGKILL, and the end of its stderr)."""
    cmd = [sys.executable, script, "--worker", json.dumps(cfg), *extra_args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith(RESULT_PREFIX)), None)
    if line is not None:
        return json.loads(line[len(RESULT_PREFIX) :]), None
    status = f"killed by signal {-out.returncode}" if out.returncode < 0 else f"exit status {out.returncode}"
    return None, f"{status}:\n{out.stderr[-3000:]}"


def run_interleaved(script: str, configs: list[dict], repeats: int, extra_args: list[str]) -> dict[str, list[dict]]:
    """Run ``script --worker <config>`` for every configuration, ``repeats`` times, interleaved."""
    runs: dict[str, list[dict]] = {c["name"]: [] for c in configs}
    for r in range(repeats):
        for cfg in configs:
            result, error = run_worker(script, cfg, extra_args)
            if error is not None:
                sys.exit(f"{cfg['name']} failed, {error}")
            runs[cfg["name"]].append(result)
            print(f"repeat {r + 1}/{repeats} {cfg['name']}: {summarise(runs[cfg['name']][-1])}", flush=True)
    return runs


def summarise(result: dict) -> str:
    if result.get("step_s"):
        return f"median step {statistics.median(result['step_s']):.2f} s"
    return ""


def median_of(runs: list[dict], key: str) -> float:
    """Median over every sample of ``key`` (a list per run) or over the runs (a number per run)."""
    values = [v for r in runs for v in (r[key] if isinstance(r[key], list) else [r[key]])]
    return statistics.median(values)


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_results(out_dir: str | os.PathLike, stem: str, payload: dict, markdown: list[str]) -> None:
    from lightning_ft.io import write_json_atomic, write_text_atomic

    out = Path(out_dir)
    write_json_atomic(out / f"{stem}.json", payload)
    write_text_atomic(out / f"{stem}.md", "\n".join(markdown) + "\n")


def mr_datamodule(model_or_tokenizer, data: str, *, test: bool = False, **kwargs):
    """A ``FineTuneDataModule`` over the MR ``data`` format (``instruction`` / ``classification``) train split, and the
    test split with ``test=True``; ``kwargs`` go to ``FineTuneDataModule``."""
    from lightning_ft import FineTuneDataModule

    splits = {"train": str(MR / data / "train.jsonl")}
    if test:
        splits["test"] = str(MR / data / "test.jsonl")
    return FineTuneDataModule(model_or_tokenizer, task=data, **splits, **kwargs)


def mr_batches(shape: dict, n: int) -> list[dict]:
    """The first ``n`` MR training batches in ``shape`` (a ``BATCH_SHAPES`` entry; seeded shuffle: the same batches
    for every configuration and repeat)."""
    import itertools

    dm = mr_datamodule(
        shape["model"],
        shape["data"],
        labels=shape["labels"],
        max_length=shape["max_length"],
        batch_size=shape["batch_size"],
        packing=shape["packing"],
        max_train_examples=shape["max_train_examples"],
    )
    dm.setup("fit")
    return list(itertools.islice(dm.train_dataloader(), n))


def vm_hwm_mb() -> float | None:
    """This process's peak RSS (``VmHWM``, Linux; ``/proc/self/clear_refs`` resets it), in MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB: ``VmHWM`` where Linux gives it, else ``ru_maxrss``.

    ``ru_maxrss`` survives ``exec``: a subprocess started by a large parent reports at least the parent's size at the
    fork (every configuration of bench_lora's RSS phase read 5,135 MB, the benchmark process's own size). ``VmHWM``
    belongs to the process's memory map, which ``exec`` replaces."""
    import resource

    hwm = vm_hwm_mb()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float | None:
    """This process's resident set size now (VmRSS), in MB; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def quiet_trainer(max_steps: int, callbacks: list, **kw):
    """A Lightning Trainer for a timed run: no logger, progress bar, model summary, checkpoints or validation; one CPU
    device unless ``kw`` says otherwise (``accelerator``, ``devices``, ``strategy``, ``default_root_dir``, ...)."""
    import lightning as L

    kw.setdefault("accelerator", "cpu")
    kw.setdefault("devices", 1)
    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=callbacks,
        **kw,
    )


def failure_lines(errors: dict[str, str]) -> list[str]:
    """Markdown lines naming each failed configuration with the last line of its error output."""
    return [f"\n{name} failed: {err.strip().splitlines()[-1] if err.strip() else '?'}" for name, err in errors.items()]
