"""The lightning-ft strategies shut the process group down at exit for gloo too (Lightning does it for NCCL only):
a gloo group left to interpreter finalisation aborted 1 CPU DDP run in 5 to 10 after training had finished."""

from __future__ import annotations

import subprocess
import sys

from helpers import free_port, worker_env

SCRIPT = """
import atexit, sys
import torch.distributed as dist
import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning_ft.strategies import AdapterDDPStrategy

# registered first, so it runs last: what the process group looks like when the interpreter starts to go down
atexit.register(lambda: open(sys.argv[1], "w").write(str(dist.is_initialized())))
trainer = L.Trainer(
    accelerator="cpu", devices=1, strategy=AdapterDDPStrategy(), max_steps=1, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    default_root_dir=sys.argv[2],
)
trainer.fit(BoringModel())
assert dist.is_initialized() and dist.get_backend() == "gloo"
"""


def test_gloo_process_group_is_destroyed_before_interpreter_exit(tmp_path):
    probe = tmp_path / "initialized_at_exit.txt"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(probe), str(tmp_path)],
        env=worker_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),  # not a port an earlier test left
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert probe.read_text() == "False"
