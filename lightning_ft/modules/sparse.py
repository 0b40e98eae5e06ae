"""``SparseModule``: the shared base plus sparse fine-tuning settings; the masks come from the ``SparseMask`` callback
it returns."""

from __future__ import annotations

from typing import Any

from torch import nn
from typing_extensions import override

from lightning_ft.callbacks.sparse import SparseMask
from lightning_ft.method_config import config_from_kwargs, takes_config
from lightning_ft.modeling import adapter_param_names
from lightning_ft.modules.adapter import AdapterModule
from lightning_ft.modules.base import ModelTask
from lightning_ft.modules.optim import decay_groups
from lightning_ft.sparse.config import SparseConfig


class SparseModule(AdapterModule):
    """Sparse fine-tuning: ``AdapterModule`` plus the ``SparseMask`` callback (and ``MergeAdapters`` when a dir is
    given).

    Sparse arguments: a ``SparseConfig`` (``config=``) or its fields (``density`` ... ``grow_window``) as keyword
    arguments, as for ``lightning_ft.callbacks.SparseMask``; ``self.config`` holds the result.
    ``modules_to_save=None`` trains the classification head in full for ``task="classification"`` (``classifier`` /
    ``score``), and nothing else for causal LMs; ``[]`` trains no head. ``merged_dir`` / ``adapter_dir``: at the end
    of ``fit``, write the merged Hugging Face model / the sparse deltas (indices and values); after a merge the module
    holds the merged model. In delta mode the ``values`` vectors get the weight decay of weight matrices (it pulls
    each trained entry back towards its pretrained value). ``overwrite``: replace existing output folders whole (see
    ``MergeAdapters``). ``allow_config_change``: resume a checkpoint written with other settings or on another base
    model (a warning instead of an error; see ``SparseMask``). Other arguments are ``FineTuneModule``'s.
    """

    @takes_config(SparseConfig)
    def __init__(
        self,
        model_name_or_path: str | None = None,
        task: ModelTask = "causal_lm",
        labels: list[str] | None = None,
        model: nn.Module | None = None,
        merged_dir: str | None = None,
        adapter_dir: str | None = None,
        overwrite: bool = False,
        allow_config_change: bool = False,
        learning_rate: float = 2e-4,
        *,
        config: SparseConfig | None = None,
        **kwargs: Any,
    ) -> None:
        sparse = config_from_kwargs(SparseConfig, config, kwargs)  # takes the sparse fields out of kwargs
        # no super(): see LoRAModule.__init__ (the generated arguments are added to the hparams below)
        AdapterModule.__init__(self, model_name_or_path, task, labels, model, learning_rate=learning_rate, **kwargs)
        self.set_method_config(
            sparse,
            merged_dir=merged_dir,
            adapter_dir=adapter_dir,
            overwrite=overwrite,
            allow_config_change=allow_config_change,
        )

    @override
    def method_callback(self) -> SparseMask:
        return SparseMask(config=self.config, allow_config_change=self.hparams.get("allow_config_change", False))

    @override
    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        declared = adapter_param_names(self, "sparse")
        values = {n for n, group in declared.items() if group == "sparse_values"}
        groups = decay_groups(
            [(n, p) for n, p in self.named_parameters() if n not in values], self.hparams.weight_decay
        )
        trained = [p for n, p in self.named_parameters() if n in values and p.requires_grad]
        if trained:  # the 1-D delta values are weight entries: decayed like matrices
            groups.append({"params": trained, "weight_decay": self.hparams.weight_decay})
        return groups
