"""Sharded loading for FSDP2: build the model on the meta device, shard it, then let each rank read only its own rows
of every weight from the safetensors files (pure torch + safetensors, no Lightning import).

Why read the files rather than load on rank 0 and scatter: every rank opens the files itself (memory-mapped) and
reads the rows of its shard (``SafetensorsRows``: plain file reads of rows ``[start, stop)``, straight into the
shard; ``safe_open``'s memory map would add every page read to the RSS), so no rank ever holds a full sharded weight,
rank 0 included (frozen weights outside the blocks, which ``replicate_frozen_root`` leaves unsharded, are read
whole), and loading needs no collective at all (no rank waits for rank 0's reads, nothing crosses the
network). The cost: every node needs the files (a shared file system or a copy per node), which a multi-node run has
anyway for the tokenizer and config.

The steps, in the order ``AdapterFSDP2Strategy(sharded_loading=True)`` runs them:

1. ``configure_model`` runs under :func:`meta_init`: ``lightning_ft.models.load_model`` sees the meta default device
   and builds the model without weights; :func:`tag_weight_sources` records on every parameter the file and key it
   loads from. Non-persistent buffers (rotary frequencies) and parameters the files lack (a fresh classification
   head) are made on the CPU at once, as ``from_pretrained`` does. Adapters are injected on the meta device too;
   :class:`InitRecorder` records their ``torch.nn.init`` calls (with the random-number state of each) instead of
   running them.
2. :func:`materialize_recorded` replays those calls on real CPU tensors, so the adapters get exactly the values of
   the non-meta path (same seed, same order). A meta tensor with neither a file nor a recorded init (DoRA's
   magnitude and PiSSA need the base weights) is refused with the remedy.
3. ``fully_shard`` (``parallelize``) shards the still-meta base and the real adapters alike.
4. :func:`load_shards` allocates each rank's shards (``to_empty``), puts the adapters and buffers back and reads each
   base weight's rows ``[start, stop)`` of dimension 0 (FSDP2's ``Shard(0)`` split) from the files.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

WEIGHT_SOURCE = "_lightning_ft_weight_source"  # attribute of a meta parameter: (file, key) it loads from
INDEX = "model.safetensors.index.json"


# ---- step 1: what each parameter loads from ----------------------------------------------------------------------
def weight_index(folder: str | Path) -> dict[str, str]:
    """``{tensor key: safetensors file}`` of a ``save_pretrained`` folder (one file or an index of shards).

    ``FileNotFoundError`` when the folder has no safetensors weights (``.bin`` files cannot be read by rows)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {k: str(folder / f) for k, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"sharded loading reads safetensors files, and {folder} has none; save the model with "
            "save_pretrained(safe_serialization=True) or use AdapterFSDP2Strategy(sharded_loading=False)"
        )
    index: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), str(file)))
    return index


def _file_key(name: str, index: dict[str, str], prefix: str) -> str | None:
    """The key of parameter ``name`` in the files: itself, or without / with the model's ``base_model_prefix``."""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
    return next((k for k in candidates if k in index), None)


def tag_weight_sources(model: nn.Module, folder: str | Path) -> list[str]:
    """Record ``(file, key)`` on every meta parameter of ``model`` found in ``folder``'s safetensors files, load the
    buffers on the CPU (from the files or, for non-persistent ones, the model's own ``_init_weights``) and
    initialise on the CPU the parameters the files lack (as ``from_pretrained`` does for a fresh head).

    Returns the names of those initialised parameters. Shared (tied) parameters are tagged once.
    """
    index = weight_index(folder)
    prefix = getattr(model, "base_model_prefix", "") or ""
    missing_owners: dict[str, nn.Module] = {}
    for name, p in model.named_parameters():
        key = _file_key(name, index, prefix)
        if key is not None:
            setattr(p, WEIGHT_SOURCE, (index[key], key))
        else:
            missing_owners[name.rpartition(".")[0]] = model.get_submodule(name.rpartition(".")[0])
    init_weights = getattr(model, "_init_weights", None)
    for mod_name, mod in model.named_modules():
        metas = [b for b, t in mod._buffers.items() if t is not None and t.is_meta]
        for b in metas:
            key = _file_key(f"{mod_name}.{b}" if mod_name else b, index, prefix)
            if key is not None:
                with safe_open(index[key], framework="pt") as f:
                    mod._buffers[b] = f.get_tensor(key).to(mod._buffers[b].dtype)
            else:
                mod._buffers[b] = torch.empty_like(mod._buffers[b], device="cpu")
        if metas and init_weights is not None and not list(mod.parameters(recurse=False)):
            init_weights(mod)  # recomputes non-persistent buffers (rotary inv_freq, ...)
    initialised = []
    for mod_name, mod in missing_owners.items():
        own = [n for n, p in mod.named_parameters(recurse=False) if not hasattr(p, WEIGHT_SOURCE)]
        if init_weights is None or len(own) != len(list(mod.parameters(recurse=False))):
            raise ValueError(
                f"{mod_name or type(model).__name__}: {own} are not in {folder}'s weight files and cannot be "
                "initialised on their own; use AdapterFSDP2Strategy(sharded_loading=False)"
            )
        mod.to_empty(device="cpu", recurse=False)  # small: a head the files lack
        init_weights(mod)
        initialised += [f"{mod_name}.{n}" if mod_name else n for n in own]
    return initialised


# ---- recording the adapters' random init -------------------------------------------------------------------------
# in-place fills that ``torch.nn.init`` functions without a torch-function hook (``zeros_``, ``ones_``) end in
FILLS = frozenset({"zero_", "fill_", "uniform_", "normal_"})


class InitRecorder(TorchFunctionMode):
    """While active, ``torch.nn.init`` calls and in-place fills (``FILLS``) on meta tensors are recorded (in order,
    with the CPU random-number state at each call) instead of run; :func:`materialize_recorded` replays them on real
    tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict, Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" or getattr(func, "__name__", "") in FILLS:
            tensor = kwargs.get("tensor", args[0] if args else None)
            if isinstance(tensor, Tensor) and tensor.is_meta:
                self.calls.append((func, args, kwargs, torch.get_rng_state()))
                return tensor
        return func(*args, **kwargs)


@contextmanager
def meta_init() -> Iterator[InitRecorder]:
    """Build on the meta device and record the random init of new tensors (see :class:`InitRecorder`)."""
    recorder = InitRecorder()
    with torch.device("meta"), recorder:
        yield recorder


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def materialize_recorded(module: nn.Module, recorder: InitRecorder | None) -> dict[str, tuple[str, str]]:
    """Make real CPU tensors of the meta parameters whose init ``recorder`` recorded (the adapters), replaying the
    calls in order from the random-number state the first one saw (meta tensors draw no random numbers, so the calls
    saw one state); return ``{parameter name: (file, key)}`` of the meta parameters left, which the files fill after
    sharding. The random-number state is left where the calls, run for real, would have left it.

    ``ValueError`` naming any meta parameter with neither a file nor a recorded init.
    """
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[int, str] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None and p.is_meta:
                owners.setdefault(id(p), []).append((mod, pname))
                names.setdefault(id(p), f"{mod_name}.{pname}" if mod_name else pname)
    real: dict[int, Tensor] = {}
    seen = None  # the random-number state the previous recorded call saw
    for func, args, kwargs, state in recorder.calls if recorder is not None else []:
        tensor = kwargs.get("tensor", args[0] if args else None)
        if id(tensor) not in owners or hasattr(tensor, WEIGHT_SOURCE):
            continue  # not (or no longer) in the model, or a base weight the files fill
        target = real.setdefault(id(tensor), torch.empty_like(tensor, device="cpu"))
        if seen is None or not torch.equal(state, seen):
            torch.set_rng_state(state)  # the first call, or real random draws happened since the previous one
        seen = state
        with torch.no_grad():
            if "tensor" in kwargs:
                func(**{**kwargs, "tensor": target})
            else:
                func(target, *args[1:], **kwargs)
    sources: dict[str, tuple[str, str]] = {}
    unresolved = []
    for pid, places in owners.items():
        old = places[0][0]._parameters[places[0][1]]
        if pid in real:
            new = nn.Parameter(real[pid], requires_grad=old.requires_grad)
            for mod, pname in places:
                mod._parameters[pname] = new
        elif hasattr(old, WEIGHT_SOURCE):
            sources[names[pid]] = getattr(old, WEIGHT_SOURCE)
        else:
            unresolved.append(names[pid])
    if unresolved:
        raise ValueError(
            f"sharded loading cannot make {len(unresolved)} parameters: {unresolved[:4]} are neither in the model's "
            "weight files nor initialised by torch.nn.init (DoRA's magnitude and PiSSA's init need the full base "
            "weights, as do sparse deltas and compression). Use AdapterFSDP2Strategy(sharded_loading=False) for them."
        )
    return sources


# ---- step 4: each rank reads its rows ------------------------------------------------------------------------------
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsRows:
    """Reads rows ``[start, stop)`` of dimension 0 of a tensor in a safetensors file with plain file reads, straight
    into the destination tensor when the dtypes agree.

    Not ``safe_open``: it memory-maps the file, and every page read through the map counts in the process's RSS
    until the file is closed, which would double a rank's memory while it loads. The layout read here is the
    documented one (8-byte header length, JSON header of ``dtype`` / ``shape`` / ``data_offsets``, row-major data).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        (length,) = struct.unpack("<Q", self.file.read(8))
        self.header = json.loads(self.file.read(length))
        self.data_start = 8 + length

    def shape(self, key: str) -> list[int]:
        return list(self.header[key]["shape"])

    def read_rows(self, key: str, start: int, stop: int, out: Tensor) -> None:
        """Fill ``out`` (``stop - start`` rows of the tensor's row shape, any dtype) with those rows of ``key``."""
        info = self.header[key]
        dtype, shape = DTYPES[info["dtype"]], info["shape"]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        buf = out if out.dtype == dtype and out.is_contiguous() else torch.empty(out.shape, dtype=dtype)
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        if len(view) != (stop - start) * row_bytes:
            raise ValueError(f"{key}: rows {start}:{stop} of {shape} do not fit a tensor of shape {tuple(out.shape)}")
        self.file.seek(self.data_start + info["data_offsets"][0] + start * row_bytes)
        done = 0
        while done < len(view):
            n = self.file.readinto(view[done:])
            if not n:
                raise OSError(f"{self.path} ends inside {key}")
            done += n
        if buf is not out:
            out.copy_(buf)

    def close(self) -> None:
        self.file.close()


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of dimension 0 that rank ``rank`` of ``world`` holds under FSDP2's ``Shard(0)``
    (``torch.chunk``: chunks of ``ceil(rows / world)``, the last ones shorter or empty)."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _local_rows(p: Tensor) -> tuple[Tensor, int, int]:
    """The local tensor of ``p`` and the rows of the full tensor it holds."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p, 0, p.shape[0] if p.ndim else 0
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"sharded loading reads Shard(0) over a 1-D mesh, not {p.placements} over {p.device_mesh}")
    local = p.to_local()
    start, stop = shard_rows(p.shape[0], p.device_mesh.get_local_rank(), p.device_mesh.size())
    if local.shape[0] != stop - start:
        raise RuntimeError(f"local shard of {tuple(p.shape)} has {local.shape[0]} rows, expected {stop - start}")
    return local, start, stop


@torch.no_grad()
def load_shards(module: nn.Module, sources: dict[str, tuple[str, str]], device: torch.device) -> dict[str, Any]:
    """Allocate ``module``'s (sharded) tensors on ``device`` and fill them: the tensors that were real before keep
    their values, the parameters in ``sources`` get their rows from the files. Returns what was read:
    ``{"tensors", "elements_read", "elements_full", "elements_whole"}`` (``elements_whole``: of the parameters left
    unsharded, e.g. ``replicate_frozen_root``'s, read whole on every rank)."""
    kept = {name: _local(t).detach().clone() for name, t in _named_tensors(module) if not t.is_meta}
    shared = _shared_parameters(module)
    module.to_empty(device=device)
    for places in shared:  # to_empty from meta makes one new parameter per module: tie them again
        first = places[0][0]._parameters[places[0][1]]
        for mod, pname in places[1:]:
            mod._parameters[pname] = first
    files: dict[str, SafetensorsRows] = {}
    read = full = whole = 0
    try:
        for name, t in _named_tensors(module):
            if name in kept:
                _local(t).copy_(kept[name])
            elif name in sources:
                file, key = sources[name]
                if file not in files:
                    files[file] = SafetensorsRows(file)
                local, start, stop = _local_rows(t)
                if local.ndim == 0:
                    files[file].read_rows(key, 0, 1, local.reshape(1))
                elif stop > start:
                    files[file].read_rows(key, start, stop, local)
                read += local.numel()
                full += t.numel()
                whole += local.numel() if local.numel() == t.numel() else 0
            else:
                raise RuntimeError(f"{name} has no values after sharding: neither loaded nor initialised")
    finally:
        for f in files.values():
            f.close()
    return {"tensors": len(sources), "elements_read": read, "elements_full": full, "elements_whole": whole}


def _shared_parameters(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """``(module, name)`` places of each parameter registered more than once (tied embeddings)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in module.modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((mod, pname))
    return [group for group in places.values() if len(group) > 1]


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
