"""Sharding a model whose base is frozen and whose adapters train (pure torch, no Lightning import).

FSDP2 (``fully_shard``) shards each parameter on its own, so frozen base weights and trainable adapters can share a
transformer block: the block is all-gathered for its forward and backward, and only parameters that received a
gradient are reduce-scattered. ``parallelize`` shards every block, then each top-level model (the root, whose forward
pre-hook gathers what lies outside the blocks: embeddings, final norm, heads).

FSDP1 flattens each wrapped unit into one parameter, which with ``use_orig_params=False`` must be all trainable or all
frozen. ``adapter_wrap_modules`` picks units that satisfy that: the blocks, every module that owns trainable
parameters directly (a ``LoRALinear``, a trained head), and the parameter-holding children of those (the frozen
``base_layer``), so frozen weights sit in frozen units and get no gradient buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import Tensor, nn

from lightning_ft.modeling import enable_activation_checkpointing, hf_models


# ---- finding blocks --------------------------------------------------------------------------------------------
def plain_class(module: nn.Module) -> type:
    """The module's class without FSDP2's dynamic ``FSDP<Class>`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def block_class_names(module: nn.Module) -> set[str]:
    """Class names of the transformer blocks of every Hugging Face model in ``module`` (their ``_no_split_modules``)."""
    return {name for m in hf_models(module) for name in (m._no_split_modules or [])}


def find_blocks(module: nn.Module, block_classes: Iterable[type | str] | None = None) -> list[nn.Module]:
    """The outermost submodules of ``module`` whose class (or class name) is in ``block_classes``.

    ``block_classes`` defaults to the Hugging Face models' ``_no_split_modules`` (``LlamaDecoderLayer``, ...).
    Raises ``ValueError`` when no block is found.
    """
    wanted = {c if isinstance(c, str) else c.__name__ for c in block_classes} if block_classes else None
    if wanted is None:
        wanted = block_class_names(module)
    blocks: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if plain_class(m).__name__ in wanted and not any(name.startswith(f"{n}.") for n, _ in blocks):
            blocks.append((name, m))
    if not blocks:
        how = f"block_classes={sorted(wanted)}" if wanted else "no _no_split_modules (not a Hugging Face model?)"
        raise ValueError(
            f"no transformer blocks to shard in {type(module).__name__} ({how}); pass block_classes, e.g. "
            "['LlamaDecoderLayer']"
        )
    return [m for _, m in blocks]


# ---- FSDP2 -----------------------------------------------------------------------------------------------------
def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (sharded by FSDP2 or tensor parallelism)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def parallelize(
    module: nn.Module,
    device_mesh,
    block_classes: Sequence[type | str] | None = None,
    mp_policy=None,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    offload_policy=None,
    replicate_frozen_root: bool = False,
) -> nn.Module:
    """Shard ``module`` with FSDP2: ``fully_shard`` each transformer block, then each top-level Hugging Face model
    (or ``module`` itself when it holds none). In place; returns ``module``. A module that is already sharded is
    returned as it is (Lightning sets up the strategy again for ``validate`` / ``test`` after ``fit``).

    Call it after adapters are injected and the base is frozen, before the optimizer is built. ``device_mesh`` is a 1-D
    ``DeviceMesh`` over the data-parallel ranks; ``mp_policy`` a ``torch.distributed.fsdp.MixedPrecisionPolicy``;
    ``offload_policy`` e.g. ``CPUOffloadPolicy()`` (sharded parameters, gradients and optimizer state in host memory).
    Parameters still on the meta device stay there (sharded): ``meta_load.load_shards`` fills them afterwards.
    Raises ``ValueError`` when a trainable parameter would stay outside every sharded module (its gradient would
    not be averaged across ranks).

    ``replicate_frozen_root``: frozen parameters outside the blocks (the token embedding / tied LM head, the final
    norm) are left unsharded (``ignored_params``), a full copy on every rank. All-gathering a weight needs its full
    size twice at once (FSDP2's flat all-gather output and the unsharded copy it is copied into), twice per step
    (forward, and backward for the LM head), so for a frozen weight a full copy held throughout costs less at the
    peak: ``E`` instead of ``E / world + 2 E`` (SmolLM2-135M: the 113 MB embedding). They are cloned first: a weight
    loaded as a view of the memory-mapped safetensors file would keep the whole mapping resident (measured: +220 MB
    per rank for SmolLM2). Skipped under a mixed-precision ``param_dtype`` (FSDP2 would not cast them) and CPU
    offloading.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return module
    blocks = find_blocks(module, block_classes)
    roots = hf_models(module) or [module]
    if activation_checkpointing:
        for root in roots:
            enable_activation_checkpointing(root)
    kwargs = {"mesh": device_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    same_dtype = mp_policy is None or mp_policy.param_dtype is None
    replicate = replicate_frozen_root and offload_policy is None and same_dtype
    for root in roots:
        if replicate:
            kwargs["ignored_params"] = whole = frozen_outside_blocks(root)
            for param in whole:  # a weight loaded as a view of the memory-mapped safetensors file keeps the
                param.data = param.data.clone()  # whole mapping (and every page read) resident: own the memory
        fully_shard(root, reshard_after_forward=reshard_after_forward, **kwargs)
    sharded = {id(p) for root in roots for p in root.parameters()}
    if outside := [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in sharded]:
        raise ValueError(
            f"trainable parameters outside the Hugging Face model would not be synchronised across ranks: "
            f"{outside[:4]}; keep them inside the model or shard them in the module's configure_model"
        )
    return module


def frozen_outside_blocks(module: nn.Module) -> set[nn.Parameter]:
    """The frozen parameters of ``module`` that no ``fully_shard`` has sharded yet (call after sharding the blocks:
    by then their parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return {p for p in module.parameters() if not p.requires_grad and not isinstance(p, DTensor)}


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict with full (unsharded) tensors on the CPU.

    For a sharded module every rank must call this (it all-gathers); only rank 0 receives the tensors, the other
    ranks an empty dict. An unsharded module returns its own ``state_dict()``.
    """
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- FSDP1 -----------------------------------------------------------------------------------------------------
def _owns_trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


def adapter_wrap_modules(model: nn.Module, block_classes: Iterable[type | str] | None = None) -> set[nn.Module]:
    """The FSDP1 units for a model with a frozen base: the blocks, each module owning a trainable parameter
    directly, and each parameter-holding child of such a module. See the module docstring."""
    units: set[nn.Module] = set(find_blocks(model, block_classes))
    for m in model.modules():
        if _owns_trainable(m):
            units.add(m)
            units.update(c for c in m.children() if any(True for _ in c.parameters()))
    return units


def mixed_units(model: nn.Module, units: set[nn.Module]) -> dict[str, list[str]]:
    """``{unit name: parameter names}`` of the units (plus the root) whose own parameters, those not inside a nested
    unit, mix trainable and frozen ones; FSDP1 with ``use_orig_params=False`` refuses such a unit."""
    owner: dict[str, str] = {}  # parameter name -> name of the innermost unit holding it
    names = [n for n, m in model.named_modules() if m in units or m is model]
    for pname, _ in model.named_parameters():
        owner[pname] = max((n for n in names if not n or pname.startswith(n + ".")), key=len)
    flags: dict[str, set[bool]] = {}
    for pname, p in model.named_parameters():
        flags.setdefault(owner[pname], set()).add(p.requires_grad)
    return {u or "<root>": [p for p in owner if owner[p] == u] for u, f in flags.items() if len(f) > 1}


def adapter_wrap_policy(block_classes: Iterable[type | str] | None = None) -> Callable[[nn.Module, bool, int], bool]:
    """An FSDP1 ``auto_wrap_policy`` that wraps ``adapter_wrap_modules`` of the model it is applied to.

    FSDP1 calls the policy first on the root with ``recurse=True``; the units are chosen then, from the model as it
    is at wrapping time (after the adapters were injected). Raises ``ValueError`` naming any unit that would still
    mix trainable and frozen parameters (e.g. ``bias="all"`` trains the bias of a frozen linear layer).
    """
    tree: set[int] = set()  # every module of the model being wrapped; a module outside it is a new root
    units: set[int] = set()

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if id(module) not in tree:
            chosen = adapter_wrap_modules(module, block_classes)
            if mixed := mixed_units(module, chosen):
                raise ValueError(
                    f"FSDP1 with use_orig_params=False cannot shard units that mix trainable and frozen parameters: "
                    f"{dict(list(mixed.items())[:3])}; use FSDP2 (AdapterFSDP2Strategy)"
                )
            tree.clear()
            units.clear()
            tree.update(id(m) for m in module.modules())
            units.update(id(m) for m in chosen)
        return True if recurse else id(module) in units

    return policy
