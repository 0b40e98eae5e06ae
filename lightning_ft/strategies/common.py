"""What the lightning-ft strategies share: refuse settings that cannot run before any process starts, and a resume
with another world size before any training step; keep progress output on rank 0; give each rank its share of the
sampler's order without reshuffling it.

``AdapterStrategyMixin`` comes before the Lightning strategy: ``class S(AdapterStrategyMixin, DDPStrategy)``.
"""

from __future__ import annotations

import atexit
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch.accelerators import CPUAccelerator
from torch.distributed.constants import default_pg_timeout
from typing_extensions import override

from lightning_ft._compat import BeforeLaunchHook, is_distributed_sampler_wrapper, kill_launched_processes
from lightning_ft.file_checks import check_checkpoint

WORLD_SIZE_KEY = "lightning_ft_world_size"  # checkpoint key: the number of processes that wrote it


def as_timeout(seconds: float | timedelta | None) -> timedelta:
    """How long a rank waits for the others in a collective before failing; ``None``: torch's default (30 min)."""
    if seconds is None:
        return default_pg_timeout
    return seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, which SLURM and taskset restrict)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_launch(strategy: Any) -> None:
    """Fail on ``devices`` that this machine or the launcher cannot provide.

    When Lightning starts the processes itself, CPU ``devices`` may not exceed the cores (GPUs Lightning checks
    itself). When torchrun or SLURM started them, ``devices * num_nodes`` must match the processes they started.
    """
    devices = len(strategy.parallel_devices or [])
    env = strategy.cluster_environment
    if env is not None and env.creates_processes_externally:
        env.validate_settings(num_devices=devices, num_nodes=strategy.num_nodes)
    elif isinstance(strategy.accelerator, CPUAccelerator) and devices > (cpus := available_cpus()):
        raise ValueError(
            f"devices={devices} asks for {devices} CPU processes, but this machine has {cpus} CPU cores available; "
            f"use devices <= {cpus} (each process also needs OMP_NUM_THREADS <= cores / devices)"
        )


def check_world_size(checkpoint: dict[str, Any], world_size: int, path: str | os.PathLike) -> None:
    """Refuse to resume from a checkpoint written by a different number of processes.

    The global batch and each rank's share of the data depend on the world size, so such a run would not continue
    the saved one. Checkpoints without the record (written by other strategies) are accepted.
    """
    saved = checkpoint.get(WORLD_SIZE_KEY)
    if saved is not None and saved != world_size:
        raise RuntimeError(
            f"{Path(path).name} was written by {saved} processes but this run has {world_size} "
            f"(num_nodes x devices). Resume with {saved} processes to continue the run exactly; to start a new run "
            "from its weights, load them without ckpt_path (e.g. load_peft_adapter on the exported adapter)."
        )


def destroy_process_group() -> None:
    """Shut the default process group down if it is still up (an ``atexit`` handler, so idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Shut the process group down while the interpreter is still whole, for every backend.

    Lightning registers this only for NCCL. A gloo group (CPU DDP / FSDP) left to interpreter finalisation aborts
    the process now and then ("terminate called without an active exception", exit -6; 2 of 20 LoRA DDP runs and 5
    of 25 over an int8 base on a busy 2-core machine) after training has finished: torchrun and schedulers then
    report the job as failed. Lightning's own handler (NCCL) and this one may both run; the second finds no group.
    """
    atexit.unregister(destroy_process_group)
    atexit.register(destroy_process_group)


def quiet_progress_bars() -> None:
    """Turn off Hugging Face's progress bars (weight loading, shard writing) in this process."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


class AdapterStrategyMixin(BeforeLaunchHook):
    """Mixin for a Lightning ``ParallelStrategy``: ``check_launch`` at ``Trainer`` construction, the world size
    recorded in every checkpoint and checked on resume, progress bars on global rank 0 only, the process group shut
    down at exit (for gloo too), every rank stopped when the launching process fails, and a custom sampler's order
    kept (each rank takes every n-th position)."""

    def setup_environment(self) -> None:
        super().setup_environment()  # starts the process group
        destroy_process_group_at_exit()
        if self.global_rank != 0:  # Lightning's own progress bar already stays on rank 0
            quiet_progress_bars()

    @override
    def before_launch(self) -> None:
        # the accelerator, devices and cluster environment are known, still inside Trainer(...): nothing launched yet
        check_launch(self)

    def process_dataloader(self, dataloader: Any) -> Any:
        # Lightning wraps a custom sampler in a DistributedSamplerWrapper that, for training, shuffles the sampler's
        # order once more (its docstring says the shuffle has no effect). That breaks a seeded epoch order or length
        # grouping, and each step's batches across ranks would no longer be the single-process batch. Without it,
        # rank r of n takes positions r, r + n, ... of the sampler's order.
        sampler = getattr(dataloader, "sampler", None)
        if is_distributed_sampler_wrapper(sampler):
            sampler.shuffle = False
        return super().process_dataloader(dataloader)

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        # Lightning's launcher stops every rank when one of the processes it started fails, but not when the
        # launching process (rank 0) fails: the others would wait in their next collective until the timeout
        kill_launched_processes(self.launcher, signal.SIGTERM)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        checkpoint[WORLD_SIZE_KEY] = self.world_size
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint(checkpoint_path)  # the path and a remedy, not torch's EOFError, for a damaged file
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        check_world_size(checkpoint, self.world_size, checkpoint_path)
        return checkpoint
