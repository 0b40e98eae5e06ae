"""``SparseModule``: the shared base plus sparse fine-tuning settings; the masks come from the ``SparseMask`` callback
it returns."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_ft.callbacks.merge import MergeAdapters
from lightning_ft.callbacks.sparse import SparseMask
from lightning_ft.modules.base import FineTuneModule, ModelTask
from lightning_ft.modules.lora import CLASSIFICATION_HEADS, classification_heads
from lightning_ft.modules.optim import decay_groups
from lightning_ft.sparse import sparse_layers


class SparseModule(FineTuneModule):
    """Sparse fine-tuning: ``FineTuneModule`` plus the ``SparseMask`` callback (and ``MergeAdapters`` when a dir is
    given).

    Sparse arguments (``density`` ... ``seed``) are those of ``lightning_ft.callbacks.SparseMask``.
    ``modules_to_save=None`` trains the classification head in full for ``task="classification"`` (``classifier`` /
    ``score``), and nothing else for causal LMs; ``[]`` trains no head. ``merged_dir`` / ``adapter_dir``: at the end
    of ``fit``, write the merged Hugging Face model / the sparse deltas (indices and values); after a merge the module
    holds the merged model. In delta mode the ``values`` vectors get the weight decay of weight matrices (it pulls
    each trained entry back towards its pretrained value). Other arguments are ``FineTuneModule``'s.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        task: ModelTask = "causal_lm",
        labels: list[str] | None = None,
        model: nn.Module | None = None,
        density: float = 0.01,
        criterion: Literal["random", "magnitude", "gradient", "fisher", "movement", "bitfit"] = "fisher",
        mode: Literal["delta", "mask"] = "delta",
        target_modules: str | list[str] = "all-linear",
        exclude_modules: str | list[str] | None = None,
        lora_equivalent_rank: int | None = None,
        allocation: Literal["per_matrix", "global"] = "per_matrix",
        calibration_batches: int = 8,
        reselect_every: int | None = None,
        drop_fraction: float = 0.3,
        drop_schedule: Literal["cosine", "linear"] = "cosine",
        grow_window: int = 8,
        seed: int = 0,
        modules_to_save: list[str] | None = None,
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
        SparseMask(**self.sparse_settings())  # validates the sparse arguments now rather than at fit time
        self._sparse_callback: SparseMask | None = None

    def sparse_settings(self) -> dict[str, Any]:
        """The ``SparseMask`` arguments of this module."""
        hp = self.hparams
        names = ("density", "criterion", "mode", "target_modules", "exclude_modules", "lora_equivalent_rank",
                 "allocation", "calibration_batches", "reselect_every", "drop_fraction", "drop_schedule",
                 "grow_window", "seed", "modules_to_save")  # fmt: skip
        return {k: hp[k] for k in names}

    def configure_callbacks(self) -> list[L.Callback]:
        self._sparse_callback = SparseMask(**self.sparse_settings())
        callbacks: list[L.Callback] = [self._sparse_callback]
        if self.hparams.merged_dir or self.hparams.adapter_dir:
            callbacks.append(MergeAdapters(merged_dir=self.hparams.merged_dir, adapter_dir=self.hparams.adapter_dir))
        return callbacks

    def configure_model(self) -> None:
        super().configure_model()
        # the head's name is known once the model exists; the SparseMask callback selects right after this hook
        cb = self._sparse_callback
        if cb is not None and self.task == "classification" and self.hparams.modules_to_save is None:
            heads = classification_heads(self.model)
            if not heads:
                rank_zero_warn(
                    f"SparseModule: no classification head named {list(CLASSIFICATION_HEADS)} in "
                    f"{type(self.model).__name__}; it stays frozen. Name it with `modules_to_save`."
                )
            cb.modules_to_save = [f"model.{n}" for n in heads] or None

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        values = {id(layer.values) for layer in sparse_layers(self).values() if layer.values is not None}
        others = [(n, p) for n, p in self.named_parameters() if id(p) not in values]
        groups = decay_groups(others, self.hparams.weight_decay)
        trained = [p for p in self.parameters() if id(p) in values and p.requires_grad]
        if trained:  # the 1-D delta values are weight entries: decayed like matrices
            groups.append({"params": trained, "weight_decay": self.hparams.weight_decay})
        return groups
