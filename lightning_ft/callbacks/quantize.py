"""``QuantizeBase``: store the frozen linear weights of any LightningModule quantised (NF4 / int8) before LoRA wraps
them (QLoRA-style).

When. Like ``LowRankCompression``: a one-shot ``configure_model`` wrapper installed in ``setup`` quantises right after
the module's own ``configure_model`` and *underneath* a ``LoRA`` callback's wrapper, whatever their order in the
Trainer, so the adapters wrap the quantised layers; before the checkpoint is restored, before DDP wraps the module
and before the optimizer is built (the quantised weights are frozen: they get no gradient and no optimizer state).

Loading. A lightning-ft module that builds its model from a local safetensors folder (``model_name_or_path``, no
``model=``) runs its ``configure_model`` on the meta device here, and the weights are then read tensor by tensor and
each targeted layer quantised as soon as its weight is in (``lightning_ft.quant.load``): the float model never exists
in full, which is what lets a base larger than host memory in float load at all. Any other module (a user's own, or a
``model=`` passed in) is loaded by its own code and quantised in memory. Both give the same quantised model.

Resume fingerprint. The base fingerprint that ``LoRA`` records in its checkpoints (``lightning_ft.resume_checks``) is
taken *before* quantisation, from the full-precision weights: the rounding of NF4 would hide small differences
between two bases, and the same base resumed with or without quantisation is the same model. The quantisation
settings are recorded in the checkpoint (``"lightning_ft_quant"``); resuming with other settings is refused unless
``allow_config_change=True``; resuming without this callback, or this callback on a checkpoint trained without it,
warns (the adapters then continue on other base values).

Re-runs. ``validate`` / ``test`` / ``predict`` after ``fit`` find the module quantised with these settings and leave it
alone; after ``MergeAdapters`` de-quantised and merged it, they evaluate the merged full-precision model (it is not
quantised again); a new ``fit`` on the merged model quantises it again.

Not supported (refused in ``setup``, before any work): FSDP1 / FSDP2 (sharding needs one storage dtype per unit, and
torchao's NF4 / int8 tensors do not shard under Lightning's FSDP strategies here), ``LowRankCompression`` in the
same Trainer, LoRA's PiSSA init (it would quantise the residual a second time) and, where ``LoRALinear`` cannot read
a quantised weight, DoRA (int8 today).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_ft.callbacks.model_hooks import install_under, uninstall
from lightning_ft.callbacks.surgery import init_defaults, public_path
from lightning_ft.method_config import check_type, config_from_kwargs, takes_config
from lightning_ft.quant import QuantizeConfig, is_quantized, quantize_base, quantized_layers, quantized_weight_bytes
from lightning_ft.quant.backend import torchao_quantization
from lightning_ft.quant.load import load_quantized
from lightning_ft.quant.quantize import quantized_parameter_names
from lightning_ft.resume_checks import (
    UNQUANTIZED_FINGERPRINT_ATTR,
    base_fingerprint,
    compare_configs,
    constructor_call,
    plain,
    read_config,
    register_check,
    sampled_parameter_names,
    tensor_samples,
    unregister_check,
)
from lightning_ft.strategies.meta_load import has_meta_tensors

MARKER = "_lightning_ft_quant"  # attribute of the module: the settings it was quantised with
CHECKPOINT_KEY = "lightning_ft_quant"


@contextmanager
def meta_device() -> Iterator[None]:
    """``configure_model`` under the meta device: ``load_model`` builds the model without weights (see
    ``QuantizeBase.loads_quantized``)."""
    with torch.device("meta"):
        yield


def _sharding_strategy(trainer: L.Trainer) -> str | None:
    names = [c.__name__ for c in type(trainer.strategy).__mro__]
    for name in ("ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy"):
        if name in names:
            return type(trainer.strategy).__name__
    return None


def lora_probe(dtype: str, **lora: Any) -> str | None:
    """Why ``LoRALinear`` with ``lora`` settings cannot wrap a layer quantised to ``dtype`` (``None`` when it can).

    Tried on a tiny layer, so a ``LoRALinear`` that learns to read quantised weights passes without a change here."""
    from torch import nn

    from lightning_ft.lora.layer import LoRALinear
    from lightning_ft.quant import QuantizedLinear

    layer = QuantizedLinear.from_linear(nn.Linear(64, 64), QuantizeConfig(dtype=dtype, scaler_block_size=64))
    try:
        adapted = LoRALinear(layer, r=2, alpha=4, **lora)
        adapted(torch.randn(2, 64)).sum().backward()  # MergeAdapters de-quantises before merging: no merge here
    except (NotImplementedError, RuntimeError, TypeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return None


class QuantizedNames:
    """The names of ``module``'s quantised weights (plus ``extra``), read when iterated: DDP's ignore list.

    Lightning's DDP wraps the LightningModule itself and reads ``_ddp_params_and_buffers_to_ignore`` from it when it
    wraps, after ``LoRA`` moved each quantised layer to ``<name>.base_layer``; so the names are computed then. At
    start-up DDP broadcasts every other parameter from rank 0 through flat buffers, which torchao's ``Int8Tensor``
    refuses and which *re-quantises* an ``NF4Tensor`` (``copy_`` of de-quantised values) on every rank. Every rank
    quantises the same base to the same values, so nothing needs sending, and the frozen weights are never
    all-reduced. (The attribute is torch's workaround for pytorch issue 43690.)
    """

    def __init__(self, module: torch.nn.Module, extra: Any = ()) -> None:
        self.module, self.extra = weakref.ref(module), list(extra)

    def __iter__(self) -> Iterator[str]:
        module = self.module()
        names = quantized_parameter_names(module) if module is not None else []
        return iter([*self.extra, *names])


def ddp_ignore_quantized(pl_module: L.LightningModule) -> None:
    """Keep DDP away from the quantised weights (see ``QuantizedNames``)."""
    known = pl_module.__dict__.get("_ddp_params_and_buffers_to_ignore", ())
    if not isinstance(known, QuantizedNames):
        pl_module.__dict__["_ddp_params_and_buffers_to_ignore"] = QuantizedNames(pl_module, known)


class QuantizeBase(L.Callback):
    """Quantise the LightningModule's frozen linear layers (NF4 or int8) before ``LoRA`` injects its adapters.

    Takes a ``QuantizeConfig`` (``config=``) or its fields as keyword arguments, like
    ``lightning_ft.quant.quantize_base``; ``self.config`` holds the result. ``allow_config_change``: resume a
    checkpoint written with other quantisation settings (a warning instead of an error). Use it with ``LoRA`` (in
    either order) and ``MergeAdapters``, which de-quantises before merging in float32. See the module docstring.
    """

    @takes_config(QuantizeConfig, kwargs_name=None)
    def __init__(self, allow_config_change: bool = False, *, config: QuantizeConfig | None = None, **kwargs: Any):
        check_type("allow_config_change", allow_config_change, bool, QuantizeConfig)
        self.config = config_from_kwargs(QuantizeConfig, config, kwargs)
        if kwargs:
            raise TypeError(f"QuantizeBase got unexpected keyword arguments {sorted(kwargs)}")
        self.allow_config_change = allow_config_change
        self._patched: tuple | None = None  # (module, previous, wrapper, trainer) while the wrapper is pending
        self._checking: L.LightningModule | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return plain(self.config.to_dict())

    # ---- set-up checks and the one-shot configure_model wrapper -------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_trainer(trainer)
        around = meta_device if self.loads_quantized(pl_module) else nullcontext
        install_under(self, trainer, pl_module, lambda: self.quantize_into(trainer, pl_module), around)
        self._unregister()
        register_check(pl_module, CHECKPOINT_KEY, self.check_resume)
        self._checking = pl_module

    def check_trainer(self, trainer: L.Trainer) -> None:
        """Refuse, before any work, what a quantised base does not support (see the module docstring)."""
        torchao_quantization()  # ImportError with the install command
        if any(isinstance(cb, QuantizeBase) and cb is not self for cb in trainer.callbacks):
            raise RuntimeError("more than one QuantizeBase callback in the Trainer; quantise once")
        names = {type(cb).__name__ for cb in trainer.callbacks}
        if "LowRankCompression" in names:
            raise RuntimeError("QuantizeBase and LowRankCompression cannot be combined; choose one")
        if "SparseMask" in names:
            raise RuntimeError(
                "QuantizeBase does not support SparseMask: sparse fine-tuning changes entries of the base weights "
                "themselves, which a quantised base cannot hold. Use it with LoRA."
            )
        sharded = _sharding_strategy(trainer)
        if sharded:
            raise RuntimeError(
                f"QuantizeBase does not support {sharded} (FSDP / sharded strategies): torchao's quantised weights "
                "are not sharded by Lightning's FSDP strategies here. Use a single device or DDP "
                "(AdapterDDPStrategy / strategy='ddp'), or drop QuantizeBase to shard a full-precision base."
            )
        precision = str(getattr(trainer.precision_plugin, "precision", ""))
        if precision.endswith("-true") and precision != "32-true":
            raise RuntimeError(
                f"QuantizeBase does not support precision={precision!r}: converting the module's dtype would "
                "de-quantise its weights. Load the model in that dtype and use precision='bf16-mixed' / '32-true'."
            )
        for cb in trainer.callbacks:
            config = getattr(cb, "config", None) if type(cb).__name__ == "LoRA" else None
            if config is None:
                continue
            if config.init == "pissa":
                raise RuntimeError(
                    "LoRA(init='pissa') over a quantised base is not supported: PiSSA moves the top singular "
                    "vectors of W into the adapters and would quantise the residual a second time. Use init="
                    "'default' or 'gaussian', or drop QuantizeBase."
                )
            if config.use_dora and (why := lora_probe(self.config.dtype, use_dora=True)):
                raise RuntimeError(
                    f"LoRA(use_dora=True) over a {self.config.dtype} base is not supported: LoRALinear cannot read "
                    f"the quantised weight ({why}). Use QuantizeBase(dtype='nf4') for DoRA, or plain LoRA."
                )

    def _unregister(self) -> None:
        if self._checking is not None:
            unregister_check(self._checking, CHECKPOINT_KEY)
            self._checking = None

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        uninstall(self)
        self._unregister()
        pl_module.__dict__.pop(UNQUANTIZED_FINGERPRINT_ATTR, None)  # read by LoRA during configure_model only

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    # ---- quantisation -------------------------------------------------------------------------------------------
    @staticmethod
    def loads_quantized(pl_module: L.LightningModule) -> bool:
        """Whether the module's ``configure_model`` will build the model (a lightning-ft module without one yet,
        from a local safetensors folder): it then runs on the meta device and ``quantize_into`` reads the weights
        tensor by tensor, quantising as it goes, so the float model never exists in full."""
        from lightning_ft.models import loads_from_safetensors
        from lightning_ft.modules.base import FineTuneModule

        return (
            isinstance(pl_module, FineTuneModule)
            and pl_module.model is None
            and loads_from_safetensors(pl_module.model_name_or_path)
        )

    def quantize_into(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Quantise the module (or keep what these settings quantised before)."""
        marker = getattr(pl_module, MARKER, None)
        if is_quantized(pl_module):
            if marker == self.settings:
                return  # a later validate / test / predict (or fit) on the module quantised before
            raise RuntimeError(
                f"the module is already quantised (with {marker or 'quantize_base in its own code'}); quantise once"
            )
        if marker == self.settings and trainer.state.fn != "fit":
            return  # MergeAdapters de-quantised and merged it: evaluate the merged model in full precision
        fingerprint = base_fingerprint(pl_module)  # shapes only for parameters still on the meta device
        dense = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        if has_meta_tensors(pl_module):  # built on the meta device (loads_quantized): read and quantise in one pass
            torchao_quantization()
            sample = set(sampled_parameter_names(pl_module)) - set(fingerprint["samples"])
            report = load_quantized(pl_module, self.config, sample=sample, sampler=tensor_samples)
            fingerprint["samples"].update({k: v for k, v in report["samples"].items() if v is not None})
            fingerprint["samples"] = {
                n: fingerprint["samples"][n] for n in fingerprint["parameters"] if n in fingerprint["samples"]
            }
        else:
            quantize_base(pl_module, config=self.config)
        pl_module.__dict__[UNQUANTIZED_FINGERPRINT_ATTR] = fingerprint
        setattr(pl_module, MARKER, self.settings)
        ddp_ignore_quantized(pl_module)
        layers = quantized_layers(pl_module)
        packed = quantized_weight_bytes(pl_module)
        was = sum(layer.in_features * layer.out_features * layer.original_dtype.itemsize for layer in layers.values())
        rank_zero_info(
            f"QuantizeBase: {len(layers)} linear layers stored as {self.config.dtype}: {was / 2**20:.1f} MB -> "
            f"{packed / 2**20:.1f} MB (model parameters were {dense / 2**20:.1f} MB)"
        )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trained = [n for n in quantized_parameter_names(pl_module) if pl_module.get_parameter(n).requires_grad]
        if trained:
            raise RuntimeError(
                f"quantised weights cannot train, but {len(trained)} require grad (e.g. {trained[0]}): something "
                "unfroze them after QuantizeBase (train adapters with LoRA; leave the base frozen)"
            )

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if is_quantized(pl_module):
            checkpoint[CHECKPOINT_KEY] = {
                "callback": "QuantizeBase",
                "callback_path": public_path(type(self)),
                "adapter_only": False,  # the quantised weights are never saved: the base is quantised again
                "config": self.settings,
                "constructor": constructor_call("QuantizeBase", self.settings, init_defaults(type(self))),
            }

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Before the state dict is loaded: refuse other quantisation settings (unless ``allow_config_change``)."""
        pl_module = self._checking
        if pl_module is None or not is_quantized(pl_module):
            return
        entry = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(entry, dict):
            if any(isinstance(k, str) and k.startswith("lightning_ft_") for k in checkpoint):
                rank_zero_warn(
                    "QuantizeBase: the checkpoint was trained over a base that was not quantised; its adapters now "
                    f"continue over a {self.config.dtype} base"
                )
            return
        saved = read_config(entry.get("config")) or {}
        settings = compare_configs(saved, self.settings)
        if not settings:
            return
        body = "\n".join(f"  {line}" for line in settings)
        if self.allow_config_change:
            rank_zero_warn(f"QuantizeBase: resuming over other quantisation settings (saved -> now):\n{body}")
            return
        call = constructor_call("QuantizeBase", saved, init_defaults(type(self)))
        raise RuntimeError(
            f"the checkpoint was trained over a base quantised with other settings (saved -> now):\n{body}\nResume "
            f"with {call}, or pass allow_config_change=True to QuantizeBase to continue over this base on purpose."
        )
