"""``LoRAModule``: the shared base plus LoRA settings; the adapters come from the ``LoRA`` callback it returns."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from lightning_ft.callbacks.lora import LoRA
from lightning_ft.modules.adapter import AdapterModule
from lightning_ft.modules.base import ModelTask
from lightning_ft.modules.optim import loraplus_groups


class LoRAModule(AdapterModule):
    """LoRA fine-tuning: ``AdapterModule`` plus the ``LoRA`` callback (and ``MergeAdapters`` when a dir is given).

    LoRA arguments (``r`` ... ``bias``) are those of ``lightning_ft.lora.inject_lora``. ``modules_to_save=None``
    trains the classification head in full for ``task="classification"`` (``classifier`` / ``score``), and nothing
    else for causal LMs; ``[]`` trains no head.
    ``loraplus_lr_ratio``: LoRA+, the ``lora_B`` matrices get ``learning_rate * loraplus_lr_ratio`` (16 in the paper).
    ``merged_dir`` / ``adapter_dir``: at the end of ``fit``, write the merged Hugging Face model / the peft adapter;
    after a merge the module holds the merged model. ``overwrite``: replace existing output folders whole (see
    ``MergeAdapters``). ``allow_config_change``: resume a checkpoint written with other settings or on another base
    model (a warning instead of an error; see ``LoRA``). Other arguments are ``FineTuneModule``'s (LoRA's default
    learning rate is higher than full fine-tuning's).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        task: ModelTask = "causal_lm",
        labels: list[str] | None = None,
        model: nn.Module | None = None,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: str | list[str] | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: Literal["default", "gaussian", "pissa"] = "default",
        modules_to_save: list[str] | None = None,
        bias: Literal["none", "all", "lora_only"] = "none",
        loraplus_lr_ratio: float | None = None,
        merged_dir: str | None = None,
        adapter_dir: str | None = None,
        overwrite: bool = False,
        allow_config_change: bool = False,
        learning_rate: float = 2e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model_name_or_path=model_name_or_path, task=task, labels=labels, model=model, learning_rate=learning_rate,
            **kwargs,
        )  # fmt: skip
        if loraplus_lr_ratio is not None and loraplus_lr_ratio <= 0:
            raise ValueError(f"loraplus_lr_ratio must be positive, got {loraplus_lr_ratio}")
        LoRA(**self.lora_settings())  # validates the LoRA arguments now rather than at fit time

    def lora_settings(self) -> dict[str, Any]:
        """The ``inject_lora`` / ``LoRA`` arguments of this module."""
        hp = self.hparams
        names = ("r", "alpha", "dropout", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                 "use_rslora", "use_dora", "init", "modules_to_save", "bias")  # fmt: skip
        return {k: hp[k] for k in names}

    def method_callback(self) -> LoRA:
        return LoRA(**self.lora_settings(), allow_config_change=self.hparams.get("allow_config_change", False))

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        ratio = self.hparams.loraplus_lr_ratio
        if ratio is None:
            return super().optimizer_param_groups()
        return loraplus_groups(self.named_parameters(), self.hparams.weight_decay, self.hparams.learning_rate, ratio)

