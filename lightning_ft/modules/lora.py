"""``LoRAModule``: the shared base plus LoRA settings; the adapters come from the ``LoRA`` callback it returns."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from torch import nn
from typing_extensions import override

from lightning_ft.callbacks.lora import LoRA
from lightning_ft.callbacks.quantize import QuantizeBase
from lightning_ft.lora.config import LoRAConfig
from lightning_ft.method_config import config_from_kwargs, takes_config
from lightning_ft.modules.adapter import AdapterModule
from lightning_ft.modules.base import ModelTask
from lightning_ft.modules.optim import loraplus_groups


class LoRAModule(AdapterModule):
    """LoRA fine-tuning: ``AdapterModule`` plus the ``LoRA`` callback (and ``MergeAdapters`` when a dir is given).

    LoRA arguments: a ``LoRAConfig`` (``config=``) or its fields (``r`` ... ``bias``) as keyword arguments;
    ``self.config`` holds the result. ``modules_to_save=None``
    trains the classification head in full for ``task="classification"`` (``classifier`` / ``score``), and nothing
    else for causal LMs; ``[]`` trains no head.
    ``loraplus_lr_ratio``: LoRA+, the ``lora_B`` matrices get ``learning_rate * loraplus_lr_ratio`` (16 in the paper).
    ``merged_dir`` / ``adapter_dir``: at the end of ``fit``, write the merged Hugging Face model / the peft adapter;
    after a merge the module holds the merged model. ``overwrite``: replace existing output folders whole (see
    ``MergeAdapters``). ``allow_config_change``: resume a checkpoint written with other settings or on another base
    model (a warning instead of an error; see ``LoRA``). Other arguments are ``FineTuneModule``'s (LoRA's default
    learning rate is higher than full fine-tuning's).
    ``quantize_base``: ``"nf4"`` / ``"int8"`` stores the frozen base's linear weights quantised before the adapters
    are injected (QLoRA: the ``QuantizeBase`` callback with its defaults; needs ``pip install 'lightning-ft[quant]'``);
    the merged model is written in full precision.
    """

    @takes_config(LoRAConfig)
    def __init__(
        self,
        model_name_or_path: str | None = None,
        task: ModelTask = "causal_lm",
        labels: list[str] | None = None,
        model: nn.Module | None = None,
        loraplus_lr_ratio: float | None = None,
        merged_dir: str | None = None,
        adapter_dir: str | None = None,
        overwrite: bool = False,
        allow_config_change: bool = False,
        learning_rate: float = 2e-4,
        quantize_base: Literal["nf4", "int8"] | None = None,
        *,
        config: LoRAConfig | None = None,
        **kwargs: Any,
    ) -> None:
        lora = config_from_kwargs(LoRAConfig, config, kwargs)  # takes the LoRA fields out of kwargs
        if loraplus_lr_ratio is not None and loraplus_lr_ratio <= 0:
            raise ValueError(f"loraplus_lr_ratio must be positive, got {loraplus_lr_ratio}")
        # no super(): FineTuneModule.save_hyperparameters then records the base arguments only (Lightning cannot
        # read the generated LoRA arguments from this frame); set_method_config adds them, as flat hparams
        AdapterModule.__init__(self, model_name_or_path, task, labels, model, learning_rate=learning_rate, **kwargs)
        self.set_method_config(
            lora,
            loraplus_lr_ratio=loraplus_lr_ratio,
            merged_dir=merged_dir,
            adapter_dir=adapter_dir,
            overwrite=overwrite,
            allow_config_change=allow_config_change,
            quantize_base=quantize_base,
        )

    @override
    def method_callback(self) -> LoRA:
        return LoRA(config=self.config, allow_config_change=self.hparams.get("allow_config_change", False))

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        callbacks = super().configure_callbacks()
        dtype = self.hparams.get("quantize_base")
        if dtype is None:
            return callbacks
        quantize = QuantizeBase(dtype=dtype, allow_config_change=self.hparams.get("allow_config_change", False))
        return [quantize, *callbacks]  # before LoRA (QuantizeBase also goes underneath it in either order)

    @override
    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        ratio = self.hparams.loraplus_lr_ratio
        if ratio is None:
            return super().optimizer_param_groups()
        return loraplus_groups(self, self.hparams.weight_decay, self.hparams.learning_rate, ratio)
