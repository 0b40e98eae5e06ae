"""``AdapterFSDP2Strategy``: FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``, sharded after the
adapters are injected.

Lightning expects ``fully_shard`` in the module's ``configure_model``, but the ``LoRA`` / ``SparseMask`` callbacks
inject right after that hook (their one-shot ``configure_model`` wrapper), so sharding there would come too early.
This strategy shards in ``setup`` instead: after ``configure_model`` and the injection, before the optimizer is built
and before a checkpoint is restored (``restore_checkpoint_after_setup``). The mesh is one data-parallel dimension
over every rank (Lightning's default would make the processes of a node a tensor-parallel group).

With ``sharded_loading=True`` no rank holds the whole model at any time: ``tensor_init_context`` runs
``configure_model`` on the meta device (``load_model`` then records each weight's file and key instead of reading
it), the adapters' random init is recorded and replayed for real, ``fully_shard`` shards the meta model, and each
rank reads only its own rows of each weight from the safetensors files (``lightning_ft.strategies.meta_load``).

Checkpoints are sharded ``.distcp`` folders. The ``LoRA`` callback keeps only the adapters in them; Lightning's
loader asks the checkpoint for every key of the model, so ``load_checkpoint`` here loads the keys the checkpoint
holds when the module loads non-strictly (the callback checks that they are exactly the trainable ones).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_ft._compat import is_sharded_checkpoint, set_model_parallel_sizes, sharded_checkpoint_metadata_path
from lightning_ft.file_checks import check_checkpoint
from lightning_ft.resume_checks import check_before_load
from lightning_ft.strategies.common import AdapterStrategyMixin, as_timeout, check_world_size
from lightning_ft.strategies.meta_load import has_meta_tensors, load_shards, materialize_recorded, meta_init
from lightning_ft.strategies.sharding import is_sharded, parallelize

DTYPES = ("float32", "bfloat16", "float16")


def mixed_precision_policy(param_dtype: str | None, reduce_dtype: str | None):
    """A ``MixedPrecisionPolicy`` from dtype names; ``None`` for full precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for name in (param_dtype, reduce_dtype):
        if name is not None and name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {list(DTYPES)}")
    if param_dtype is None and reduce_dtype is None:
        return None
    return MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype) if param_dtype else None,
        reduce_dtype=getattr(torch, reduce_dtype) if reduce_dtype else None,
    )


@contextmanager
def configure_model_overridden(module: L.LightningModule) -> Iterator[None]:
    """Make Lightning see an overridden ``configure_model`` for the duration.

    ``ModelParallelStrategy.setup`` insists on one because it expects the module to shard itself there; this
    strategy shards in ``setup``, so a module that builds its model in ``__init__`` is fine.
    """
    if is_overridden("configure_model", module):
        yield
        return
    module.configure_model = lambda: None
    try:
        yield
    finally:
        del module.configure_model


def checkpoint_model_keys(path: Path) -> set[str]:
    """The model state-dict keys a sharded (``.distcp``) Lightning checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")}


class AdapterFSDP2Strategy(AdapterStrategyMixin, ModelParallelStrategy):
    """FSDP2 for adapter training (and full fine-tuning): registered as ``"adapter_fsdp2"``. Runs on CPU with gloo.

    Args:
        block_classes: class names of the blocks to shard one by one; default: the Hugging Face model's
            ``_no_split_modules`` (``LlamaDecoderLayer``, ...).
        activation_checkpointing: recompute block activations in the backward pass (Hugging Face's non-reentrant
            checkpointing, so parameter names do not change).
        param_dtype, reduce_dtype: FSDP2 mixed precision (``"bfloat16"``, ...): the dtype of the gathered weights in
            forward / backward and of the gradient reduction; the sharded weights and the optimizer stay in theirs.
        reshard_after_forward: free gathered weights after each block's forward (less memory, one more all-gather).
        save_distributed_checkpoint: ``True`` writes sharded ``.distcp`` folders; ``False`` one full file from rank 0.
        timeout: seconds a rank waits in a collective before failing (``None``: torch's 30 minutes).
        sharded_loading: build the model on the meta device in ``configure_model`` (``load_model`` there records
            the weight files instead of reading them), inject the adapters, shard, then let each rank read only its
            own rows of every weight from the safetensors files: no rank ever holds a full copy of the model.
            Adapters get the same initial values as without it. Needs a model loaded by ``load_model`` from a
            local folder, packaged model or GGUF file (``FineTuneModule(model_name_or_path)`` or your module's
            ``configure_model``); a model passed as an object is refused. See ``lightning_ft.strategies.meta_load``.
        cpu_offload: FSDP2's ``CPUOffloadPolicy``: sharded parameters, gradients and optimizer state live in host
            memory and are copied to the GPU block by block (GPU only; on a CPU run everything is in host memory).
        replicate_frozen_root: keep frozen weights outside the transformer blocks (embedding / tied LM head, final
            norm) whole on every rank instead of sharding them: FSDP2 all-gathers a weight into two full-size buffers
            at once, in the forward and again in the backward, so a frozen weight kept whole costs less at the peak
            (see ``sharding.parallelize``). Measured on SmolLM2-135M LoRA, 2 CPU ranks, peak per rank: sharded
            loading 1,048 -> 936 MB with activation checkpointing, 1,642 -> 1,520 without; a full load per rank
            1,646 -> 1,521 MB.
    """

    def __init__(
        self,
        block_classes: list[str] | None = None,
        activation_checkpointing: bool = False,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        timeout: float | None = None,
        process_group_backend: str | None = None,
        sharded_loading: bool = False,
        cpu_offload: bool = False,
        replicate_frozen_root: bool = True,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=as_timeout(timeout),
        )
        self.block_classes = block_classes
        self.activation_checkpointing = activation_checkpointing
        self.mp_policy = mixed_precision_policy(param_dtype, reduce_dtype)
        self.reshard_after_forward = reshard_after_forward
        self.sharded_loading = sharded_loading
        self.cpu_offload = cpu_offload
        self.replicate_frozen_root = replicate_frozen_root
        self._init_recorder = None
        self.load_report: dict[str, Any] | None = None  # what this rank read from the weight files

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        if not self.sharded_loading:
            with super().tensor_init_context(empty_init):
                yield
            return
        with self.precision_plugin.tensor_init_context(), meta_init() as recorder:
            self._init_recorder = recorder
            yield

    @override
    def before_launch(self) -> None:
        super().before_launch()
        if self.cpu_offload and isinstance(self.accelerator, CPUAccelerator):
            raise ValueError(
                "cpu_offload=True moves sharded weights off the GPU, but this run is on the CPU already; "
                "drop cpu_offload (or run on GPUs)"
            )

    def offload_policy(self):
        """FSDP2's ``CPUOffloadPolicy`` when ``cpu_offload``, else ``None``."""
        if not self.cpu_offload:
            return None
        from torch.distributed.fsdp import CPUOffloadPolicy

        return CPUOffloadPolicy()

    @override
    def setup_environment(self) -> None:
        # pure FSDP: every rank holds a shard and its own share of the data
        set_model_parallel_sizes(self, data_parallel=self.num_nodes * self.num_processes, tensor_parallel=1)
        super().setup_environment()

    @override
    def setup(self, trainer: L.Trainer) -> None:
        module = self.lightning_module
        sources = None
        if self.sharded_loading and not is_sharded(module):
            if not has_meta_tensors(module):
                raise ValueError(
                    "AdapterFSDP2Strategy(sharded_loading=True) found the model already built with its weights (e.g. "
                    "passed as model=...): every rank holds a full copy. Pass model_name_or_path instead, or build "
                    "the model in configure_model with lightning_ft.models.load_model; or set sharded_loading=False"
                )
            recorder, self._init_recorder = self._init_recorder, None
            sources = materialize_recorded(module, recorder)  # the adapters, as without sharded loading
        parallelize(
            module,
            self.device_mesh["data_parallel"],
            self.block_classes,
            self.mp_policy,
            self.activation_checkpointing,
            self.reshard_after_forward,
            self.offload_policy(),
            self.replicate_frozen_root,
        )
        if sources is not None:
            self.load_report = load_shards(module, sources, self.root_device)
        with configure_model_overridden(module):
            super().setup(trainer)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        check_checkpoint(path)  # a sharded folder bypasses checkpoint_io: check its files here
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)  # a full file; AdapterStrategyMixin checks it
        metadata = torch.load(sharded_checkpoint_metadata_path(path), weights_only=weights_only)
        check_world_size(metadata, self.world_size, path)
        check_before_load(self.lightning_module, metadata)  # settings, base and callback, before any tensor loads
        if self.lightning_module.strict_loading:
            return ModelParallelStrategy.load_checkpoint(self, path, weights_only)
        return self.load_held_keys(path, metadata)

    def load_held_keys(self, path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
        """Load the model keys the checkpoint holds, the optimizer states and the metadata."""
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = checkpoint_model_keys(path)
        state = {k: v for k, v in get_model_state_dict(self.model).items() if k in saved}
        load({"state_dict": state}, checkpoint_id=path)
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            optim_state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=optim_state[f"optimizer_{i}"],
                options=StateDictOptions(cpu_offload=True),
            )
        # the keys the checkpoint holds, so that callbacks' on_load_checkpoint can check them (LoRA does)
        metadata["state_dict"] = {k: state.get(k) for k in sorted(saved)}
        return metadata
