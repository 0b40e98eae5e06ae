"""Every private Lightning name ``lightning_ft/_compat.py`` wraps, checked against the installed Lightning.

A failure here means Lightning renamed, removed or changed one of them: update ``_compat.py`` (and the version in
its comments), not the callers.
"""

from __future__ import annotations

import inspect
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lightning_ft import _compat


def tiny_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_checked_version_is_the_installed_major_minor():
    installed = tuple(int(x) for x in L.__version__.split(".")[:2])
    checked = tuple(int(x) for x in _compat.CHECKED_AGAINST.split(".")[:2])
    assert installed == checked, f"_compat.py was checked against lightning {_compat.CHECKED_AGAINST}; re-check it"


def test_strict_loading_round_trip():  # LightningModule._strict_loading
    module = BoringModel()
    assert hasattr(module, "_strict_loading"), "LightningModule._strict_loading is gone"
    assert _compat.get_strict_loading(module) is None and module.strict_loading is True
    _compat.set_strict_loading(module, False)
    assert _compat.get_strict_loading(module) is False and module.strict_loading is False
    _compat.set_strict_loading(module, True)
    assert _compat.get_strict_loading(module) is True and module.strict_loading is True
    _compat.set_strict_loading(module, None)
    assert _compat.get_strict_loading(module) is None and module.strict_loading is True


def test_attached_trainer():
    module = BoringModel()
    assert _compat.attached_trainer(module) is None
    trainer = tiny_trainer()
    module.trainer = trainer
    assert _compat.attached_trainer(module) is trainer


class _SeeLoaders(L.Callback):
    def setup(self, trainer, pl_module, stage):
        self.train = _compat.train_dataloader(trainer)
        self.validate = _compat.stage_dataloader(trainer, "validate")


def test_loaders_before_the_loop_sets_up():  # _Loop._data_source (_DataLoaderSource.dataloader)
    for name in ("fit_loop", "validate_loop", "test_loop", "predict_loop"):
        loop = getattr(tiny_trainer(), name)
        assert callable(getattr(getattr(loop, "_data_source", None), "dataloader", None)), f"{name}._data_source"
    seen = _SeeLoaders()
    trainer = tiny_trainer(callbacks=[seen])
    assert trainer.train_dataloader is None  # the public property is empty before the loop sets up
    trainer.fit(BoringModel())
    assert isinstance(seen.train, DataLoader) and isinstance(seen.validate, DataLoader)
    with pytest.raises(ValueError, match="stage"):
        _compat.stage_dataloader(trainer, "tune")


class _Recorder(_compat.BeforeLaunchHook, DDPStrategy):
    calls = 0

    def before_launch(self) -> None:
        type(self).calls += 1
        assert self.accelerator is not None and self.parallel_devices, "before_launch ran before the devices were set"


def test_before_launch_runs_inside_trainer():  # Strategy._configure_launcher
    assert hasattr(DDPStrategy, "_configure_launcher"), "Strategy._configure_launcher is gone"
    _Recorder.calls = 0
    tiny_trainer(strategy=_Recorder())
    assert _Recorder.calls == 1, "Lightning no longer calls strategy._configure_launcher() in Trainer(...)"


class _Proc:
    pid = 0

    def __init__(self):
        self.signals = []

    def send_signal(self, signum):
        self.signals.append(signum)


def test_kill_launched_processes():  # _SubprocessScriptLauncher (.procs, .kill)
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
    assert launcher.procs == []
    assert not _compat.kill_launched_processes(launcher, signal.SIGTERM)  # none started
    assert not _compat.kill_launched_processes(None, signal.SIGTERM)
    launcher.procs = [proc := _Proc()]
    assert _compat.kill_launched_processes(launcher, signal.SIGTERM)
    assert proc.signals == [signal.SIGTERM]


class _Ordered(Sampler):
    def __init__(self, order):
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


def test_distributed_sampler_wrapper_keeps_order_without_shuffle():  # fabric DistributedSamplerWrapper
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    order = [5, 3, 0, 4, 1, 2]
    wrapped = DistributedSamplerWrapper(_Ordered(order), num_replicas=2, rank=1, shuffle=True)
    assert _compat.is_distributed_sampler_wrapper(wrapped)
    assert not _compat.is_distributed_sampler_wrapper(_Ordered(order))
    wrapped.shuffle = False  # what AdapterStrategyMixin.process_dataloader does
    assert list(wrapped) == order[1::2]


def test_model_parallel_sizes():  # ModelParallelStrategy._data_parallel_size / _tensor_parallel_size
    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    _compat.set_model_parallel_sizes(strategy, data_parallel=4, tensor_parallel=1)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)
    source = inspect.getsource(ModelParallelStrategy.setup_environment)
    assert "self._data_parallel_size" in source and "self._tensor_parallel_size" in source, (
        "ModelParallelStrategy.setup_environment no longer reads _data_parallel_size / _tensor_parallel_size"
    )
    with pytest.raises(AttributeError, match="_compat.py needs updating"):
        _compat.set_model_parallel_sizes(object(), 1, 1)


def test_sharded_checkpoint_layout(tmp_path: Path):  # _is_sharded_checkpoint, _METADATA_FILENAME
    folder = tmp_path / "epoch=0.ckpt"
    folder.mkdir()
    assert not _compat.is_sharded_checkpoint(folder)
    meta = _compat.sharded_checkpoint_metadata_path(folder)
    assert meta.parent == folder and meta.name == "meta.pt"
    torch.save({"global_step": 1}, meta)
    assert _compat.is_sharded_checkpoint(folder)
    (tmp_path / "full.ckpt").write_bytes(b"")
    assert not _compat.is_sharded_checkpoint(tmp_path / "full.ckpt")


def test_activation_checkpointing_kwargs():  # FSDPStrategy._activation_checkpointing_kwargs
    strategy = FSDPStrategy(activation_checkpointing_policy={nn.Linear})
    assert isinstance(getattr(strategy, "_activation_checkpointing_kwargs", None), dict)
    assert "self._activation_checkpointing_kwargs" in inspect.getsource(FSDPStrategy), (
        "FSDPStrategy no longer reads _activation_checkpointing_kwargs when it wraps the model"
    )
    kwargs = {"check_fn": lambda m: isinstance(m, nn.Linear)}
    _compat.set_activation_checkpointing_kwargs(strategy, kwargs)
    assert strategy._activation_checkpointing_kwargs is kwargs
    with pytest.raises(AttributeError, match="_compat.py needs updating"):
        _compat.set_activation_checkpointing_kwargs(object(), kwargs)


def test_no_private_lightning_name_outside_the_compat_module():
    """Every private Lightning name the library relies on goes through ``lightning_ft/_compat.py``."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "lightning_ft"
    private_import = re.compile(r"^\s*from lightning[\w.]* import [^#\n]*\b_[A-Za-z]", re.M)
    private_attr = re.compile(
        r"\.(_strict_loading|_data_source|_configure_launcher|_activation_checkpointing_kwargs|_data_parallel_size|"
        r"_tensor_parallel_size|_ddp_comm_hook|_ddp_comm_state|_register_ddp_hooks|_trainer|_launcher|_results)\b"
    )
    private_member = re.compile(
        r"\b(trainer|strategy|fit_loop|epoch_loop|launcher|accelerator|precision_plugin|checkpoint_io)\._[a-z]\w*"
    )
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name.startswith("_compat"):
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(root)}: {m.group(0).strip()}" for m in private_import.finditer(text)]
        offenders += [f"{path.relative_to(root)}: {m.group(0)}" for m in private_attr.finditer(text)]
        offenders += [f"{path.relative_to(root)}: {m.group(0)}" for m in private_member.finditer(text)]
    assert not offenders, offenders
