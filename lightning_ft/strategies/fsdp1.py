"""``AdapterFSDP1Strategy``: FSDP1 on GPUs with units that never mix frozen and trainable parameters.

FSDP1 flattens each unit into one parameter. With ``use_orig_params=True`` a unit that mixes a frozen base with
trainable adapters keeps a gradient buffer the size of the whole unit; with ``False`` it refuses such a unit. The
``adapter_wrap_policy`` gives the adapters (each ``LoRALinear``'s own ``lora_A`` / ``lora_B``, a trained head) units
of their own and the frozen weights (``base_layer``, norms, embeddings) frozen units, so ``use_orig_params=False``
works and gradient memory is the adapters' size only. For SmolLM2-135M with LoRA r=8 on every linear layer (counted
from the parameter shapes, before dividing by the world size): 9.3 MB of float32 gradients instead of the 405 MB
that full-size gradients of the 30 mixed blocks take with ``use_orig_params=True``.

Limits of ``use_orig_params=False``: the optimizer sees flat 1-D parameters, so parameter groups by name or shape
(no weight decay for biases and norms, LoRA+ learning rates) do not apply, and the module's parameters are not the
original ones after wrapping (``MergeAdapters`` and adapter-only checkpoints need ``AdapterFSDP2Strategy``).
FSDP1 is deprecated in torch in favour of FSDP2; prefer ``AdapterFSDP2Strategy``.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import FSDPStrategy
from typing_extensions import override

from lightning_ft._compat import set_activation_checkpointing_kwargs
from lightning_ft.strategies.common import AdapterStrategyMixin, as_timeout
from lightning_ft.strategies.sharding import adapter_wrap_policy, block_class_names


class AdapterFSDP1Strategy(AdapterStrategyMixin, FSDPStrategy):
    """FSDP1 for adapter training on CUDA GPUs: registered as ``"adapter_fsdp1"``; on a CPU it fails at
    ``Trainer(...)``.

    Args:
        block_classes: class names of the transformer blocks (default: the model's ``_no_split_modules``).
        activation_checkpointing: checkpoint each block (Lightning's ``activation_checkpointing_policy``).
        sharding_strategy: ``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ``"NO_SHARD"`` or ``"HYBRID_SHARD"``.
        state_dict_type: ``"full"`` (one file from rank 0) or ``"sharded"`` checkpoints.
        timeout: seconds a rank waits in a collective before failing (``None``: torch's 30 minutes).
        Other keyword arguments go to ``FullyShardedDataParallel`` (``cpu_offload``, ``mixed_precision``, ...).
    """

    def __init__(
        self,
        block_classes: list[str] | None = None,
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        timeout: float | None = None,
        process_group_backend: str | None = None,
        **fsdp_kwargs: Any,
    ) -> None:
        super().__init__(
            auto_wrap_policy=adapter_wrap_policy(block_classes),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            timeout=as_timeout(timeout),
            process_group_backend=process_group_backend,
            use_orig_params=False,
            **fsdp_kwargs,
        )
        self.block_classes = block_classes
        self.activation_checkpointing = activation_checkpointing

    @override
    def before_launch(self) -> None:
        if not isinstance(self.accelerator, CUDAAccelerator):
            raise ValueError(
                f"AdapterFSDP1Strategy needs CUDA GPUs (FSDP1 does not run on {type(self.accelerator).__name__}); "
                "on CPUs use strategy='adapter_fsdp2' (FSDP2 with gloo) or 'adapter_ddp'"
            )
        super().before_launch()

    @override
    def setup(self, trainer: Any) -> None:
        # a callback that reads the original parameters (MergeAdapters) says so; strategies never import callbacks
        if any(getattr(cb, "needs_original_parameters", False) for cb in trainer.callbacks):
            raise ValueError(
                "MergeAdapters cannot export from FSDP1 flat parameters (use_orig_params=False); use "
                "AdapterFSDP2Strategy, or export afterwards from a full checkpoint"
            )
        if self.activation_checkpointing:
            names = set(self.block_classes or block_class_names(self.lightning_module))
            blocks = {type(m) for m in self.lightning_module.modules() if type(m).__name__ in names}
            set_activation_checkpointing_kwargs(self, {"check_fn": lambda m: type(m) in blocks})
        super().setup(trainer)
