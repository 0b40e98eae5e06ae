"""What a method's checkpoint records so that a resume can be checked, and the checks themselves (pure torch).

Every checkpoint written with a method callback (``LoRA``, ``SparseMask``, ``LowRankCompression``) holds one entry
per method, e.g. ``checkpoint["lightning_ft_lora"]``::

    {"callback": "LoRA", "callback_path": "lightning_ft.callbacks.LoRA",
     "constructor": "LoRA(r=4, bias='lora_only')",    # the call that recreates the callback (non-default settings)
     "adapter_only": True,                           # the state dict holds only the trained tensors
     "config": {"r": 4, "alpha": 16, ...},           # every setting of the callback
     "training_only": ["dropout"],                   # settings compared only when ``fit`` resumes
     "tensors": {"model.x.lora_A": [4, 32], ...},    # what the state dict holds (sharded checkpoints keep it apart)
     "base": {...}}                                  # base_fingerprint of the model the adapters were trained on

``check_before_load(module, checkpoint)`` runs before the module's state dict is loaded: it refuses a checkpoint whose
entry names a callback that this run lacks (and whose tensors therefore do not fit the module), then runs every
check a callback registered on the module (``register_check``): the callbacks compare settings, base fingerprint and
tensor shapes and raise one message listing every difference (``setting: saved -> now``).

Base fingerprint (``base_fingerprint``): the Hugging Face model's class and ``name_or_path``, the name and shape of
every parameter, and a few values of each parameter (8 entries at fixed, evenly spread positions of the flattened
tensor, at most 256 tensors). Deterministic, and cheap (no full pass over any weight). The values are compared with a
relative tolerance of 1e-2, so the same base loaded in another dtype or on another device matches, another model
does not. The callbacks take it *before* they inject their layers (so it sees the base weights, not adapters, and
not PiSSA's residual), leave out the values of the tensors the checkpoint itself carries (a fresh classification head
in ``modules_to_save``), and keep it on the module. Sharded models: under ``AdapterFSDP2Strategy`` injection, and so
the fingerprint, happens before ``fully_shard``, on plain tensors. Parameters that already are ``DTensor`` shards (a
module that shards itself in ``configure_model``) or meta tensors contribute their name and global shape only: a
value at a fixed global position lives on one rank, and reading it on every rank would need a collective inside a
hook that ranks need not run in lockstep. ``name_or_path`` is shown, never compared (a moved folder is the same
model).

Quantised bases (``QuantizeBase``): the callback takes the fingerprint right before it quantises and the method
callbacks record that one (``surgery_fingerprint``), so a checkpoint names the full-precision base: NF4's rounding
would let two bases that differ by less than a quantisation step pass as one. A base quantised by the module's own
code (``quantize_base`` in ``configure_model``) is sampled through its de-quantised values. The quantisation settings
are checked by ``QuantizeBase`` itself; a checkpoint trained over a quantised base and resumed without the callback
gets a warning here (its tensors fit either way).
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

#: module attribute: the base fingerprint taken when the method was applied
FINGERPRINT_ATTR = "_lightning_ft_base_fingerprint"
#: module attribute: the fingerprint QuantizeBase took right before it quantised the base (see ``surgery_fingerprint``)
UNQUANTIZED_FINGERPRINT_ATTR = "_lightning_ft_unquantized_fingerprint"
#: module attribute: {checkpoint key: check(checkpoint)} registered by the callbacks of the current stage
REGISTRY_ATTR = "_lightning_ft_checkpoint_checks"
#: module attribute while the checks' on_load_checkpoint calls the module's own: id of the checkpoint checked
CHECKED_ATTR = "_lightning_ft_checked"
#: entries of checkpoints written before the entries named their callback
KNOWN_ENTRIES = {
    "lightning_ft_lora": "LoRA",
    "lightning_ft_sparse": "SparseMask",
    "lightning_ft_low_rank": "LowRankCompression",
}
SAMPLES_PER_TENSOR = 8
MAX_SAMPLED_TENSORS = 256
RTOL, ATOL = 1e-2, 1e-6
_MISSING = object()


# ---- plain values ------------------------------------------------------------------------------------------------
def plain(value: Any) -> Any:
    """``value`` as plain data that a ``weights_only`` checkpoint can hold: tuples become lists, other objects their
    repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return repr(value)


def same(a: Any, b: Any) -> bool:
    return plain(a) == plain(b)


def show(value: Any) -> str:
    return "(not recorded)" if value is _MISSING else repr(plain(value))


def read_config(value: Any) -> dict[str, Any] | None:
    """A saved ``config``: a dict, or (checkpoints of earlier versions) the repr of one; ``None`` when unreadable."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return None
    if isinstance(value, Mapping) and isinstance(value.get("settings"), str):  # SparseMask's earlier entry
        inner = read_config(value["settings"])
        value = {**inner, "mode": value.get("mode", inner.get("mode"))} if inner is not None else None
    return dict(value) if isinstance(value, Mapping) else None


def compare_configs(saved: Mapping[str, Any], now: Mapping[str, Any], skip: Iterable[str] = ()) -> list[str]:
    """``"setting: saved -> now"`` for every setting that differs (``skip`` left out), in ``now``'s order."""
    skip = set(skip)
    keys = list(now) + [k for k in saved if k not in now]
    return [
        f"{k}: {show(saved.get(k, _MISSING))} -> {show(now.get(k, _MISSING))}"
        for k in keys
        if k not in skip and not same(saved.get(k, _MISSING), now.get(k, _MISSING))
    ]


def constructor_call(
    label: str, config: Mapping[str, Any], defaults: Mapping[str, Any], also: Iterable[str] = ()
) -> str:
    """``label(k=v, ...)`` with the settings of ``config`` that differ from ``defaults`` (and those in ``also``)."""
    also = set(also)
    args = [f"{k}={show(v)}" for k, v in config.items() if k in also or k not in defaults or not same(v, defaults[k])]
    return f"{label}({', '.join(args)})"


def listing(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---- base fingerprint --------------------------------------------------------------------------------------------
def canonical_name(name: str) -> str:
    """The parameter's name before a wrapper layer was put around its module (``q_proj.base_layer.weight`` ->
    ``q_proj.weight``)."""
    return name.replace(".base_layer.", ".").removeprefix("base_layer.")


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _identity(module: nn.Module) -> tuple[str | None, str | None]:
    """Class and ``name_or_path`` of the outermost Hugging Face model in ``module`` (``None``s without one)."""
    for m in module.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_name_or_path"):
            # fully_shard swaps in a subclass (FSDPLlamaForCausalLM): name the model's own class
            cls = next(c for c in type(m).__mro__ if not c.__module__.startswith("torch.distributed"))
            return cls.__name__, (str(config._name_or_path) or None)
    return None, None


def _plain_values(p: torch.Tensor) -> torch.Tensor:
    """The values of a tensor subclass that stores them packed (torchao's NF4 / int8 weights), else ``p``."""
    if type(p) in (torch.Tensor, nn.Parameter):
        return p
    for unpack in ("get_original_weight", "dequantize"):  # NF4Tensor, Int8Tensor
        if callable(getattr(p, unpack, None)):
            return getattr(p, unpack)()
    return p


def tensor_samples(p: torch.Tensor, k: int = SAMPLES_PER_TENSOR) -> list[float] | None:
    """``k`` values at evenly spread positions of the flattened tensor (midpoints of k equal parts); ``None`` for a
    tensor without readable values (meta, sharded, empty)."""
    if p.is_meta or _is_dtensor(p) or p.numel() == 0:
        return None
    try:
        flat = _plain_values(p.detach()).reshape(-1)
        n = flat.numel()
        k = min(k, n)
        idx = torch.tensor([(2 * i + 1) * n // (2 * k) for i in range(k)], device=flat.device)
        return flat[idx].float().cpu().tolist()
    except (RuntimeError, TypeError, NotImplementedError):  # exotic (e.g. quantized) storage: shape only
        return None


def sampled_parameter_names(module: nn.Module, max_tensors: int = MAX_SAMPLED_TENSORS) -> list[str]:
    """The parameters whose values the fingerprint samples: all, or ``max_tensors`` evenly spread ones."""
    names = [n for n, _ in module.named_parameters()]
    if len(names) > max_tensors:
        names = [names[(2 * i + 1) * len(names) // (2 * max_tensors)] for i in range(max_tensors)]
    return names


def base_fingerprint(
    module: nn.Module, max_tensors: int = MAX_SAMPLED_TENSORS, per_tensor: int = SAMPLES_PER_TENSOR
) -> dict[str, Any]:
    """The fingerprint of ``module``'s weights (see the module docstring): plain data. Parameters on the meta device
    give their shapes only (``lightning_ft.quant.load`` adds their samples as it reads them)."""
    model_class, name = _identity(module)
    params = {n: [int(s) for s in p.shape] for n, p in module.named_parameters()}
    samples = {}
    for n in sampled_parameter_names(module, max_tensors):
        values = tensor_samples(module.get_parameter(n), per_tensor)
        if values is not None:
            samples[n] = values
    return {"version": 1, "class": model_class, "name": name, "parameters": params, "samples": samples}


def surgery_fingerprint(module: nn.Module) -> dict[str, Any]:
    """The fingerprint a method records for ``module``'s base: the one ``QuantizeBase`` took before it quantised
    the base (full-precision values: NF4's rounding would hide small differences between two bases), else
    ``base_fingerprint(module)`` (a base quantised by the module's own code is sampled through its de-quantised
    values)."""
    before = module.__dict__.get(UNQUANTIZED_FINGERPRINT_ATTR)
    return before if before is not None else base_fingerprint(module)


def drop_samples(fingerprint: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``fingerprint`` without the values of the parameters ``names`` (e.g. the ones a checkpoint carries itself)."""
    names = {canonical_name(n) for n in names}
    return {**fingerprint, "samples": {k: v for k, v in fingerprint["samples"].items() if k not in names}}


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=RTOL, abs_tol=ATOL) for x, y in zip(a, b)
    )


def compare_fingerprints(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """One line per way the base models differ (class, parameter names, shapes, sampled values); ``[]`` if alike."""
    lines = []
    if saved.get("class") and now.get("class") and saved["class"] != now["class"]:
        lines.append(f"base model class: {saved['class']} -> {now['class']}")
    sp, np_ = saved.get("parameters") or {}, now.get("parameters") or {}
    gone, new = [n for n in sp if n not in np_], [n for n in np_ if n not in sp]
    reshaped = [n for n in sp if n in np_ and list(sp[n]) != list(np_[n])]
    if gone or new:
        count = lambda p: f"{len(p)} tensors, {sum(math.prod(s) for s in p.values()):,} values"  # noqa: E731
        lines.append(f"base model parameters: {count(sp)} -> {count(np_)}")
        if gone:
            lines.append(f"  not in this model: {listing(gone)}")
        if new:
            lines.append(f"  new in this model: {listing(new)}")
    if reshaped:
        shown = [f"{n} {tuple(sp[n])} -> {tuple(np_[n])}" for n in reshaped]
        lines.append(f"base model shapes: {len(reshaped)} tensors differ: {listing(shown)}")
    ss, ns = saved.get("samples") or {}, now.get("samples") or {}
    common = [n for n in ss if n in ns and n not in reshaped]
    differ = [n for n in common if not _close(ss[n], ns[n])]
    if differ:
        lines.append(
            f"base model weights: {len(differ)} of {len(common)} sampled tensors differ, e.g. {listing(differ)}"
        )
    if lines and saved.get("name") != now.get("name"):
        lines.insert(0, f"base model: {saved.get('name')} -> {now.get('name')}")
    return lines


# ---- checks before the state dict is loaded ----------------------------------------------------------------------
def register_check(module: nn.Module, key: str, check: Callable[[Mapping[str, Any]], None]) -> None:
    """Run ``check(checkpoint)`` before ``module``'s state dict is loaded from a checkpoint.

    Installs (once) an instance-level ``on_load_checkpoint`` on the LightningModule that calls ``check_before_load``
    and then the module's own hook: Lightning calls the module's hook right before loading the state dict, whereas
    callbacks' ``on_load_checkpoint`` only runs after it.
    """
    checks = module.__dict__.setdefault(REGISTRY_ATTR, {})
    checks[key] = check
    current = module.__dict__.get("on_load_checkpoint")
    if getattr(current, "_lightning_ft_checks", False):
        return

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> Any:
        check_before_load(module, checkpoint)
        hook = current if current is not None else getattr(type(module), "on_load_checkpoint", None)
        if hook is None:
            return None
        module.__dict__[CHECKED_ATTR] = id(checkpoint)  # a module hook that runs the checks itself skips them
        try:
            return hook(checkpoint) if current is not None else hook(module, checkpoint)
        finally:
            module.__dict__.pop(CHECKED_ATTR, None)

    on_load_checkpoint._lightning_ft_checks = True  # type: ignore[attr-defined]
    on_load_checkpoint._previous = current  # type: ignore[attr-defined]
    module.__dict__["on_load_checkpoint"] = on_load_checkpoint


def unregister_check(module: nn.Module, key: str) -> None:
    """Undo ``register_check``; the module's ``on_load_checkpoint`` is restored when no check is left."""
    checks = module.__dict__.get(REGISTRY_ATTR)
    if checks is None:
        return
    checks.pop(key, None)
    if checks:
        return
    del module.__dict__[REGISTRY_ATTR]
    current = module.__dict__.get("on_load_checkpoint")
    if getattr(current, "_lightning_ft_checks", False):
        previous = current._previous
        if previous is None:
            del module.__dict__["on_load_checkpoint"]
        else:
            module.__dict__["on_load_checkpoint"] = previous


def saved_shapes(checkpoint: Mapping[str, Any], entry: Mapping[str, Any] | None = None) -> dict[str, list[int]] | None:
    """Key -> shape of the checkpoint's model state: from its state dict, else (sharded checkpoints, before loading)
    from the entry's ``tensors`` record; ``None`` when neither is there."""
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping) and state:
        return {k: list(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    tensors = (entry or {}).get("tensors")
    return dict(tensors) if isinstance(tensors, Mapping) else None


def entry_callback(key: str, entry: Any) -> str | None:
    """The callback a checkpoint entry needs (``None`` for entries that are not a method's)."""
    if not isinstance(entry, Mapping):
        return None
    if isinstance(entry.get("callback"), str):
        return entry["callback"]
    return KNOWN_ENTRIES.get(key)


def check_before_load(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Refuse, before loading, a checkpoint that needs a method callback this run lacks; then run registered checks.

    A LightningModule without a lightning-ft callback calls this from its ``on_load_checkpoint`` (the lightning-ft
    modules do): an adapter-only checkpoint then names the callback it needs instead of hundreds of missing keys.
    """
    if not isinstance(checkpoint, Mapping) or module.__dict__.get(CHECKED_ATTR) == id(checkpoint):
        return
    checks = dict(module.__dict__.get(REGISTRY_ATTR) or {})
    for key, entry in checkpoint.items():
        callback = entry_callback(key, entry) if isinstance(key, str) and key.startswith("lightning_ft_") else None
        if callback is None or key in checks:
            continue
        if callback == "QuantizeBase":  # the tensors fit either way; the base values the adapters see do not
            warnings.warn(
                f"the checkpoint was trained over a quantised base ({entry.get('constructor') or callback}); this "
                "run has no QuantizeBase callback, so its adapters continue over the full-precision base. Add "
                "the QuantizeBase callback (LoRAModule: quantize_base=...) to resume as it was trained.",
                stacklevel=2,
            )
            continue
        adapter_only = bool(entry.get("adapter_only", key != "lightning_ft_low_rank"))
        problem = _does_not_fit(module, checkpoint, entry, adapter_only)
        if problem:
            raise RuntimeError(missing_callback_message(entry, callback, problem, adapter_only))
    for check in checks.values():
        check(checkpoint)


def _does_not_fit(
    module: nn.Module, checkpoint: Mapping[str, Any], entry: Mapping[str, Any], adapter_only: bool
) -> str | None:
    """Why the checkpoint's model state does not load into ``module`` as it is (``None`` when it does)."""
    shapes = saved_shapes(checkpoint, entry)
    if shapes is None:
        return "its state dict was not recorded" if adapter_only else None
    keys = set(module.state_dict(keep_vars=True))
    unexpected = [k for k in shapes if k not in keys]
    missing = [k for k in keys if k not in shapes] if getattr(module, "strict_loading", True) is not False else []
    if unexpected:
        return f"{len(unexpected)} of its {len(shapes)} tensors are not in this model (e.g. {listing(unexpected, 2)})"
    if missing and adapter_only:
        return f"it holds {len(shapes)} tensors, not the {len(missing)} base weights this model would load"
    return None


def missing_callback_message(entry: Mapping[str, Any], callback: str, problem: str, adapter_only: bool) -> str:
    what = "holds only the tensors it trained" if adapter_only else "holds the weights it changed"
    constructor = entry.get("constructor") or f"{callback}(...)"
    settings = "" if entry.get("constructor") else " (with the settings it was trained with)"
    path = entry.get("callback_path") or f"lightning_ft.callbacks.{callback}"
    modules = {"LoRA": "LoRAModule", "SparseMask": "SparseModule"}
    module = f" ({modules[callback]} adds it itself)" if callback in modules else ""
    return (
        f"this checkpoint was written with the {callback} callback ({path}) and {what}: {problem}. This run has no "
        f"{callback} callback. Add {constructor}{settings} to Trainer(callbacks=[...]){module} and resume on the same "
        "base model."
    )
