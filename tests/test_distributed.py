"""Distributed adapter training on CPU with gloo: DDP, FSDP2 and two "nodes" give the single-process result with the
same global batch, sharded checkpoints resume exactly, bad settings fail before any work, and a failing rank ends
the run on every rank.

Multi-process runs start ``distributed_worker.py`` or the launch scripts in subprocesses, one thread each, under a
timeout: a hang fails the test instead of blocking it. Every run trains the same tiny Llama (saved to a folder, as
workers rebuild it) with a global batch of 4 rows.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import free_port, tiny_bert, tiny_llama, torchrun, varied_rows, worker_env
from safetensors.torch import load_file

from lightning_ft.lora import inject_lora, merge_lora, merged_state_dict, save_peft_adapter
from lightning_ft.strategies import AdapterDDPStrategy, AdapterFSDP1Strategy, adapter_wrap_policy, find_blocks
from lightning_ft.strategies.common import available_cpus
from lightning_ft.strategies.sharding import adapter_wrap_modules, mixed_units

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "distributed_worker.py"
TIMEOUT = 240  # seconds for one multi-process run; a hang ends in a failure


# ---- helpers ---------------------------------------------------------------------------------------------------
def start(cmd: list[str], log: Path, **env: str) -> tuple[subprocess.Popen, object]:
    """Start ``cmd`` in its own process group with one thread per process, output to ``log``."""
    out = open(log, "w")
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=worker_env(**env), cwd=ROOT, start_new_session=True
    )
    return proc, out


def finish(procs: list[tuple[subprocess.Popen, object]], timeout: float = TIMEOUT) -> list[int]:
    """Wait for every process; kill all process groups and fail when they outlast ``timeout`` (a hang)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p, _ in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed run still going after {timeout} s (a rank hangs)")
    finally:
        for p, out in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            out.close()


def worker_args(assets: dict, out: Path, mode: str, *extra: str) -> list[str]:
    return [
        str(WORKER),
        "--mode",
        mode,
        "--pretrained",
        assets["pretrained"],
        "--rows",
        assets["rows"],
        "--out",
        str(out),
        *extra,
    ]


def assert_same_exports(reference: Path, other: Path, atol: float = 1e-5) -> None:
    """The exported adapters (config and weights: peft's or the sparse-delta files) and the merged models of two runs
    agree."""
    files = sorted(p.relative_to(reference) for p in (reference / "adapter").iterdir())
    assert files == sorted(p.relative_to(other) for p in (other / "adapter").iterdir())
    for sub in [f for f in files if f.suffix == ".json"]:
        assert json.loads((other / sub).read_text()) == json.loads((reference / sub).read_text()), sub
    for sub in [f for f in files if f.suffix == ".safetensors"] + [Path("merged/model.safetensors")]:
        ref, got = load_file(reference / sub), load_file(other / sub)
        assert got.keys() == ref.keys(), sub
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=atol, rtol=0, msg=f"{sub}: {key}")


def log_text(log: Path) -> str:
    return log.read_text(errors="replace")


# ---- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer) -> dict:
    """The tiny model and tokenizer as a folder, and 20 instruction rows whose answers have 1, 2, 4, 8 or 16 words:
    ranks and micro-batches hold very unequal target-token counts, so only a loss that is one mean over every target
    token of the step (all ranks, all micro-batches) matches the single-process run."""
    root = tmp_path_factory.mktemp("assets")
    tiny_llama(len(tokenizer)).save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in varied_rows(20, longest=16)))
    return {"pretrained": str(root / "pretrained"), "rows": str(root / "rows.jsonl")}


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory) -> dict:
    """Single-process reference runs in this process: LoRA for 5 and 10 steps, sparse for 5."""
    from distributed_worker import fit, validate

    root = tmp_path_factory.mktemp("single")
    runs = {steps: fit(assets["pretrained"], assets["rows"], root / str(steps), max_steps=steps) for steps in (5, 10)}
    fit(assets["pretrained"], assets["rows"], root / "sparse", method="sparse")
    val_loss = validate(runs[10].lightning_module, assets["pretrained"], assets["rows"])  # the merged model
    val_loss_19 = validate(runs[5].lightning_module, assets["pretrained"], assets["rows"], max_rows=19)
    val_loss_19_10 = validate(runs[10].lightning_module, assets["pretrained"], assets["rows"], max_rows=19)
    return {
        5: root / "5",
        10: root / "10",
        "sparse": root / "sparse",
        "val_loss": val_loss,
        "val_loss_19": val_loss_19,
        "val_loss_19_10": val_loss_19_10,
    }


# ---- equivalence -----------------------------------------------------------------------------------------------
def test_ddp_matches_single_process_and_all_reduces_only_the_adapters(tmp_path, assets, single):
    out, logs = tmp_path / "run", tmp_path / "logs"
    cmd = torchrun(2, free_port(), "--redirects=3", f"--log-dir={logs}", *worker_args(assets, out, "ddp"))
    assert finish([start(cmd, tmp_path / "torchrun.log")]) == [0], log_text(tmp_path / "torchrun.log")[-3000:]
    assert_same_exports(single[5], out)
    assert_same_exports(single["sparse"], out / "sparse")
    assert_same_exports(single[5], out / "accumulated")  # 1 row per rank per micro-batch, accumulate_grad_batches=2
    assert_same_exports(out / "accumulated", out / "resumed", atol=1e-7)  # resumed from its mid-epoch step 3
    report = json.loads((out / "report.json").read_text())
    assert report["allreduce_bytes"] == 5 * report["trainable_bytes"] > 0  # adapters only, once per step
    # 19 validation rows of unequal lengths on 2 ranks: each scored once, as in one process (no repeated row)
    assert report["val_loss_19_rows"] == pytest.approx(single["val_loss_19"], abs=1e-6)

    # rank-0-only side effects: messages, progress bars and files come from rank 0
    by_rank = {r: "".join(log_text(f) for f in logs.glob(f"*/attempt_0/{r}/*.log")) for r in (0, 1)}
    for line in ("LoRA: 6 layers adapted", "MergeAdapters: wrote the merged model", "lightning-ft data: train"):
        assert line in by_rank[0] and line not in by_rank[1], line
    assert "Loading weights" not in by_rank[1]  # transformers' progress bar
    assert {p.name for p in out.iterdir()} == {"accumulated", "adapter", "merged", "report.json", "resumed", "sparse"}


def test_fsdp2_matches_single_process_and_resumes_from_a_sharded_checkpoint(tmp_path, assets, single):
    out = tmp_path / "run"
    proc = start(torchrun(2, free_port(), *worker_args(assets, out, "fsdp2")), tmp_path / "torchrun.log")
    assert finish([proc]) == [0], log_text(tmp_path / "torchrun.log")[-3000:]
    assert_same_exports(single[10], out)  # 10 steps with activation checkpointing
    report = json.loads((out / "report.json").read_text())
    assert report["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)  # validate after fit, still sharded
    # 19 rows of unequal lengths on 2 ranks: equal shards with a filler row; each real row scored once
    assert report["val_loss_19_rows"] == pytest.approx(single["val_loss_19_10"], abs=1e-6)
    # adapter-only and sharded: one file per rank, only the adapters of the 2 blocks x 3 layers
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= set(report["checkpoint_files"])
    keys = report["checkpoint_model_keys"]
    assert len(keys) == 12 and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    # resumed at step 3 of 10 (inside the first epoch of 5 steps): the same result as the unbroken run
    assert_same_exports(out, out / "resumed", atol=1e-7)
    # a checkpoint written by another number of processes is refused on every rank before training
    assert "written by 3 processes but this run has 2" in report["resume_error"]
    assert not (out / "refused" / "adapter").exists()


def test_fsdp2_sharded_loading_equals_the_plain_fsdp2_run_and_reads_only_each_ranks_rows(tmp_path, assets):
    """``AdapterFSDP2Strategy(sharded_loading=True)``: the same losses, adapters and merged model as the plain FSDP2
    run (same seed, unequal-length rows), while each rank reads only slices of the weight files, its own rows."""
    from safetensors import safe_open

    from lightning_ft.strategies.meta_load import shard_rows

    out = tmp_path / "run"
    proc = start(torchrun(2, free_port(), *worker_args(assets, out, "fsdp2_meta")), tmp_path / "torchrun.log")
    assert finish([proc]) == [0], log_text(tmp_path / "torchrun.log")[-3000:]
    assert_same_exports(out / "plain", out / "meta", atol=1e-6)
    with safe_open(str(Path(assets["pretrained"]) / "model.safetensors"), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    for rank in (0, 1):
        record = json.loads((out / f"rank{rank}.json").read_text())
        plain, meta = record["plain"]["losses"], record["meta"]["losses"]
        assert len(plain) == len(meta) == 5 and len(set(plain)) == 5
        assert meta == pytest.approx(plain, rel=1e-6, abs=1e-6)
        assert record["plain"]["reads"] == []  # the plain path loads through from_pretrained
        reads = record["meta"]["reads"]
        assert sorted(key for key, _, _ in reads) == sorted(shapes)  # every weight once
        # frozen weights outside the blocks (embedding, final norm) are whole on every rank (replicate_frozen_root)
        whole = {k for k in shapes if not k.startswith("model.layers.")}
        for key, got, full in reads:  # a slice: this rank's rows of dimension 0, never the whole tensor
            if key in whole:
                assert got == full == shapes[key], key
                continue
            first, stop = shard_rows(full[0], rank, 2)
            assert full == shapes[key] and got == [stop - first, *full[1:]] and got[0] < full[0], key
        report = record["meta"]["load_report"]
        assert report["elements_read"] == sum(got[0] * math.prod(got[1:]) for _, got, _ in reads)
        whole_elements = sum(math.prod(shapes[k]) for k in whole)
        assert report["elements_read"] <= (report["elements_full"] + whole_elements) / 2 + 1e3
        assert "already built with its weights" in record["object_error"]


def cli_config(tmp_path: Path, assets: dict, batch_size: int) -> Path:
    """A recipe for ``lightning-ft fit`` that trains as ``distributed_worker.fit`` does, exporting into tmp_path."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 5
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  limit_val_batches: 0
  deterministic: true
  default_root_dir: {tmp_path}
model:
  class_path: lightning_ft.LoRAModule
  init_args:
    model_name_or_path: {assets["pretrained"]}
    r: 4
    alpha: 8
    learning_rate: 5.0e-3
    weight_decay: 0.01
    target_modules: [q_proj, v_proj, up_proj]
    adapter_dir: {tmp_path / "adapter"}
    merged_dir: {tmp_path / "merged"}
data:
  task: instruction
  train: {assets["rows"]}
  max_length: 64
  batch_size: {batch_size}
"""
    )
    return config


def test_two_nodes_through_the_launch_script_match_single_process(tmp_path, assets, single):
    """``recipes/launch_torchrun.sh`` once per "node" (one process each, FSDP2 by its registered name)."""
    config = cli_config(tmp_path, assets, batch_size=2)
    port = str(free_port())
    procs = [
        start(
            ["bash", str(ROOT / "recipes" / "launch_torchrun.sh"), str(config)],
            tmp_path / f"node{rank}.log",
            NNODES="2",
            NODE_RANK=str(rank),
            NPROC_PER_NODE="1",
            MASTER_PORT=port,
            STRATEGY="adapter_fsdp2",
            PYTHON=sys.executable,
        )
        for rank in (0, 1)
    ]
    assert finish(procs) == [0, 0], log_text(tmp_path / "node0.log")[-3000:]
    assert_same_exports(single[5], tmp_path)


def test_slurm_script_runs_two_tasks_through_srun(tmp_path, assets, single):
    """``recipes/launch_slurm.sbatch`` under a stand-in ``srun`` that starts the tasks of one node with SLURM's
    variables; Lightning's SLURMEnvironment takes the ranks from them (DDP by default)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(
        "#!/bin/bash\n"
        'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" & done\n'
        "wait\n"
    )
    (fake / "srun").chmod(0o755)
    config = cli_config(tmp_path, assets, batch_size=2)
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "lightning-ft",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    path = f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    proc = start(
        ["bash", str(ROOT / "recipes" / "launch_slurm.sbatch"), str(config)], tmp_path / "job.log", PATH=path, **slurm
    )
    assert finish([proc]) == [0], log_text(tmp_path / "job.log")[-3000:]
    assert "MEMBER: 2/2" in log_text(tmp_path / "job.log")
    assert_same_exports(single[5], tmp_path)


# ---- bad input: clear errors before any work -------------------------------------------------------------------
def test_fsdp1_refuses_the_cpu_at_trainer_construction():
    for strategy in (AdapterFSDP1Strategy(), "adapter_fsdp1"):
        with pytest.raises(ValueError, match="AdapterFSDP1Strategy needs CUDA GPUs"):
            L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)


def test_more_cpu_processes_than_cores_fail_at_trainer_construction():
    with pytest.raises(ValueError, match=r"CPU cores available; use devices <="):
        L.Trainer(accelerator="cpu", devices=available_cpus() + 1, strategy="adapter_ddp", logger=False)


def test_devices_must_match_the_processes_torchrun_started(monkeypatch):
    env = {
        "TORCHELASTIC_RUN_ID": "test",
        "RANK": "0",
        "GROUP_RANK": "0",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"does not match the world size \(2\)"):
        L.Trainer(accelerator="cpu", devices=1, strategy=AdapterDDPStrategy(), logger=False)


# ---- a failing rank ends the run everywhere --------------------------------------------------------------------
def test_an_exception_on_one_node_ends_the_run_on_every_node(tmp_path, assets):
    port = free_port()
    procs = [
        start(
            torchrun(1, port, *worker_args(assets, tmp_path, "fail", "--num_nodes", "2"), nnodes=2, node_rank=r),
            tmp_path / f"node{r}.log",
        )
        for r in (0, 1)
    ]
    assert all(code != 0 for code in finish(procs))
    assert "RuntimeError: planned failure on rank 1 at step 2" in log_text(tmp_path / "node1.log")
    assert "remote worker crashing" in log_text(tmp_path / "node0.log")  # rank 0 learns it from gloo at once


def test_an_exception_in_the_launching_process_stops_the_others(tmp_path, assets):
    """Without torchrun, Lightning starts rank 1 itself; when rank 0 raises, the strategy stops rank 1."""
    proc = start(
        [sys.executable, *worker_args(assets, tmp_path, "fail", "--devices", "2", "--fail_rank", "0")],
        tmp_path / "run.log",
    )
    assert finish([proc]) != [0]
    text = log_text(tmp_path / "run.log")
    assert "RuntimeError: planned failure on rank 0 at step 2" in text
    assert "[rank: 1] Received SIGTERM" in text


# ---- pure helpers ----------------------------------------------------------------------------------------------
def test_blocks_come_from_the_models_no_split_modules(tokenizer):
    model = tiny_llama(len(tokenizer))
    assert [type(b).__name__ for b in find_blocks(model)] == ["LlamaDecoderLayer"] * 2
    assert len(find_blocks(model, ["LlamaMLP"])) == 2
    with pytest.raises(ValueError, match="pass block_classes"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_merged_state_dict_equals_merging_in_place(tokenizer):
    """What MergeAdapters writes for a sharded model (a merge of gathered tensors) equals an in-place merge."""
    model = tiny_llama(len(tokenizer))
    inject_lora(model, r=4, use_dora=True, use_rslora=True, bias="lora_only", rank_pattern={"v_proj": 2})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    expected = merge_lora(copy.deepcopy(model)).state_dict()
    got = merged_state_dict(model, gathered)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_peft_adapter_written_from_a_state_dict(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    inject_lora(model, r=4)
    doubled = {k: 2 * v for k, v in model.state_dict().items()}
    save_peft_adapter(model, tmp_path / "own")
    save_peft_adapter(model, tmp_path / "given", state_dict=doubled)
    own, given = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("own", "given"))
    assert own.keys() == given.keys() and all(torch.equal(given[k], 2 * own[k]) for k in own)


def test_fsdp1_units_never_mix_frozen_and_trainable_parameters(tokenizer):
    model = tiny_llama(len(tokenizer))
    inject_lora(model, r=4, modules_to_save=["lm_head"])
    units = adapter_wrap_modules(model)
    assert mixed_units(model, units) == {}
    names = {n for n, m in model.named_modules() if m in units}
    assert {
        "model.layers.0",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.q_proj.base_layer",
        "lm_head",
    } <= names
    policy = adapter_wrap_policy()
    assert policy(model, recurse=True, nonwrapped_numel=0)
    assert policy(model.model.layers[0].mlp.up_proj, recurse=False, nonwrapped_numel=0)
    assert not policy(model.model.norm, recurse=False, nonwrapped_numel=0)

    biased = tiny_bert(len(tokenizer))
    inject_lora(biased, r=4, target_modules=["query"], bias="all")  # a frozen `key` weight with a trained bias
    with pytest.raises(ValueError, match="mix trainable and frozen"):
        adapter_wrap_policy()(biased, recurse=True, nonwrapped_numel=0)
