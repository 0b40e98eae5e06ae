"""The one place that touches private Lightning names.

Every function here wraps an attribute or import that Lightning does not document as public. Each carries a comment
naming the Lightning version it was checked against; ``tests/test_compat.py`` has a test per wrapped name that fails
loudly when Lightning renames or removes it. Everything else in ``lightning_ft`` uses public APIs only.

Checked against lightning 2.6.6 (``pip show lightning``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

CHECKED_AGAINST = "2.6.6"


# --- LightningModule.strict_loading ----------------------------------------------------------------------------------
# Checked against lightning 2.6.6: the public property ``strict_loading`` returns ``_strict_loading in (None, True)``,
# so it cannot tell "unset" (None) from an explicit True; callbacks that relax strictness only when the user did not
# choose need the raw value.


def get_strict_loading(module: L.LightningModule) -> bool | None:
    """The ``strict_loading`` the user set on ``module``; None when unset (Lightning's default, strict)."""
    return module._strict_loading  # lightning 2.6.6: LightningModule.__init__ sets ``self._strict_loading = None``


def set_strict_loading(module: L.LightningModule, value: bool | None) -> None:
    """Set ``strict_loading`` on ``module``; None restores "unset" (the public setter accepts only a bool)."""
    if value is None:
        module._strict_loading = None  # lightning 2.6.6: the public setter stores into ``_strict_loading``
    else:
        module.strict_loading = value


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer ``module`` is attached to, None when it is not (public API only: ``module.trainer`` raises then)."""
    try:
        return module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`."
        return None


# --- the loader a loop will use, before the loop has built it ---------------------------------------------------------
# Checked against lightning 2.6.6: ``trainer.train_dataloader`` (public) is None until the fit loop's ``setup_data``
# runs, after the ``setup`` / ``on_fit_start`` hooks where calibration happens. The loops' ``_data_source``
# (a ``_DataLoaderSource``) resolves the user's loader/datamodule/module hook on demand.

_LOOPS = {"fit": "fit_loop", "validate": "validate_loop", "test": "test_loop", "predict": "predict_loop"}


def stage_dataloader(trainer: L.Trainer, stage: str = "fit") -> Any:
    """The (train, for ``fit``) dataloader(s) the loop of ``stage`` will use; None when there are none.

    Calls the ``*_dataloader`` hook of the module or datamodule when that is the source, as the loop itself will.
    """
    if stage not in _LOOPS:
        raise ValueError(f"stage must be one of {sorted(_LOOPS)}, got {stage!r}")
    loop = getattr(trainer, _LOOPS[stage])
    return loop._data_source.dataloader()  # lightning 2.6.6: ``_Loop._data_source: _DataLoaderSource``


def train_dataloader(trainer: L.Trainer) -> Any:
    """The train DataLoader(s) the fit loop uses, as the user's source returns them, also before the loop has set up
    (e.g. in ``setup``). Unlike the public ``trainer.train_dataloader`` this is the loader before Lightning injects a
    ``DistributedSampler``: calibration code shards batches across ranks itself."""
    return stage_dataloader(trainer, "fit")


# --- FSDP1 activation checkpointing -----------------------------------------------------------------------------------
# Checked against lightning 2.6.6: ``FSDPStrategy.__init__`` turns ``activation_checkpointing_policy`` into
# ``self._activation_checkpointing_kwargs`` (``{"auto_wrap_policy": ...}``); a strategy that chooses the layers later
# (in ``setup``, once the model exists) overwrites that dict.


def set_activation_checkpointing_kwargs(strategy: Any, kwargs: dict[str, Any]) -> None:
    """Set the keyword arguments ``FSDPStrategy`` passes to ``apply_activation_checkpointing``."""
    if not hasattr(strategy, "_activation_checkpointing_kwargs"):
        raise AttributeError(
            f"{type(strategy).__name__} has no _activation_checkpointing_kwargs (checked against lightning "
            f"{CHECKED_AGAINST}); lightning_ft/_compat.py needs updating for this Lightning version"
        )
    strategy._activation_checkpointing_kwargs = kwargs  # lightning 2.6.6: FSDPStrategy attribute


# --- strategies -------------------------------------------------------------------------------------------------------


class BeforeLaunchHook:
    """Mixin for a Lightning ``Strategy``: ``before_launch()`` runs inside ``Trainer(...)``, once the accelerator,
    devices, nodes and cluster environment are set on the strategy and before any process is launched.

    Checked against lightning 2.6.6: ``_AcceleratorConnector._lazy_init_strategy`` sets those attributes, then calls
    ``strategy._configure_launcher()``; no public hook runs at that point.
    """

    def before_launch(self) -> None:
        """Override to validate the settings; raise to stop ``Trainer(...)``."""

    def _configure_launcher(self) -> None:  # lightning 2.6.6: Strategy._configure_launcher
        self.before_launch()
        super()._configure_launcher()  # type: ignore[misc]


def kill_launched_processes(launcher: Any, signum: int) -> bool:
    """Send ``signum`` to the processes Lightning's script launcher started (``Trainer(devices=N)`` from a script);
    False when ``launcher`` is another kind or started none."""
    # lightning 2.6.6: lightning.pytorch.strategies.launchers.subprocess_script._SubprocessScriptLauncher
    # (.procs, .kill)
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    if not isinstance(launcher, _SubprocessScriptLauncher) or not launcher.procs:
        return False
    launcher.kill(signum)
    return True


def is_distributed_sampler_wrapper(sampler: Any) -> bool:
    """Whether ``sampler`` is the ``DistributedSamplerWrapper`` Lightning puts around a custom sampler."""
    # lightning 2.6.6: lightning.fabric.utilities.distributed.DistributedSamplerWrapper, created by
    # lightning.pytorch.trainer.connectors.data_connector._get_distributed_sampler (not in the API reference)
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    return isinstance(sampler, DistributedSamplerWrapper)


def set_model_parallel_sizes(strategy: Any, data_parallel: int, tensor_parallel: int) -> None:
    """Override the mesh sizes of a ``ModelParallelStrategy``; call it in ``setup_environment`` before ``super()``.

    The sizes are constructor arguments, but the world size (``num_nodes * num_processes``) is known only once the
    Trainer set the devices; ``"auto"`` resolves to nodes x processes-per-node (a tensor-parallel node).
    """
    for name in ("_data_parallel_size", "_tensor_parallel_size"):  # lightning 2.6.6: ModelParallelStrategy.__init__
        if not hasattr(strategy, name):
            raise AttributeError(
                f"{type(strategy).__name__} has no {name} (checked against lightning {CHECKED_AGAINST}); "
                "lightning_ft/_compat.py needs updating for this Lightning version"
            )
    strategy._data_parallel_size = data_parallel
    strategy._tensor_parallel_size = tensor_parallel


def is_sharded_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a sharded (``torch.distributed.checkpoint``) Lightning checkpoint folder."""
    from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint  # lightning 2.6.6

    return _is_sharded_checkpoint(Path(path))


def sharded_checkpoint_metadata_path(path: Any) -> Path:
    """The file in a sharded Lightning checkpoint folder that holds everything but the tensors (``meta.pt``)."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME  # lightning 2.6.6: "meta.pt"

    return Path(path) / _METADATA_FILENAME
