"""Check that a file the library is about to read is whole, and say which file is damaged and what to do.

A checkpoint or weights file cut short by a killed run, a full disk or an interrupted copy otherwise fails deep
inside ``torch.load`` or ``safetensors`` with a message that names neither the file nor a remedy (``EOFError``,
``PytorchStreamReader failed reading zip archive``, ``incomplete metadata``). The checks here read only the
index of each file (its header, its zip directory), so they cost milliseconds before a load that costs seconds.

Pure Python plus torch; no Lightning, no transformers.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["CorruptFileError", "check_checkpoint", "check_safetensors", "read_json_file"]

CHECKPOINT_FIX = (
    "The run that wrote it was probably stopped while writing (killed, out of disk space), or the copy is "
    "incomplete. Resume from another checkpoint (e.g. an earlier one in the same folder), or start again without "
    "ckpt_path."
)
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit the safetensors library enforces


class CorruptFileError(ValueError):
    """A file the library reads is empty, cut short, or not in the format it should be in."""


def _fail(path: str | os.PathLike, problem: str, fix: str) -> CorruptFileError:
    return CorruptFileError(f"{os.fspath(path)} {problem}. {fix}".rstrip())


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


# ---- Lightning / torch checkpoints -----------------------------------------------------------------------------
def check_checkpoint(path: str | os.PathLike, fix: str = CHECKPOINT_FIX) -> None:
    """Raise unless ``path`` is a whole ``torch.save`` file or a whole sharded (``torch.distributed.checkpoint``)
    checkpoint folder.

    ``FileNotFoundError`` when it does not exist; :class:`CorruptFileError`, with the path and ``fix``, when it is
    empty, cut short or not a PyTorch checkpoint. Remote paths (``s3://...``) are not checked.
    """
    if _is_remote(path):
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {os.fspath(path)}")
    if p.is_dir():
        _check_sharded(p, fix)
        return
    size = p.stat().st_size
    if size == 0:
        raise _fail(path, "is empty (0 bytes), not a checkpoint", fix)
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # torch.save's zip format (the default since torch 1.6)
        if not zipfile.is_zipfile(p):
            raise _fail(path, f"is cut short or damaged ({size:,} bytes, its zip index is missing)", fix)
        try:
            with zipfile.ZipFile(p) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            raise _fail(path, f"is damaged ({err})", fix) from err
        if not any(i.filename.endswith("data.pkl") for i in infos):
            raise _fail(path, "is a zip file but not a PyTorch checkpoint (no data.pkl inside)", fix)
        return
    if head[:1] != b"\x80":  # the legacy torch.save format is a pickle stream: protocol byte 0x80
        raise _fail(path, f"is not a PyTorch checkpoint (it starts with {head!r})", fix)


def _check_sharded(path: Path, fix: str) -> None:
    """A ``torch.distributed.checkpoint`` folder (FSDP2 / ModelParallelStrategy): ``.metadata``, ``*.distcp`` files
    that cover every byte range it lists, and Lightning's ``meta.pt``."""
    index = path / ".metadata"
    if not index.is_file():
        raise _fail(path, "is a folder but not a sharded checkpoint (no .metadata file in it)", fix)
    if (path / "meta.pt").exists():
        check_checkpoint(path / "meta.pt", fix)
    if index.stat().st_size == 0:
        raise _fail(index, "is empty (0 bytes)", fix)
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # a cut-short pickle: EOFError, UnpicklingError, ...
        raise _fail(index, f"cannot be read ({type(err).__name__}: {err})", fix) from err
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if name is not None:
            needed[name] = max(needed.get(name, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise _fail(shard, "is missing from the sharded checkpoint", fix)
        if (size := shard.stat().st_size) < end:
            raise _fail(shard, f"is cut short: {size:,} bytes of the {end:,} that .metadata lists", fix)


# ---- safetensors -----------------------------------------------------------------------------------------------
def check_safetensors(path: str | os.PathLike, fix: str = "Write or copy it again.") -> None:
    """Raise :class:`CorruptFileError`, naming ``path`` and ``fix``, unless it is a whole ``.safetensors`` file.

    Reads the header only: its length, its JSON, and whether the file holds every byte the header lists.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{os.fspath(path)} not found. {fix}".rstrip())
    size = p.stat().st_size
    if size < 8:
        raise _fail(path, f"is {'empty' if size == 0 else 'cut short'} ({size} bytes), not a safetensors file", fix)
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _SAFETENSORS_MAX_HEADER or 8 + n > size:
            raise _fail(path, f"is cut short or not a safetensors file ({size:,} bytes; header of {n:,} bytes)", fix)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError) as err:
        raise _fail(path, f"has a damaged header ({err})", fix) from err
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise _fail(path, f"is cut short: {size:,} bytes of the {expected:,} its header lists", fix)
    if size > expected:
        raise _fail(path, f"is damaged: {size:,} bytes but its header lists {expected:,}", fix)


# ---- JSON config files -----------------------------------------------------------------------------------------
def read_json_file(path: str | os.PathLike, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``FileNotFoundError`` / :class:`CorruptFileError` naming ``path``, ``what`` it
    should be, and ``fix`` when it is missing, not valid JSON, or not an object."""
    p = Path(path)
    label = f"{os.fspath(path)} (the {what})"
    if not p.is_file():
        raise FileNotFoundError(f"{label} is missing. {fix}")
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise _fail(label, "is not a text file; it should hold JSON", fix) from err
    except json.JSONDecodeError as err:
        raise _fail(label, f"is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})", fix) from err
    if not isinstance(value, dict):
        raise _fail(label, f"holds a JSON {type(value).__name__}, not an object", fix)
    return value
