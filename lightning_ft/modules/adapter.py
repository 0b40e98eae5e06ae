"""``AdapterModule``: the shared base of method modules whose method is a model-surgery callback (``LoRAModule``,
``SparseModule``): they return ``[method callback, MergeAdapters]`` from ``configure_callbacks()`` and train a
classification head in full by default."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_ft.callbacks.merge import MergeAdapters
from lightning_ft.method_config import MethodConfig
from lightning_ft.modules.base import FineTuneModule

CLASSIFICATION_HEADS = ("classifier", "score", "classification_head")


def classification_heads(model: nn.Module) -> list[str]:
    """Names of ``model``'s classification heads among its direct children (``["classifier"]``, ``["score"]``)."""
    children = dict(model.named_children())
    return [n for n in CLASSIFICATION_HEADS if n in children]


class AdapterModule(FineTuneModule):
    """Subclasses implement ``method_callback()``, hold their method's config (with ``modules_to_save``) as
    ``self.config`` and take ``merged_dir``, ``adapter_dir``, ``overwrite`` and ``allow_config_change``.

    ``modules_to_save=None`` trains the classification head in full for ``task="classification"`` (its name is known
    only once the model exists, so ``configure_model`` hands it to the callback, which acts right after that hook).
    """

    _method: L.Callback | None = None

    def set_method_config(self, config: MethodConfig, **arguments: Any) -> None:
        """Keep the method's ``config`` as ``self.config`` and record its fields and the subclass's own
        ``arguments`` as flat hparams (what ``load_from_checkpoint`` and the loggers see)."""
        self.config = config
        self.save_hyperparameters({**self.hparams, **config.to_dict(), **arguments})

    def method_callback(self) -> L.Callback:
        """A new instance of the method's callback, built from this module's settings."""
        raise NotImplementedError

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        self._method = self.method_callback()
        callbacks = [*super().configure_callbacks(), self._method]
        if self.hparams.merged_dir or self.hparams.adapter_dir:
            hp = self.hparams
            callbacks.append(
                MergeAdapters(
                    merged_dir=hp.merged_dir, adapter_dir=hp.adapter_dir, overwrite=hp.get("overwrite", False)
                )
            )
        return callbacks

    @override
    def configure_model(self) -> None:
        super().configure_model()
        if self._method is None or self.task != "classification" or self.config.modules_to_save is not None:
            return
        heads = classification_heads(self.model)
        if not heads:
            rank_zero_warn(
                f"{type(self).__name__}: no classification head named {list(CLASSIFICATION_HEADS)} in "
                f"{type(self.model).__name__}; it stays frozen. Name it with `modules_to_save`."
            )
        self._method.config = self._method.config.replace(modules_to_save=[f"model.{n}" for n in heads] or None)
