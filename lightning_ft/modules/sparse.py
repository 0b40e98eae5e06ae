"""``SparseModule``: the shared base plus sparse fine-tuning settings; the masks come from the ``SparseMask`` callback
it returns."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from lightning_ft.callbacks.sparse import SparseMask
from lightning_ft.modules.adapter import AdapterModule
from lightning_ft.modules.base import ModelTask
from lightning_ft.modules.optim import decay_groups
from lightning_ft.sparse import sparse_layers


class SparseModule(AdapterModule):
    """Sparse fine-tuning: ``AdapterModule`` plus the ``SparseMask`` callback (and ``MergeAdapters`` when a dir is
    given).

    Sparse arguments (``density`` ... ``seed``) are those of ``lightning_ft.callbacks.SparseMask``.
    ``modules_to_save=None`` trains the classification head in full for ``task="classification"`` (``classifier`` /
    ``score``), and nothing else for causal LMs; ``[]`` trains no head. ``merged_dir`` / ``adapter_dir``: at the end
    of ``fit``, write the merged Hugging Face model / the sparse deltas (indices and values); after a merge the module
    holds the merged model. In delta mode the ``values`` vectors get the weight decay of weight matrices (it pulls
    each trained entry back towards its pretrained value). ``overwrite``: replace existing output folders whole (see
    ``MergeAdapters``). ``allow_config_change``: resume a checkpoint written with other settings or on another base
    model (a warning instead of an error; see ``SparseMask``). Other arguments are ``FineTuneModule``'s.
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
        overwrite: bool = False,
        allow_config_change: bool = False,
        learning_rate: float = 2e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model_name_or_path=model_name_or_path, task=task, labels=labels, model=model, learning_rate=learning_rate,
            **kwargs,
        )  # fmt: skip
        SparseMask(**self.sparse_settings())  # validates the sparse arguments now rather than at fit time

    def sparse_settings(self) -> dict[str, Any]:
        """The ``SparseMask`` arguments of this module."""
        hp = self.hparams
        names = ("density", "criterion", "mode", "target_modules", "exclude_modules", "lora_equivalent_rank",
                 "allocation", "calibration_batches", "reselect_every", "drop_fraction", "drop_schedule",
                 "grow_window", "seed", "modules_to_save")  # fmt: skip
        return {k: hp[k] for k in names}

    def method_callback(self) -> SparseMask:
        return SparseMask(**self.sparse_settings(), allow_config_change=self.hparams.get("allow_config_change", False))

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        values = {id(layer.values) for layer in sparse_layers(self).values() if layer.values is not None}
        others = [(n, p) for n, p in self.named_parameters() if id(p) not in values]
        groups = decay_groups(others, self.hparams.weight_decay)
        trained = [p for p in self.parameters() if id(p) in values and p.requires_grad]
        if trained:  # the 1-D delta values are weight entries: decayed like matrices
            groups.append({"params": trained, "weight_decay": self.hparams.weight_decay})
        return groups
