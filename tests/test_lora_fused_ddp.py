"""Two-process DDP with fused LoRA adapters equals a single unfused process on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from lora_fused_ddp_worker import build, train

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_with_fused_adapters_matches_one_unfused_process(tmp_path):
    out = tmp_path / "rank0.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(HERE / "lora_fused_ddp_worker.py"),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ddp = torch.load(out)
    single = train(build(fuse=False))
    assert ddp.keys() == single.keys() and len(single) == 2 * 2 * 7
    start = build(fuse=False).state_dict()
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, atol=1e-5, rtol=1e-5, msg=key)
        assert not torch.equal(value, start[key]), f"{key} did not train"
