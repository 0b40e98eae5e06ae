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

Resume checks (``lightning_ft.resume_checks``). The checkpoint entry (``checkpoint[checkpoint_key]``) records the
callback's full configuration (``checkpoint_config``), the call that recreates it, the saved tensors' shapes and a
fingerprint of the base model, taken in the ``configure_model`` wrapper right before ``inject_into`` (base weights,
not adapters; without the values of tensors the checkpoint carries). Because callbacks' ``on_load_checkpoint`` runs
after the state dict is loaded (where an ``r`` change fails with a long ``size mismatch`` list), ``setup`` registers
``check_resume`` through ``register_check``: an instance-level ``on_load_checkpoint`` on the module, which Lightning
calls right before ``load_model_state_dict``. ``check_resume`` compares the settings (those in ``training_only`` only
when ``fit`` resumes: ``validate`` / ``test`` / ``predict`` may use other training settings) and the base fingerprint,
and raises one message listing every difference (``setting: saved -> now``), unless ``allow_config_change=True``
(then it warns); shapes that cannot load are refused either way. A checkpoint entry naming a callback this run lacks
is refused by ``check_before_load`` with the call to add. Checkpoints of earlier versions (no fingerprint, settings as
a repr) are checked as far as they allow, with a warning.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ft._compat import get_strict_loading, set_strict_loading
from lightning_ft.resume_checks import (
    FINGERPRINT_ATTR,
    compare_configs,
    compare_fingerprints,
    constructor_call,
    drop_samples,
    listing,
    read_config,
    register_check,
    saved_shapes,
    surgery_fingerprint,
    unregister_check,
)
from lightning_ft.strategies.checkpoint_io import check_checkpoints


def state_dict_megabytes(state_dict: dict[str, Any]) -> float:
    return sum(t.numel() * t.element_size() for t in state_dict.values() if isinstance(t, Tensor)) / 2**20


def init_defaults(cls: type) -> dict[str, Any]:
    """The default values of ``cls.__init__``'s keyword arguments."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def public_path(cls: type) -> str:
    """``lightning_ft.callbacks.LoRA`` rather than ``lightning_ft.callbacks.lora.LoRA`` for the package's callbacks."""
    if cls.__module__.startswith("lightning_ft.callbacks."):
        return f"lightning_ft.callbacks.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


class ModelSurgery(L.Callback):
    """Base class: subclasses set ``label``, ``checkpoint_key`` and ``training_only`` and implement ``inject_into``,
    ``is_applied``, ``state_keys`` and ``checkpoint_config`` (see the module docstring). ``checkpoint_megabytes`` is
    ``(adapter-only, full)`` of the last save. ``allow_config_change``: resume a checkpoint saved with other settings
    or on another base model (a warning lists the differences instead of an error).
    """

    label = "ModelSurgery"  # the name in messages
    checkpoint_key = "lightning_ft_surgery"  # checkpoint entry: see lightning_ft.resume_checks
    training_only: tuple[str, ...] = ()  # settings that only steer training: compared only when fit resumes
    fixed_settings: tuple[str, ...] = ()  # settings whose change no checkpoint survives, allow_config_change or not

    def __init__(self, allow_config_change: bool = False) -> None:
        self.allow_config_change = allow_config_change
        self.checkpoint_megabytes: tuple[float, float] | None = None
        self._patched: tuple[L.LightningModule, Any] | None = None
        self._relaxed: tuple[L.LightningModule, bool | None] | None = None
        self._checking: tuple[L.LightningModule, str] | None = None  # (module, stage) while check_resume is registered

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

    def checkpoint_config(self) -> dict[str, Any]:
        """Every setting of the callback, as the keyword arguments of its constructor (plain data)."""
        raise NotImplementedError

    def export_metadata(self) -> dict[str, Any] | None:
        """What ``MergeAdapters`` records about the method in an exported adapter folder (default: nothing)."""
        return None

    def fixed_shape(self, key: str) -> bool:
        """Whether the saved tensor ``key`` must have the module's shape to load (sparse layers re-size themselves)."""
        return True

    # ---- the one-shot configure_model wrapper -----------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_checkpoints(trainer)  # a damaged ckpt_path: its path and a remedy, not torch's EOFError
        if any(isinstance(cb, type(self)) and cb is not self for cb in trainer.callbacks):
            raise RuntimeError(f"more than one {self.label} callback in the Trainer; {self.label} is injected once")
        others = [
            cb.label for cb in trainer.callbacks if isinstance(cb, ModelSurgery) and not isinstance(cb, type(self))
        ]
        if others:
            # each keeps only its own tensors in checkpoints, so together they would drop each other's
            raise RuntimeError(f"{self.label} and {others[0]} cannot adapt the same module in one Trainer; choose one")
        self._unpatch()
        previous = pl_module.__dict__.get("configure_model")  # normally None: the class's method

        def configure_model() -> None:  # deliberately no functools.wraps: see the module docstring
            self._unpatch()
            pl_module.configure_model()  # the module's own (or a previously set instance attribute)
            fresh = not self.is_applied(pl_module)
            # before injection (the base weights; before QuantizeBase quantised them, when it did)
            fingerprint = surgery_fingerprint(pl_module) if fresh else None
            self.inject_into(trainer, pl_module)
            if fingerprint is not None and self.is_applied(pl_module):
                # values of the tensors the checkpoint carries itself (a fresh head, ...) need not match
                pl_module.__dict__[FINGERPRINT_ATTR] = drop_samples(fingerprint, self.state_keys(pl_module))

        pl_module.configure_model = configure_model
        self._patched = (pl_module, previous)
        self._unregister()
        register_check(pl_module, self.checkpoint_key, self.check_resume)
        self._checking = (pl_module, stage)

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
        if get_strict_loading(pl_module) is None:
            self._relaxed = (pl_module, None)
            set_strict_loading(pl_module, False)

    def _unregister(self) -> None:
        if self._checking is not None:
            unregister_check(self._checking[0], self.checkpoint_key)
            self._checking = None

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._unpatch()
        self._unregister()
        if self._relaxed is not None:
            module, value = self._relaxed
            set_strict_loading(module, value)
            self._relaxed = None

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, trainer.state.fn or "fit")

    # ---- checkpoints -----------------------------------------------------------------------------------------
    @override
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
        checkpoint[self.checkpoint_key] = self.checkpoint_entry(pl_module, checkpoint["state_dict"])
        adapter_mb = state_dict_megabytes(checkpoint["state_dict"])
        if self.checkpoint_megabytes is None:
            rank_zero_info(
                f"{self.label}: adapter-only checkpoint, state_dict {adapter_mb:.2f} MB ({len(keep)} tensors) "
                f"instead of {full_mb:.2f} MB"
            )
        self.checkpoint_megabytes = (adapter_mb, full_mb)

    def checkpoint_entry(self, pl_module: L.LightningModule, state: dict[str, Any]) -> dict[str, Any]:
        """What an adapter-only checkpoint records about the method (see ``lightning_ft.resume_checks``)."""
        config = self.checkpoint_config()
        return {
            "adapter_only": True,
            "callback": self.label,
            "callback_path": public_path(type(self)),
            "constructor": constructor_call(self.label, config, init_defaults(type(self))),
            "config": config,
            "training_only": list(self.training_only),
            "tensors": {k: [int(s) for s in v.shape] for k, v in state.items() if isinstance(v, Tensor)},
            "base": pl_module.__dict__.get(FINGERPRINT_ATTR),
        }

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Before the state dict is loaded: refuse other settings or another base model (one message listing every
        difference; a warning with ``allow_config_change=True``), and tensors whose shapes cannot load."""
        if self._checking is None:
            return
        pl_module, stage = self._checking
        if not self.is_applied(pl_module):
            return  # e.g. LoRA evaluating a merged model: its on_load_checkpoint explains
        entry = checkpoint.get(self.checkpoint_key)
        if not isinstance(entry, dict):
            rank_zero_warn(
                f"{self.label}: the checkpoint records no {self.label} settings (written without the {self.label} "
                "callback, as weights only, or by an earlier lightning-ft); its settings and base model are not checked"
            )
            return
        now = self.checkpoint_config()
        saved = read_config(entry.get("config"))
        skip = () if stage == "fit" else entry.get("training_only", self.training_only)
        settings = compare_configs(saved, now, skip) if saved is not None else []
        fingerprint = pl_module.__dict__.get(FINGERPRINT_ATTR)
        base = compare_fingerprints(entry["base"], fingerprint) if entry.get("base") and fingerprint else []
        unchecked = [what for what, there in (("settings", saved), ("base model", entry.get("base"))) if there is None]
        if unchecked:
            rank_zero_warn(
                f"{self.label}: the checkpoint was written by an earlier lightning-ft and records no "
                f"{' and no '.join(unchecked)} to check; resuming without checking {' and '.join(unchecked)}"
            )
        differences = settings + base
        reshaped = self._reshaped(pl_module, checkpoint, entry)
        fixed = [k for k in _changed(settings) if k in self.fixed_settings]
        if not differences and not reshaped:
            return
        how = " and ".join(w for w, d in (("with other settings", settings), ("on another base model", base)) if d)
        body = "\n".join(f"  {line}" for line in differences + reshaped)
        if differences and self.allow_config_change and not reshaped and not fixed:
            rank_zero_warn(
                f"{self.label}: resuming a checkpoint written {how}, as allow_config_change=True asks "
                f"(saved -> now):\n{body}"
            )
            return
        call = constructor_call(self.label, saved or now, init_defaults(type(self)), also=_changed(settings))
        if reshaped:  # cannot load, whatever the flag says
            hatch = (
                "Tensors of other shapes (another rank, other target modules, another model size) cannot be resumed, "
                "not even with allow_config_change=True: to train with these settings, start a new run."
            )
        elif fixed:
            hatch = (
                f"{' and '.join(fixed)} cannot change on resume, not even with allow_config_change=True: to train "
                "with these settings, start a new run."
            )
        else:
            these = " and ".join(w for w, d in (("these settings", settings), ("this base model", base)) if d)
            hatch = (
                f"To continue with {these} on purpose, pass allow_config_change=True to {self.label} (also an "
                "argument of the lightning-ft method modules)."
            )
        raise RuntimeError(
            f"the checkpoint does not fit this {self.label} model: it was written "
            f"{how or 'with tensors of other shapes'} (saved -> now):\n{body}\nResume with the saved settings, "
            f"{call}, on the base model it was trained on. {hatch}"
        )

    def _reshaped(self, pl_module: L.LightningModule, checkpoint: dict[str, Any], entry: dict) -> list[str]:
        """A line on the saved tensors whose shapes differ from the module's (``[]`` when none do)."""
        saved = saved_shapes(checkpoint, entry) or {}
        now = {k: list(v.shape) for k, v in pl_module.state_dict(keep_vars=True).items() if isinstance(v, Tensor)}
        reshaped = [k for k, s in saved.items() if k in now and s is not None and s != now[k] and self.fixed_shape(k)]
        if not reshaped:
            return []
        shown = [f"{k} {tuple(saved[k])} -> {tuple(now[k])}" for k in reshaped]
        return [f"tensor shapes: {len(reshaped)} of {len(saved)} saved tensors differ: {listing(shown, 2)}"]

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # runs after Lightning loaded the state dict non-strictly (see the module docstring): check the keys here
        if self._relaxed is None or "state_dict" not in checkpoint:
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


def _changed(lines: list[str]) -> list[str]:
    """The setting names of ``compare_configs`` lines."""
    return [line.split(":", 1)[0] for line in lines]
