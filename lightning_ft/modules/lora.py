"""``LoRAModule``: the shared base plus LoRA settings; the adapters come from the ``LoRA`` callback it returns."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_ft.callbacks.lora import LoRA
from lightning_ft.callbacks.merge import MergeAdapters
from lightning_ft.modules.base import FineTuneModule, ModelTask
from lightning_ft.modules.optim import loraplus_groups

#: names of sequence-classification heads in Hugging Face models (BERT family, decoder models, BART)
CLASSIFICATION_HEADS = ("classifier", "score", "classification_head")


def classification_heads(model: nn.Module) -> list[str]:
    """Names of ``model``'s classification heads among its direct children (``["classifier"]``, ``["score"]``)."""
    children = dict(model.named_children())
    return [n for n in CLASSIFICATION_HEADS if n in children]


class LoRAModule(FineTuneModule):
    """LoRA fine-tuning: ``FineTuneModule`` plus the ``LoRA`` callback (and ``MergeAdapters`` when a dir is given).

    LoRA arguments (``r`` ... ``bias``) are those of ``lightning_ft.lora.inject_lora``. ``modules_to_save=None``
    trains the classification head in full for ``task="classification"`` (``classifier`` / ``score``), and nothing
    else for causal LMs; ``[]`` trains no head.
    ``loraplus_lr_ratio``: LoRA+, the ``lora_B`` matrices get ``learning_rate * loraplus_lr_ratio`` (16 in the paper).
    ``merged_dir`` / ``adapter_dir``: at the end of ``fit``, write the merged Hugging Face model / the peft adapter;
    after a merge the module holds the merged model. Other arguments are ``FineTuneModule``'s (LoRA's default
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
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int = 32,
        eval_lm_loss: bool = True,
    ) -> None:
        super().__init__(
            model_name_or_path=model_name_or_path, task=task, labels=labels, model=model,
            learning_rate=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps, warmup_steps=warmup_steps,
            warmup_ratio=warmup_ratio, scheduler=scheduler, min_lr_ratio=min_lr_ratio,
            gradient_checkpointing=gradient_checkpointing, dtype=dtype, trust_remote_code=trust_remote_code,
            max_new_tokens=max_new_tokens, eval_lm_loss=eval_lm_loss,
        )  # fmt: skip
        if loraplus_lr_ratio is not None and loraplus_lr_ratio <= 0:
            raise ValueError(f"loraplus_lr_ratio must be positive, got {loraplus_lr_ratio}")
        LoRA(**self.lora_settings())  # validates the LoRA arguments now rather than at fit time
        self._lora_callback: LoRA | None = None

    def lora_settings(self) -> dict[str, Any]:
        """The ``inject_lora`` / ``LoRA`` arguments of this module."""
        hp = self.hparams
        names = ("r", "alpha", "dropout", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                 "use_rslora", "use_dora", "init", "modules_to_save", "bias")  # fmt: skip
        return {k: hp[k] for k in names}

    def configure_callbacks(self) -> list[L.Callback]:
        self._lora_callback = LoRA(**self.lora_settings())
        callbacks: list[L.Callback] = [self._lora_callback]
        if self.hparams.merged_dir or self.hparams.adapter_dir:
            callbacks.append(MergeAdapters(merged_dir=self.hparams.merged_dir, adapter_dir=self.hparams.adapter_dir))
        return callbacks

    def configure_model(self) -> None:
        super().configure_model()
        # the head's name is known once the model exists; the LoRA callback injects right after this hook
        cb = self._lora_callback
        if cb is not None and self.task == "classification" and self.hparams.modules_to_save is None:
            heads = classification_heads(self.model)
            if not heads:
                rank_zero_warn(
                    f"LoRAModule: no classification head named {list(CLASSIFICATION_HEADS)} in "
                    f"{type(self.model).__name__}; it stays frozen. Name it with `modules_to_save`."
                )
            cb.modules_to_save = [f"model.{n}" for n in heads] or None

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        ratio = self.hparams.loraplus_lr_ratio
        if ratio is None:
            return super().optimizer_param_groups()
        return loraplus_groups(self.named_parameters(), self.hparams.weight_decay, self.hparams.learning_rate, ratio)

