"""Lightning strategies for adapter training (DDP, FSDP2, FSDP1) and the pure-torch sharding helpers under them.

Importing this package registers the strategies by name: ``Trainer(strategy="adapter_fsdp2")``, or on the command
line ``--trainer.strategy adapter_fsdp2``; with arguments, ``--trainer.strategy
lightning_ft.strategies.AdapterFSDP2Strategy --trainer.strategy.activation_checkpointing true`` or the same as
``class_path`` / ``init_args`` in a recipe.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_ft.strategies.checkpoint_io import CheckedCheckpointIO, check_checkpoints
from lightning_ft.strategies.comm import AllReduceCounter, count_allreduce_hook, trainable_bytes
from lightning_ft.strategies.ddp import AdapterDDPStrategy
from lightning_ft.strategies.fsdp1 import AdapterFSDP1Strategy
from lightning_ft.strategies.fsdp2 import AdapterFSDP2Strategy
from lightning_ft.strategies.sharding import (
    adapter_wrap_policy,
    find_blocks,
    full_state_dict,
    is_sharded,
    parallelize,
)

NAMES = {
    "adapter_ddp": AdapterDDPStrategy,
    "adapter_fsdp2": AdapterFSDP2Strategy,
    "adapter_fsdp1": AdapterFSDP1Strategy,
}
for _name, _cls in NAMES.items():
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, _cls, description=_cls.__doc__.split(":")[0])

__all__ = [
    "AdapterDDPStrategy",
    "AdapterFSDP1Strategy",
    "AdapterFSDP2Strategy",
    "AllReduceCounter",
    "CheckedCheckpointIO",
    "adapter_wrap_policy",
    "check_checkpoints",
    "count_allreduce_hook",
    "find_blocks",
    "full_state_dict",
    "is_sharded",
    "parallelize",
    "trainable_bytes",
]
