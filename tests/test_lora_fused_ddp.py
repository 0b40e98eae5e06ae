"""Two-process DDP with fused LoRA adapters equals a single unfused process on the whole batch."""

from __future__ import annotations

import torch
from helpers import run_torchrun
from lora_fused_ddp_worker import build, train


def test_two_process_ddp_with_fused_adapters_matches_one_unfused_process(tmp_path):
    out = tmp_path / "rank0.pt"
    proc = run_torchrun("lora_fused_ddp_worker.py", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ddp = torch.load(out)
    single = train(build(fuse=False))
    assert ddp.keys() == single.keys() and len(single) == 2 * 2 * 7
    start = build(fuse=False).state_dict()
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, atol=1e-5, rtol=1e-5, msg=key)
        assert not torch.equal(value, start[key]), f"{key} did not train"
