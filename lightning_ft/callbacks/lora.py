"""``LoRA``: inject LoRA adapters into any LightningModule before the strategy wraps it; adapter-only checkpoints.

When it injects. ``Trainer._run`` (lightning 2.6, ``trainer/trainer.py``) does, in this order::

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
precision's default dtype).

Re-runs. Lightning calls ``setup`` and ``configure_model`` again for ``validate`` / ``test`` / ``predict`` after
``fit`` (and for a second ``fit``). The module remembers the settings it was injected with; a LoRA callback with the
same settings then keeps the adapters (and restores which parameters train), a different one meets
``inject_lora``'s "already has LoRA adapters" error. After ``MergeAdapters`` merged them, evaluation runs on the
merged model and a new ``fit`` injects fresh adapters on top of it.

Checkpoints. With adapters in the module, ``on_save_checkpoint`` keeps only the trainable parameters (adapters,
``modules_to_save``, trained biases) in ``checkpoint["state_dict"]``; optimizer, scheduler and loop state are kept,
so ``Trainer.fit(ckpt_path=...)`` resumes exactly. The frozen base comes from where the module gets it (the
pretrained source), so it must be the same base. Lightning loads the state dict with
``strict=module.strict_loading`` *before* any callback's ``on_load_checkpoint`` (``checkpoint_connector.py``
``restore_model`` then ``restore_callbacks``), so the wrapper sets ``strict_loading = False`` (unless the user set it)
and ``on_load_checkpoint`` checks the keys itself: every trainable parameter present, no key the module lacks.
Lightning skips callbacks' ``on_save_checkpoint`` for ``save_weights_only=True`` checkpoints, which therefore hold
the full state dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_ft.lora import inject_lora, lora_layers, lora_state_dict
from lightning_ft.lora.inject import check_lora_args, is_adapter_param

MARKER = "_lightning_ft_lora"  # attribute of the module: {"config": settings, "trainable": names that train}


# ---- pure helpers ----------------------------------------------------------------------------------------------
def adapter_state_keys(module: nn.Module) -> list[str]:
    """State-dict keys of an adapter-only checkpoint: adapter weights plus every other trainable parameter."""
    return list(lora_state_dict(module))


def state_dict_megabytes(state_dict: dict[str, Any]) -> float:
    return sum(t.numel() * t.element_size() for t in state_dict.values() if isinstance(t, Tensor)) / 2**20


def parameter_table(module: nn.Module) -> str:
    """A Markdown table of adapter / other trainable / frozen / total parameter counts."""
    adapters = other = frozen = 0
    for name, p in module.named_parameters():
        if is_adapter_param(name):
            adapters += p.numel()
        elif p.requires_grad:
            other += p.numel()
        else:
            frozen += p.numel()
    total = max(adapters + other + frozen, 1)
    rows = [
        ("LoRA adapters", adapters), ("other trainable", other), ("trainable", adapters + other),
        ("frozen", frozen), ("total", adapters + other + frozen),
    ]  # fmt: skip
    lines = ["| parameters | count | share |", "|---|---:|---:|"]
    lines += [f"| {label} | {n:,} | {100 * n / total:.2f}% |" for label, n in rows]
    return "\n".join(lines)


def top_level_hf_models(module: nn.Module) -> list[nn.Module]:
    """Every ``transformers.PreTrainedModel`` inside ``module`` that is not inside another one."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(f"{n}.") or not n for n, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def ensure_input_grads_for_checkpointing(module: nn.Module) -> list[nn.Module]:
    """Make input embeddings require grad in every Hugging Face model of ``module`` that checkpoints activations.

    With a frozen base and reentrant activation checkpointing, no input of a checkpointed block requires grad, so
    the adapters inside get no gradient and backward fails with "element 0 of tensors does not require grad".
    Returns the models it changed.
    """
    changed = []
    for model in top_level_hf_models(module):
        prop = getattr(type(model), "is_activation_checkpointing", None)  # transformers >= 5; older: the gradient_ name
        on = prop.fget(model) if prop is not None else getattr(model, "is_gradient_checkpointing", False)
        if on and not getattr(model, "_require_grads_hooks", None) and not getattr(model, "_require_grads_hook", None):
            model.enable_input_require_grads()
            changed.append(model)
    return changed


# ---- the callback ----------------------------------------------------------------------------------------------
class LoRA(L.Callback):
    """Inject LoRA adapters into the LightningModule (wherever it keeps its linear layers) and freeze the rest.

    Takes the arguments of ``lightning_ft.lora.inject_lora``. Works for models built in ``__init__``, in ``setup``
    or in ``configure_model``; injection happens before DDP / FSDP wrapping, before ``configure_optimizers`` and
    before a checkpoint is restored. Checkpoints hold only the trainable weights (plus optimizer, scheduler and loop
    state) and resume exactly on the same base model. See the module docstring for the details.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: str | Sequence[str] = "all-linear",
        exclude_modules: str | Sequence[str] | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: Literal["default", "gaussian", "pissa"] = "default",
        modules_to_save: Sequence[str] | None = None,
        bias: Literal["none", "all", "lora_only"] = "none",
    ) -> None:
        check_lora_args(r, bias, init)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules, self.exclude_modules = target_modules, exclude_modules
        self.rank_pattern, self.alpha_pattern = rank_pattern, alpha_pattern
        self.use_rslora, self.use_dora, self.init = use_rslora, use_dora, init
        self.modules_to_save, self.bias = modules_to_save, bias
        self.checkpoint_megabytes: tuple[float, float] | None = None  # (adapter-only, full) of the last save
        self._patched: tuple[L.LightningModule, Any] | None = None
        self._strict_loading: tuple[L.LightningModule, bool | None] | None = None

    @property
    def lora_kwargs(self) -> dict[str, Any]:
        """The ``inject_lora`` keyword arguments."""
        names = ("r", "alpha", "dropout", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                 "use_rslora", "use_dora", "init", "modules_to_save", "bias")  # fmt: skip
        return {k: getattr(self, k) for k in names}

    # ---- injection -------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if any(isinstance(cb, LoRA) and cb is not self for cb in trainer.callbacks):
            raise RuntimeError("more than one LoRA callback in the Trainer; LoRA is injected once")
        self._unpatch()
        previous = pl_module.__dict__.get("configure_model")  # normally None: the class's method

        def configure_model() -> None:  # deliberately no functools.wraps: see the module docstring
            self._unpatch()
            pl_module.configure_model()  # the module's own (or a previously set instance attribute)
            self.inject_into(trainer, pl_module)

        pl_module.configure_model = configure_model
        self._patched = (pl_module, previous)

    def inject_into(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Inject (or keep what this configuration injected before), then prepare checkpointing and loading."""
        marker = getattr(pl_module, MARKER, None)
        config = self.lora_kwargs
        has_adapters = bool(lora_layers(pl_module))
        same = marker is not None and marker["config"] == config
        if same and has_adapters:
            for name, p in pl_module.named_parameters():  # a module's configure_model may have unfrozen the base
                p.requires_grad_(name in marker["trainable"])
        elif same and trainer.state.fn != "fit":
            pass  # merged by MergeAdapters: evaluate the merged model
        else:
            inject_lora(pl_module, **config)  # RuntimeError when the module already has adapters
            trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
            setattr(pl_module, MARKER, {"config": config, "trainable": trainable})
            rank_zero_info(
                f"LoRA: {len(lora_layers(pl_module))} layers adapted (r={self.r}, alpha={self.alpha})\n"
                + parameter_table(pl_module)
            )
        if ensure_input_grads_for_checkpointing(pl_module):
            rank_zero_info("LoRA: activation checkpointing is on; made input embeddings require grad")
        if lora_layers(pl_module) and pl_module._strict_loading is None:
            self._strict_loading = (pl_module, pl_module._strict_loading)
            pl_module.strict_loading = False  # adapter-only checkpoints; on_load_checkpoint checks the keys

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a module may turn activation checkpointing on after configure_model (e.g. in on_fit_start)
        if lora_layers(pl_module):
            ensure_input_grads_for_checkpointing(pl_module)

    def _unpatch(self) -> None:
        if self._patched is None:
            return
        module, previous = self._patched
        self._patched = None
        if previous is None:
            module.__dict__.pop("configure_model", None)
        else:
            module.configure_model = previous

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
        if not lora_layers(pl_module) or getattr(pl_module, MARKER, None) is None:
            return
        state = checkpoint["state_dict"]
        keep = adapter_state_keys(pl_module)
        if missing := [k for k in keep if k not in state]:
            rank_zero_warn(f"LoRA: trainable parameters {missing[:3]} are not in the state dict; saving it in full")
            return
        full_mb = state_dict_megabytes(state)
        checkpoint["state_dict"] = {k: state[k] for k in keep}
        checkpoint["lightning_ft_lora"] = {"adapter_only": True, "config": repr(self.lora_kwargs)}
        adapter_mb = state_dict_megabytes(checkpoint["state_dict"])
        if self.checkpoint_megabytes is None:
            rank_zero_info(
                f"LoRA: adapter-only checkpoint, state_dict {adapter_mb:.2f} MB ({len(keep)} tensors) "
                f"instead of {full_mb:.2f} MB"
            )
        self.checkpoint_megabytes = (adapter_mb, full_mb)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # runs after Lightning loaded the state dict non-strictly (see the module docstring): check the keys here
        if self._strict_loading is None or "state_dict" not in checkpoint:
            return
        saved = set(checkpoint["state_dict"])
        missing = [k for k in adapter_state_keys(pl_module) if k not in saved]
        unexpected = sorted(saved - set(pl_module.state_dict()))
        if missing or unexpected:
            raise RuntimeError(
                f"the checkpoint does not fit this LoRA model: {len(missing)} trainable parameters missing "
                f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}. Resume with the same LoRA "
                "settings and the same base model."
            )
