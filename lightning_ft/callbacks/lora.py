"""``LoRA``: inject LoRA adapters into any LightningModule before the strategy wraps it; adapter-only checkpoints.

When it injects, and how checkpoints work: see ``lightning_ft.callbacks.surgery`` (``ModelSurgery``, shared with
``SparseMask``): a one-shot ``configure_model`` wrapper installed in ``setup`` injects right after the module's own
``configure_model``, before the checkpoint is restored, before wrapping and before the optimizer is built.

Re-runs. Lightning calls ``setup`` and ``configure_model`` again for ``validate`` / ``test`` / ``predict`` after
``fit`` (and for a second ``fit``). The module remembers the settings it was injected with; a LoRA callback with the
same settings then keeps the adapters (and restores which parameters train), a different one meets
``inject_lora``'s "already has LoRA adapters" error. After ``MergeAdapters`` merged them, evaluation runs on the
merged model and a new ``fit`` injects fresh adapters on top of it.

Checkpoints hold only the trainable parameters (adapters, ``modules_to_save``, trained biases) plus optimizer,
scheduler and loop state, and resume exactly on the same base model. They also record every LoRA setting and a
fingerprint of the base model: a resume with other settings (``alpha``, ``r``, targets, ...) or on another base model
is refused with one message listing the differences, unless ``allow_config_change=True`` (see
``lightning_ft.callbacks.surgery`` and ``lightning_ft.resume_checks``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_ft.callbacks.surgery import ModelSurgery
from lightning_ft.lora import inject_lora, lora_layers, lora_state_dict
from lightning_ft.lora.config import LoRAConfig
from lightning_ft.lora.inject import METHOD
from lightning_ft.method_config import check_type, config_from_kwargs, takes_config
from lightning_ft.modeling import adapter_param_names, ensure_input_grads_for_checkpointing

SPEED_ONLY = ("fuse", "compile")  # LoRAConfig fields left out of the resume checks
MARKER = "_lightning_ft_lora"  # attribute of the module: {"config": settings, "trainable": names that train}


# ---- pure helpers ----------------------------------------------------------------------------------------------
def adapter_state_keys(module: nn.Module) -> list[str]:
    """State-dict keys of an adapter-only checkpoint: adapter weights plus every other trainable parameter."""
    return list(lora_state_dict(module))


def parameter_table(module: nn.Module) -> str:
    """A Markdown table of adapter / other trainable / frozen / total parameter counts."""
    adapters = other = frozen = 0
    names = {n for n in adapter_param_names(module, METHOD) if not n.endswith(".base_layer.bias")}
    for name, p in module.named_parameters():
        if name in names:
            adapters += p.numel()
        elif p.requires_grad:
            other += p.numel()
        else:
            frozen += p.numel()
    total = max(adapters + other + frozen, 1)
    rows = [
        ("LoRA adapters", adapters),
        ("other trainable", other),
        ("trainable", adapters + other),
        ("frozen", frozen),
        ("total", adapters + other + frozen),
    ]
    lines = ["| parameters | count | share |", "|---|---:|---:|"]
    lines += [f"| {label} | {n:,} | {100 * n / total:.2f}% |" for label, n in rows]
    return "\n".join(lines)


# ---- the callback ----------------------------------------------------------------------------------------------
class LoRA(ModelSurgery):
    """Inject LoRA adapters into the LightningModule (wherever it keeps its linear layers) and freeze the rest.

    Takes a ``LoRAConfig`` (``config=``) or its fields as keyword arguments, like ``lightning_ft.lora.inject_lora``;
    ``self.config`` holds the result. Works for models built in ``__init__``, in ``setup``
    or in ``configure_model``; injection happens before DDP / FSDP wrapping, before ``configure_optimizers`` and
    before a checkpoint is restored. Checkpoints hold only the trainable weights (plus optimizer, scheduler and loop
    state) and resume exactly on the same base model. See the module docstring for the details.

    Resume checks: a checkpoint records every LoRA setting and a fingerprint of the base model. Resuming
    (``Trainer.fit(ckpt_path=...)``) with any other argument, or on another base model, is refused before anything is
    loaded, with one message listing each difference as ``setting: saved -> now``; ``validate`` / ``test`` /
    ``predict`` with a checkpoint ignore ``dropout``. ``allow_config_change=True`` is the escape hatch for a
    deliberate change (e.g. continue with another ``alpha`` or ``dropout``, or on a further trained base): the
    differences are then a warning. Tensors of other shapes (another ``r``, other targets) or ``use_dora``
    switched on or off cannot load either way.
    """

    label = "LoRA"
    checkpoint_key = "lightning_ft_lora"
    training_only = ("dropout",)
    fixed_settings = ("use_dora",)  # DoRA's magnitude vectors are tensors of their own

    @takes_config(LoRAConfig, kwargs_name=None)
    def __init__(self, allow_config_change: bool = False, *, config: LoRAConfig | None = None, **kwargs: Any) -> None:
        check_type("allow_config_change", allow_config_change, bool, LoRAConfig)
        self.config = config_from_kwargs(LoRAConfig, config, kwargs)
        if kwargs:
            raise TypeError(f"LoRA got unexpected keyword arguments {sorted(kwargs)}")
        super().__init__(allow_config_change=allow_config_change)
        self._evaluating_merged = False  # set per stage: the module holds the merged model (no adapters)

    @property
    def lora_kwargs(self) -> dict[str, Any]:
        """The ``inject_lora`` keyword arguments (``self.config`` as a dict)."""
        return {name: getattr(self.config, name) for name in LoRAConfig.field_names()}

    # ---- injection -------------------------------------------------------------------------------------------
    @override
    def inject_into(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Inject (or keep what this configuration injected before), then prepare checkpointing and loading."""
        marker = getattr(pl_module, MARKER, None)
        config = self.lora_kwargs
        self._evaluating_merged = False
        has_adapters = bool(lora_layers(pl_module))
        same = marker is not None and marker["config"] == config
        if same and has_adapters:
            for name, p in pl_module.named_parameters():  # a module's configure_model may have unfrozen the base
                p.requires_grad_(name in marker["trainable"])
        elif same and trainer.state.fn != "fit":  # merged by MergeAdapters: evaluate the merged model
            self._evaluating_merged = True
            self.relax_strict_loading(pl_module)  # so on_load_checkpoint can explain an adapter-only checkpoint
        else:
            inject_lora(pl_module, config=self.config)  # RuntimeError when the module already has adapters
            trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
            setattr(pl_module, MARKER, {"config": config, "trainable": trainable})
            rank_zero_info(
                f"LoRA: {len(lora_layers(pl_module))} layers adapted (r={self.config.r}, alpha={self.config.alpha})\n"
                + parameter_table(pl_module)
            )
        if ensure_input_grads_for_checkpointing(pl_module):
            rank_zero_info("LoRA: activation checkpointing is on; made input embeddings require grad")
        if lora_layers(pl_module):
            self.relax_strict_loading(pl_module)  # adapter-only checkpoints; on_load_checkpoint checks the keys

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._evaluating_merged and checkpoint.get(self.checkpoint_key, {}).get("adapter_only"):
            raise RuntimeError(
                "the LoRA adapters were merged into the model at the end of fit (MergeAdapters), so an adapter-only "
                "checkpoint no longer fits it. Evaluate the in-memory merged model (ckpt_path=None), or load the "
                "checkpoint into a fresh module with the same settings."
            )
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    @override
    def is_applied(self, pl_module: L.LightningModule) -> bool:
        return bool(lora_layers(pl_module)) and getattr(pl_module, MARKER, None) is not None

    @override
    def state_keys(self, pl_module: L.LightningModule) -> list[str]:
        return adapter_state_keys(pl_module)

    @override
    def checkpoint_config(self) -> dict[str, Any]:
        # fuse / compile change speed only, never the numbers: a resume may switch them freely
        return {k: v for k, v in self.config.to_dict().items() if k not in SPEED_ONLY}

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a module may turn activation checkpointing on after configure_model (e.g. in on_fit_start)
        if lora_layers(pl_module):
            ensure_input_grads_for_checkpointing(pl_module)
