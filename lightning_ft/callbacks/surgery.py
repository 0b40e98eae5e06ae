"""``ModelSurgery``: the shared shell of callbacks that change the model before it is wrapped (``LoRA``,
``SparseMask``): a one-shot ``configure_model`` wrapper, and adapter-only checkpoints that resume exactly.

When it runs. ``Trainer._run`` (lightning 2.6, ``trainer/trainer.py``) does, in this order::

    call._call_setup_hook(self)          # datamodule.setup, callbacks' setup, module.setup
    call._call_configure_model(self)     # module.configure_model (only when overridden), in the strategy's
                                         # tensor_init / sharded / precision init contexts
    ... _restore_modules_and_callbacks(ckpt_path)   # unless the strategy restores after setup (FSDP2)
    self.strategy.setup(self)            # precision convert, move to device, DDP/FSDP wrap, configure_optimizers
    on_fit_start hooks; restore after setup (FSDP2); restore_training_state (optimizer, schedulers, loops)

A callback's ``setup`` runs *before* ``configure_model``, and no callback hook runs between ``configure_model`` and
``strategy.setup``. So ``setup`` installs a one-shot wrapper as the module's ``configure_model`` (an instance
attribute): Lightning calls it in the right contexts, right after the module's own ``configure_model`` (and its
``setup``), before the checkpoint is restored, before wrapping and before the optimizer is built. The wrapper removes
itself before doing anything, so the module is left exactly as it was. The wrapper carries no ``__wrapped__``, so
Lightning's ``is_overridden("configure_model")`` (``call.py`` ``_call_configure_model``) is true for it even when
the module builds its model in ``__init__`` and does not override the hook. Calling ``configure_model`` ourselves in
``setup`` would run it before the module's ``setup`` and outside those contexts (meta-device / sharded init, the
precision's default dtype). ``_patched = (module, previous configure_model)`` while the wrapper is pending (other
callbacks, e.g. ``LowRankCompression``, slot their own wrapper in underneath through it).

Checkpoints. With the method applied, ``on_save_checkpoint`` keeps only ``state_keys(module)`` (the trained
tensors) in ``checkpoint["state_dict"]``; optimizer, scheduler and loop state are kept, so
``Trainer.fit(ckpt_path=...)`` resumes exactly. The frozen base comes from where the module gets it (the pretrained
source), so it must be the same base. Lightning loads the state dict with ``strict=module.strict_loading`` *before*
any callback's ``on_load_checkpoint`` (``checkpoint_connector.py`` ``restore_model`` then ``restore_callbacks``), so
``relax_strict_loading`` sets ``strict_loading = False`` (unless the user set it) and ``on_load_checkpoint`` checks
the keys itself: every key of ``state_keys`` present, no key the module lacks. Lightning skips callbacks'
``on_save_checkpoint`` for ``save_weights_only=True`` checkpoints, which therefore hold the full state dict.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor


def state_dict_megabytes(state_dict: dict[str, Any]) -> float:
    return sum(t.numel() * t.element_size() for t in state_dict.values() if isinstance(t, Tensor)) / 2**20


class ModelSurgery(L.Callback):
    """Base class: subclasses set ``label`` and ``checkpoint_key`` and implement ``inject_into``, ``is_applied`` and
    ``state_keys`` (see the module docstring). ``checkpoint_megabytes`` is ``(adapter-only, full)`` of the last save.
    """

    label = "ModelSurgery"  # the name in messages
    checkpoint_key = "lightning_ft_surgery"  # checkpoint entry: {"adapter_only": True, "config": ...}

    def __init__(self) -> None:
        self.checkpoint_megabytes: tuple[float, float] | None = None
        self._patched: tuple[L.LightningModule, Any] | None = None
        self._strict_loading: tuple[L.LightningModule, bool | None] | None = None

    # ---- what a method defines -----------------------------------------------------------------------------------
    def inject_into(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Change the module (called once per stage, right after its ``configure_model``)."""
        raise NotImplementedError

    def is_applied(self, pl_module: L.LightningModule) -> bool:
        """Whether ``pl_module`` currently holds this method's trainable state (so checkpoints are adapter-only)."""
        raise NotImplementedError

    def state_keys(self, pl_module: L.LightningModule) -> list[str]:
        """State-dict keys an adapter-only checkpoint keeps."""
        raise NotImplementedError

    def checkpoint_config(self) -> Any:
        """What ``checkpoint[checkpoint_key]["config"]`` records."""
        return None

    # ---- the one-shot configure_model wrapper -----------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if any(isinstance(cb, type(self)) and cb is not self for cb in trainer.callbacks):
            raise RuntimeError(f"more than one {self.label} callback in the Trainer; {self.label} is injected once")
        others = [cb.label for cb in trainer.callbacks if isinstance(cb, ModelSurgery) and not isinstance(cb, type(self))]
        if others:
            # each keeps only its own tensors in checkpoints, so together they would drop each other's
            raise RuntimeError(f"{self.label} and {others[0]} cannot adapt the same module in one Trainer; choose one")
        self._unpatch()
        previous = pl_module.__dict__.get("configure_model")  # normally None: the class's method

        def configure_model() -> None:  # deliberately no functools.wraps: see the module docstring
            self._unpatch()
            pl_module.configure_model()  # the module's own (or a previously set instance attribute)
            self.inject_into(trainer, pl_module)

        pl_module.configure_model = configure_model
        self._patched = (pl_module, previous)

    def _unpatch(self) -> None:
        if self._patched is None:
            return
        module, previous = self._patched
        self._patched = None
        if previous is None:
            module.__dict__.pop("configure_model", None)
        else:
            module.configure_model = previous

    def relax_strict_loading(self, pl_module: L.LightningModule) -> None:
        """Let Lightning load adapter-only state dicts; ``on_load_checkpoint`` checks the keys instead."""
        if pl_module._strict_loading is None:
            self._strict_loading = (pl_module, pl_module._strict_loading)
            pl_module.strict_loading = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._unpatch()
        if self._strict_loading is not None:
            module, value = self._strict_loading
            module._strict_loading = value
            self._strict_loading = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, trainer.state.fn or "fit")

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self.is_applied(pl_module):
            return
        state = checkpoint["state_dict"]
        keep = self.state_keys(pl_module)
        if missing := [k for k in keep if k not in state]:
            rank_zero_warn(f"{self.label}: trained tensors {missing[:3]} are not in the state dict; saving it in full")
            return
        full_mb = state_dict_megabytes(state)
        checkpoint["state_dict"] = {k: state[k] for k in keep}
        checkpoint[self.checkpoint_key] = {"adapter_only": True, "config": self.checkpoint_config()}
        adapter_mb = state_dict_megabytes(checkpoint["state_dict"])
        if self.checkpoint_megabytes is None:
            rank_zero_info(
                f"{self.label}: adapter-only checkpoint, state_dict {adapter_mb:.2f} MB ({len(keep)} tensors) "
                f"instead of {full_mb:.2f} MB"
            )
        self.checkpoint_megabytes = (adapter_mb, full_mb)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # runs after Lightning loaded the state dict non-strictly (see the module docstring): check the keys here
        if self._strict_loading is None or "state_dict" not in checkpoint:
            return
        saved = set(checkpoint["state_dict"])
        missing = [k for k in self.state_keys(pl_module) if k not in saved]
        unexpected = sorted(saved - set(pl_module.state_dict()))
        if missing or unexpected:
            raise RuntimeError(
                f"the checkpoint does not fit this {self.label} model: {len(missing)} trained tensors missing "
                f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}. Resume with the same "
                f"{self.label} settings and the same base model."
            )
