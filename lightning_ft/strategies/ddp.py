"""``AdapterDDPStrategy``: DDP for a model whose base is frozen before wrapping (by the ``LoRA`` / ``SparseMask``
callbacks, which inject in ``configure_model``).

DDP builds its gradient buckets from the parameters that require grad when it wraps the model, so only the
adapters are all-reduced, and a correctly frozen model needs no ``find_unused_parameters`` (which would add a graph
traversal per step). ``measure_communication=True`` counts the bytes all-reduced (``comm_counter``), on CPU too:
Lightning registers communication hooks only on CUDA.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_ft.strategies.comm import AllReduceCounter, count_allreduce_hook, trainable_bytes
from lightning_ft.strategies.common import AdapterStrategyMixin, as_timeout


class AdapterDDPStrategy(AdapterStrategyMixin, DDPStrategy):
    """DDP for adapter training: registered as ``"adapter_ddp"`` (``Trainer(strategy="adapter_ddp")``).

    Args:
        measure_communication: count the gradient bytes all-reduced in ``self.comm_counter`` (an
            ``AllReduceCounter``); with a frozen base they are ``trainable_bytes(model)`` per optimizer step.
        timeout: seconds a rank waits in a collective before failing (``None``: torch's 30 minutes).
        find_unused_parameters: only for modules that really skip trainable parameters in some steps.
        Other keyword arguments go to ``torch.nn.parallel.DistributedDataParallel`` (``static_graph``,
        ``bucket_cap_mb``, ``gradient_as_bucket_view``, ...).

    Lightning's launcher (``Trainer(devices=N)``), torchrun and SLURM all work; see ``recipes/launch_*``.
    """

    def __init__(
        self,
        measure_communication: bool = False,
        timeout: float | None = None,
        process_group_backend: str | None = None,
        find_unused_parameters: bool = False,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        self.comm_counter = AllReduceCounter() if measure_communication else None
        if self.comm_counter is not None:
            ddp_kwargs.update(ddp_comm_state=self.comm_counter, ddp_comm_hook=count_allreduce_hook)
        # kept here too: Lightning registers them on CUDA only, configure_ddp registers them on CPU
        self.comm_hook = ddp_kwargs.get("ddp_comm_hook")
        self.comm_state = ddp_kwargs.get("ddp_comm_state")
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=as_timeout(timeout),
            start_method=start_method,
            find_unused_parameters=find_unused_parameters,
            **ddp_kwargs,
        )

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the model; registers the communication hook on CUDA
        if self.root_device.type != "cuda" and self.comm_hook is not None:
            # gloo runs Python communication hooks as well (Lightning's comment about NCCL dates from torch 1.8)
            self.model.register_comm_hook(self.comm_state, self.comm_hook)
        module = self.lightning_module
        mb = trainable_bytes(module) / 2**20
        total = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
        rank_zero_info(f"AdapterDDPStrategy: all-reducing {mb:.2f} MB of gradients per step (weights: {total:.2f} MB)")
