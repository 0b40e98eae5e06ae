"""``LowRankCompression``: factorise the module's linear layers (SVD / activation-aware SVD) before training.

Recovery. Compression loses quality; a short fine-tuning run wins most of it back. Combine with::

    L.Trainer(callbacks=[
        LowRankCompression(param_ratio=0.5, method="asvd", calibration_batches=8),
        LoRA(r=8),                                 # adapters on each factor (q_proj.first, q_proj.second, ...)
        MergeAdapters(merged_dir="out/merged"),    # merged into the factors: the model stays compressed
    ])

- with ``LoRA``: only the adapters train; merging folds them into the two factors, so the merged model keeps the
  factorised shape and the parameter savings. The merged folder is a Hugging Face folder whose ``config.json``
  records the ranks: reload it with ``lightning_ft.compress.load_compressed`` (a plain ``from_pretrained`` would
  leave the factorised layers randomly initialised; ``densify_low_rank`` exports a standard dense model).
- with ``SparseMask``: its ``target_modules="all-linear"`` selects the factors, so a sparse subset of their entries
  trains.
- alone: every parameter, factors included, trains (full fine-tuning of the smaller model).

A target list such as ``["q_proj", "v_proj"]`` names the original layers for compression and, after it, selects
both factors of those layers for LoRA / sparse training.

When it runs. Like ``LoRA`` and ``SparseMask`` (see ``lightning_ft.callbacks.surgery``), ``setup`` installs a one-shot
wrapper as the module's ``configure_model``: compression runs right after the module's own ``configure_model``, before
the checkpoint is restored, before DDP / FSDP wrapping and before the optimizer is built. It always runs before their
injection, whatever the order in ``callbacks``: when such a callback set up earlier (its ``_patched = (module, previous
configure_model)`` is pending), this wrapper slots in underneath it. ``method="asvd"`` takes its ``calibration_batches``
from the current stage's dataloader (the train loader in ``fit``: the data module's ``train_dataloader``), outside the
global random stream, so the training shuffle is the same with or without it; activation statistics are summed over all
ranks, so every rank factorises identically. ``validate`` / ``test`` / ``predict`` after ``fit`` find the module
compressed with the same settings and leave it alone.

Checkpoints hold the compressed weights (or, with ``LoRA``, only the adapters: on resume the base is compressed
again from the pretrained weights, which gives the same factors for ``svd``, and for ``asvd`` when the calibration
batches are the same, i.e. with the same seed and data). The spec of the ranks is stored in the checkpoint under
``"lightning_ft_low_rank"``, with the callback's settings and the call that recreates it. Before the state dict is
loaded (see ``lightning_ft.resume_checks``), a resume with other settings is refused with one message listing the
differences (``allow_config_change=True`` makes it a warning), other ranks are refused either way (their factors
cannot load), and a compressed checkpoint resumed without this callback names it. Compression needs materialised
weights: not a model created on the meta device.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_ft._compat import stage_dataloader
from lightning_ft.callbacks.model_hooks import install_under, uninstall
from lightning_ft.callbacks.surgery import init_defaults, public_path
from lightning_ft.compress import compress_low_rank, low_rank_layers, low_rank_spec
from lightning_ft.compress.calibration import move_to
from lightning_ft.compress.config import CompressionConfig
from lightning_ft.compress.report import CompressionReport
from lightning_ft.method_config import check_type, config_from_kwargs, takes_config
from lightning_ft.modeling import MODEL_INPUTS, hf_models
from lightning_ft.resume_checks import (
    compare_configs,
    constructor_call,
    listing,
    plain,
    read_config,
    register_check,
    saved_shapes,
    unregister_check,
)

MARKER = "_lightning_ft_low_rank"  # attribute of the module: the settings it was compressed with
CHECKPOINT_KEY = "lightning_ft_low_rank"  # checkpoint entry: the rank spec, the settings and the callback
#: batch keys passed to a Hugging Face model during calibration (labels left out: no loss needed)


def default_calibration_forward(pl_module: L.LightningModule, batch: Any) -> None:
    """Run the module's Hugging Face model on the batch's model inputs, else ``pl_module(batch)``."""
    models = hf_models(pl_module)
    if models and isinstance(batch, dict):
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if "use_cache" in inspect.signature(models[0].forward).parameters:
            inputs["use_cache"] = False  # no KV cache for a one-off forward
        models[0](**inputs)
    else:
        pl_module(batch)


class LowRankCompression(L.Callback):
    """Replace the LightningModule's targeted linear layers by low-rank factor pairs before training.

    Takes a ``CompressionConfig`` (``config=``) or its fields as keyword arguments (the budget and method arguments
    of ``lightning_ft.compress.compress_low_rank``: exactly one of ``rank_ratio``, ``energy``, ``param_ratio``);
    ``self.config`` holds the result. ``calibration_forward(pl_module, batch)`` runs one
    calibration batch (default: the module's Hugging Face model on ``input_ids`` / ``attention_mask`` / ...).
    After compression, ``report`` holds the ``CompressionReport``; the summary goes to the log and the totals to
    the loggers (``compress/*``). See the module docstring for recovery with ``LoRA`` / ``SparseMask``.
    ``allow_config_change=True``: resume a checkpoint written with other settings (the same ranks), with a warning
    instead of an error.
    """

    @takes_config(CompressionConfig, kwargs_name=None)
    def __init__(
        self,
        calibration_forward: Callable[[L.LightningModule, Any], Any] | None = None,
        allow_config_change: bool = False,
        *,
        config: CompressionConfig | None = None,
        **kwargs: Any,
    ) -> None:
        check_type("calibration_forward", calibration_forward, callable, CompressionConfig)
        check_type("allow_config_change", allow_config_change, bool, CompressionConfig)
        self.config = config_from_kwargs(CompressionConfig, config, kwargs)
        if kwargs:
            raise TypeError(f"LowRankCompression got unexpected keyword arguments {sorted(kwargs)}")
        self.calibration_forward = calibration_forward or default_calibration_forward
        self.allow_config_change = allow_config_change
        self.report: CompressionReport | None = None
        self._patched: tuple | None = None  # (module, previous, wrapper, trainer) while the wrapper is pending
        self._checking: L.LightningModule | None = None  # the module while check_resume is registered on it

    @property
    def settings(self) -> dict[str, Any]:
        """The ``compress_low_rank`` keyword arguments (calibration excluded, unless ``asvd``)."""
        return self.config.settings()

    # ---- the one-shot configure_model wrapper -----------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if any(isinstance(cb, LowRankCompression) and cb is not self for cb in trainer.callbacks):
            raise RuntimeError("more than one LowRankCompression callback in the Trainer; compress once")
        install_under(self, trainer, pl_module, lambda: self.compress_into(trainer, pl_module))
        self._unregister()
        register_check(pl_module, CHECKPOINT_KEY, self.check_resume)
        self._checking = pl_module

    def _unregister(self) -> None:
        if self._checking is not None:
            unregister_check(self._checking, CHECKPOINT_KEY)
            self._checking = None

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        uninstall(self)
        self._unregister()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        uninstall(self)
        self._unregister()

    # ---- compression --------------------------------------------------------------------------------------------
    def compress_into(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compress the module (or keep what these settings compressed before) and report the parameter counts."""
        marker = getattr(pl_module, MARKER, None)
        if marker is not None:
            if marker == self.settings and low_rank_layers(pl_module):
                return  # a later validate / test / predict (or fit) on the module compressed before
            raise RuntimeError(
                f"the module was compressed before with {marker}; a second compression with {self.settings} "
                "would factorise the factors again"
            )
        calibration = self._calibration(trainer, pl_module) if self.config.method == "asvd" else None
        report = compress_low_rank(pl_module, config=self.config, calibration=calibration)
        setattr(pl_module, MARKER, self.settings)
        self.report = report
        rank_zero_info(f"LowRankCompression: {report.summary()}\n{report.table(max_rows=24)}")
        metrics = {
            "compress/params_before": float(report.params_before),
            "compress/params_after": float(report.params_after),
            "compress/targeted_before": float(report.targeted_before),
            "compress/targeted_after": float(report.targeted_after),
            "compress/layers_factorized": float(len(report.factorized)),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)

    def _calibration(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Callable[[Any], None]:
        """For ``compress_low_rank``: a callable running the first ``calibration_batches`` of the stage's loader."""
        fn = trainer.state.fn.value if trainer.state.fn is not None else "fit"
        loader = stage_dataloader(trainer, fn)
        if loader is None:
            raise ValueError(f"LowRankCompression(method='asvd') needs calibration batches: {fn} has no dataloader")
        if isinstance(loader, (list, tuple)):  # several evaluation loaders: the first
            loader = loader[0]

        def run(model: Any) -> None:
            device = next(pl_module.parameters()).device
            with torch.random.fork_rng(devices=[]):  # leave the training shuffle as it would be without compression
                batches = list(itertools.islice(iter(loader), self.config.calibration_batches))
            if not batches:
                raise ValueError(f"LowRankCompression(method='asvd'): the {fn} dataloader gave no batches")
            for batch in batches:
                self.calibration_forward(pl_module, move_to(batch, device))

        return run

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if low_rank_layers(pl_module):
            config = plain(self.settings)
            checkpoint[CHECKPOINT_KEY] = {
                **low_rank_spec(pl_module),
                "callback": "LowRankCompression",
                "adapter_only": False,
                "callback_path": public_path(type(self)),
                "config": config,
                "constructor": constructor_call("LowRankCompression", config, init_defaults(type(self))),
            }

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Before the state dict is loaded: refuse other settings (unless ``allow_config_change``) or other ranks."""
        pl_module = self._checking
        if pl_module is None or not low_rank_layers(pl_module):
            return
        entry = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(entry, dict):
            shapes = saved_shapes(checkpoint) or {}
            dense = [k for k in shapes if k not in set(pl_module.state_dict(keep_vars=True))]
            if dense:
                raise RuntimeError(
                    "the checkpoint was written without LowRankCompression: it holds weights this compressed model "
                    f"does not have ({listing(dense, 2)}). Resume it without the LowRankCompression callback."
                )
            return
        now = plain(self.settings)
        saved = read_config(entry.get("config"))
        settings = compare_configs(saved, now) if saved is not None else []
        if saved is None:
            rank_zero_warn(
                "LowRankCompression: the checkpoint was written by an earlier lightning-ft and records no "
                "compression settings; only the ranks are checked"
            )
        ranks = rank_differences(entry.get("layers") or {}, low_rank_spec(pl_module)["layers"])
        if not settings and not ranks:
            return
        body = "\n".join(f"  {line}" for line in settings + ranks)
        if ranks or not self.allow_config_change:
            call = constructor_call(
                "LowRankCompression",
                saved or now,
                init_defaults(type(self)),
                also=[line.split(":", 1)[0] for line in settings],
            )
            hatch = (
                "Other ranks cannot load these factors, whatever allow_config_change says."
                if ranks
                else "To continue with these settings on purpose, pass allow_config_change=True to LowRankCompression."
            )
            raise RuntimeError(
                f"the checkpoint does not fit this compressed model: it was written with other LowRankCompression "
                f"settings (saved -> now):\n{body}\nResume with the saved settings, {call}. {hatch}"
            )
        rank_zero_warn(
            "LowRankCompression: resuming with other settings than the checkpoint's, as allow_config_change=True asks "
            f"(saved -> now):\n{body}"
        )


def rank_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Lines for layers compressed in only one of two rank specs, or to another rank."""
    lines = []
    if gone := [n for n in saved if n not in now]:
        lines.append(f"compressed layers not compressed now: {listing(gone)}")
    if new := [n for n in now if n not in saved]:
        lines.append(f"layers compressed now but not in the checkpoint: {listing(new)}")
    other = [
        f"{n} {s.get('rank')} -> {now[n]['rank']}"
        for n, s in saved.items()
        if n in now and s.get("rank") != now[n]["rank"]
    ]
    if other:
        lines.append(f"ranks: {len(other)} layers differ: {listing(other)}")
    return lines
