"""``SparseMask``: sparse fine-tuning of any LightningModule: only a chosen subset of weight entries trains.

When it selects. Like ``LoRA`` (see ``lightning_ft.callbacks.surgery``), a one-shot ``configure_model`` wrapper
selects the entries and injects the sparse layers right after the module's own ``configure_model``: before the
checkpoint is restored, before DDP wrapping and before the optimizer is built (delta mode creates new parameters, so
this cannot wait for ``on_fit_start``). Gradient criteria run ``calibration_batches`` batches of the train loader
through ``training_step`` (logging switched off, torchmetrics states reset afterwards, dropout off) or through
``loss_fn(pl_module, batch)``, on the strategy's device and under its precision context, outside the global random
stream (``torch.random.fork_rng``), so the training shuffle and dropout are the same with or without calibration.
Under ``torch.distributed`` each rank takes every ``world_size``-th of those batches, the statistics are summed over
ranks, and rank 0's masks are broadcast: the masks are identical on every rank and equal to a single process's.

Checkpoints hold each layer's ``indices`` and ``values`` (plus other trained parameters, optimizer, scheduler and
loop state, and a pending re-selection's gradient accumulators) and resume exactly on the same base model; on resume
the calibration still runs, and the checkpoint's masks then replace its result (layers are re-sized when a ``global``
allocation gave them another size). ``validate`` / ``test`` / ``predict`` on a fresh module inject empty (zero)
deltas of the budget's size, which a checkpoint then fills.

Modes. ``mode="delta"`` (default) trains ``values`` at the selected entries over a frozen base: gradients and
optimizer state for those entries only. ``mode="mask"`` trains the dense weights and keeps every other entry bitwise
unchanged (``lightning_ft.sparse.mask.GradientMask``: gradients masked in ``on_before_optimizer_step``, decoupled
weight decay taken over and masked); it needs the memory of full fine-tuning of the targeted weights.

Re-selection (``reselect_every=N``): SpIEL-style drop / grow every N steps (``lightning_ft.sparse.reselect``), logged
as ``sparse/density``, ``sparse/mask_overlap``, ``sparse/grad_norm_share`` and ``sparse/drop_fraction``; also kept in
``history``. ``MergeAdapters`` folds the deltas into the base at fit end and can export them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ft._compat import train_dataloader
from lightning_ft.callbacks.surgery import ModelSurgery
from lightning_ft.method_config import check_type, config_from_kwargs, takes_config
from lightning_ft.modeling import ensure_input_grads_for_checkpointing
from lightning_ft.sparse.calibration import rank_and_world
from lightning_ft.sparse.config import GRADIENT_CRITERIA, SparseConfig
from lightning_ft.sparse.inject import (
    inject_sparse,
    sparse_counts,
    sparse_extra_params,
    sparse_layers,
    sparse_state_keys,
)
from lightning_ft.sparse.mask import GradientMask
from lightning_ft.sparse.reselect import DynamicReselection
from lightning_ft.sparse.selection import budget, select_sparse
from lightning_ft.targets import select_modules

MARKER = "_lightning_ft_sparse"  # attribute of the module: {"config": settings, "trainable": names that train}


def training_step_loss(pl_module: L.LightningModule, batch: Any, batch_idx: int = 0) -> Tensor:
    """The loss ``training_step`` returns (a tensor, or a mapping's ``"loss"``)."""
    out = pl_module.training_step(batch, batch_idx)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"SparseMask: training_step returned {type(out).__name__}, not a loss tensor; pass loss_fn(pl_module, "
            "batch) -> loss for the calibration batches"
        )
    return loss


@contextmanager
def calibration_mode(pl_module: L.LightningModule) -> Iterator[None]:
    """Run the module outside the training loop: no logging, dropout off, torchmetrics updates undone afterwards."""
    from torchmetrics import Metric

    saved_attrs = {k: pl_module.__dict__[k] for k in ("log", "log_dict") if k in pl_module.__dict__}
    modes = {m: m.training for m in pl_module.modules()}
    counts = {m: m.update_count for m in pl_module.modules() if isinstance(m, Metric)}
    pl_module.log = lambda *args, **kwargs: None
    pl_module.log_dict = lambda *args, **kwargs: None
    pl_module.eval()
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            pl_module.__dict__.pop(k, None)
        pl_module.__dict__.update(saved_attrs)
        for m, training in modes.items():
            m.training = training
        for m, count in counts.items():
            if m.update_count != count:
                m.reset()


class SparseMask(ModelSurgery):
    """Train only a selected subset of the weight entries of the module's linear layers (see the module docstring).

    Takes a ``SparseConfig`` (``config=``) or its fields as keyword arguments (documented in ``SparseConfig``);
    ``self.config`` holds the result.

    Args:
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` for calibration (default: ``training_step``'s loss).
        allow_config_change: resume a checkpoint written with other settings or on another base model.

    Resume checks: a checkpoint records every argument above (``loss_fn`` aside) and a fingerprint of the base model.
    Resuming ``fit`` with any other argument (``density``, ``criterion``, ...: the checkpoint's masks would silently
    replace the new selection), or on another base model, is refused before anything is loaded, with one message
    listing each difference as ``setting: saved -> now``. ``validate`` / ``test`` / ``predict`` with a checkpoint
    check only ``mode``, ``target_modules``, ``exclude_modules`` and ``modules_to_save`` (the masks come from the
    checkpoint). ``allow_config_change=True`` turns the differences into a warning, for a deliberate change
    (``mode`` cannot change either way).
    """

    label = "SparseMask"
    checkpoint_key = "lightning_ft_sparse"
    training_only = (
        "density",
        "criterion",
        "calibration_batches",
        "reselect_every",
        "lora_equivalent_rank",
        "allocation",
        "drop_fraction",
        "drop_schedule",
        "grow_window",
        "seed",
    )
    fixed_settings = ("mode",)  # delta values and dense weights are different tensors

    @takes_config(SparseConfig, kwargs_name=None)
    def __init__(
        self,
        loss_fn: Callable[[L.LightningModule, Any], Tensor] | None = None,
        allow_config_change: bool = False,
        *,
        config: SparseConfig | None = None,
        **kwargs: Any,
    ) -> None:
        check_type("loss_fn", loss_fn, callable, SparseConfig)
        check_type("allow_config_change", allow_config_change, bool, SparseConfig)
        self.config = config_from_kwargs(SparseConfig, config, kwargs)
        if kwargs:
            raise TypeError(f"SparseMask got unexpected keyword arguments {sorted(kwargs)}")
        super().__init__(allow_config_change=allow_config_change)
        self.loss_fn = loss_fn
        self.history: list[dict[str, float]] = []  # one entry per re-selection: step and what it logged
        self.masker: GradientMask | None = None
        self.reselection: DynamicReselection | None = None
        self._pending_accumulators: dict[str, Tensor] = {}
        self._last_step = -1

    @property
    def settings(self) -> dict[str, Any]:
        """What decides the selected entries and their storage (re-selection settings excluded)."""
        return self.config.selection()

    # ---- selection and injection ------------------------------------------------------------------------------
    @override
    def inject_into(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Select and inject (or keep what these settings injected before), then prepare checkpoints."""
        marker = getattr(pl_module, MARKER, None)
        config = self.settings
        same = marker is not None and marker["config"] == config
        if same and self.is_applied(pl_module):
            for name, p in pl_module.named_parameters():  # a module's configure_model may have unfrozen the base
                p.requires_grad_(name in marker["trainable"])
        elif same and trainer.state.fn != "fit":
            pass  # merged by MergeAdapters: evaluate the merged model
        else:
            if sparse_layers(pl_module):
                raise RuntimeError("the module already has sparse deltas; inject once (merge_sparse removes them)")
            names = select_modules(pl_module, self.config.target_modules, self.config.exclude_modules)
            indices = self.select(trainer, pl_module, names)
            biases = names if self.config.criterion == "bitfit" else ()
            inject_sparse(pl_module, indices, self.config.mode, self.config.modules_to_save, train_biases=biases)
            trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
            setattr(pl_module, MARKER, {"config": config, "trainable": trainable})
            nnz, numel = sparse_counts(pl_module)
            extras = set(sparse_extra_params(pl_module))
            extra = sum(p.numel() for n, p in pl_module.named_parameters() if n in extras)
            rank_zero_info(
                f"SparseMask: {len(indices)} layers, {nnz:,} of {numel:,} weight entries "
                f"({100 * nnz / max(numel, 1):.3f}%) train (criterion={self.config.criterion}, "
                f"mode={self.config.mode}, "
                f"allocation={self.config.allocation}); {extra:,} other trained parameters"
            )
        if ensure_input_grads_for_checkpointing(pl_module):
            rank_zero_info("SparseMask: activation checkpointing is on; made input embeddings require grad")
        if self.is_applied(pl_module):
            self.relax_strict_loading(pl_module)

    def select(self, trainer: L.Trainer, pl_module: L.LightningModule, names: list[str]) -> dict[str, Tensor]:
        """The entries to train: calibrated in ``fit``; outside ``fit``, placeholders that a checkpoint replaces."""
        if self.config.criterion == "bitfit":
            return {}
        config = self.config.replace(target_modules=names, exclude_modules=None)
        if self.config.criterion not in GRADIENT_CRITERIA:
            return select_sparse(pl_module, config=config)
        if trainer.state.fn != "fit":
            rank_zero_info(f"SparseMask: no calibration outside fit ({trainer.state.fn}); deltas start at zero")
            return {
                n: torch.arange(
                    budget(
                        pl_module.get_submodule(n).weight.shape, self.config.density, self.config.lora_equivalent_rank
                    )
                )
                for n in names
            }
        if not pl_module.automatic_optimization and self.loss_fn is None:
            raise ValueError("SparseMask: with manual optimization, pass loss_fn(pl_module, batch) -> loss")
        loader = train_dataloader(trainer)
        if loader is None:
            raise ValueError(
                f"SparseMask: criterion {self.config.criterion!r} needs calibration batches; no train loader"
            )
        device = trainer.strategy.root_device
        if any(p.is_meta for p in pl_module.parameters()):
            raise NotImplementedError("SparseMask needs materialised weights, not a model on the meta device")
        pl_module.to(device)  # the strategy moves it there next anyway
        ensure_input_grads_for_checkpointing(pl_module)
        rank, world = rank_and_world()
        loss_fn = self.loss_fn or training_step_loss

        def batches() -> Iterator[Any]:
            for i, batch in enumerate(itertools.islice(loader, self.config.calibration_batches)):
                if i % world == rank:
                    yield trainer.strategy.batch_to_device(batch, device)

        cuda = [device.index or 0] if device.type == "cuda" else []
        precision = trainer.precision_plugin.train_step_context()
        with torch.random.fork_rng(devices=cuda), calibration_mode(pl_module), precision:
            return select_sparse(pl_module, batches(), lambda b: loss_fn(pl_module, b), config=config)

    @override
    def is_applied(self, pl_module: L.LightningModule) -> bool:
        marker = getattr(pl_module, MARKER, None)
        if marker is None:
            return False
        return bool(sparse_layers(pl_module)) or marker["config"]["criterion"] == "bitfit"

    @override
    def state_keys(self, pl_module: L.LightningModule) -> list[str]:
        return sparse_state_keys(pl_module)

    @override
    def checkpoint_config(self) -> dict[str, Any]:
        """Every setting (``loss_fn`` aside): the selection settings plus the re-selection ones."""
        return self.config.to_dict()

    @override
    def export_metadata(self) -> dict[str, Any]:
        """``sparse_config.json``'s ``selection``: the settings that chose the exported entries."""
        return {"selection": self.settings}

    @override
    def fixed_shape(self, key: str) -> bool:
        return not key.endswith((".indices", ".values"))  # a layer re-sizes itself to the checkpoint's selection

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        saved = (checkpoint.get(self.checkpoint_key) or {}).get("config") or {}
        if saved.get("mode") not in (None, self.config.mode):
            raise RuntimeError(
                f"the checkpoint holds mode={saved['mode']!r} sparse values; this SparseMask has "
                f"mode={self.config.mode!r}"
            )

    # ---- training: gradient masking and re-selection ----------------------------------------------------------
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = sparse_layers(pl_module)
        if self.config.mode == "mask" and layers:
            self.masker = GradientMask(layers)
            for optimizer in trainer.optimizers:
                self.masker.attach(optimizer, mask_in_step=False)  # masked in on_before_optimizer_step
        if self.config.reselect_every and layers:
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                rank_zero_warn("SparseMask: the number of training steps is unknown; the drop fraction does not anneal")
                total = 10**9
            self.reselection = DynamicReselection(
                layers,
                self.config.reselect_every,
                int(total),
                self.config.drop_fraction,
                self.config.drop_schedule,
                self.config.grow_window,
            )
            self.reselection.load_state_dict(self._pending_accumulators)
            self._pending_accumulators = {}
        self._last_step = trainer.global_step

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.reselection is not None and self.reselection.in_window(trainer.global_step + 1):
            self.reselection.start()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.reselection is not None:
            self.reselection.add_dense_gradients()  # mask mode: before masking
        if self.masker is not None:
            self.masker.mask_gradients()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        if self.reselection is None or not self.reselection.due(step):
            return
        logs = self.reselection.reselect(step, trainer.optimizers)
        if self.masker is not None:
            self.masker.refresh()
        self.history.append({"step": step, **logs})
        metrics = {f"sparse/{k}": float(v) for k, v in logs.items()}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.masker is not None:
            self.masker.detach()
            self.masker = None
        if self.reselection is not None:
            self.reselection.stop()
            self.reselection = None
        super().teardown(trainer, pl_module, stage)

    @override
    def state_dict(self) -> dict[str, Any]:
        accumulators = self.reselection.state_dict() if self.reselection is not None else {}
        return {"accumulators": accumulators, "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_accumulators = dict(state_dict.get("accumulators") or {})
        self.history = list(state_dict.get("history") or [])
