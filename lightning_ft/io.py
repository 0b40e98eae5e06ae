"""Safe outputs: atomic writes, and the checks every writer of the library runs before it writes.

Atomic writes (``atomic_path``): write to a hidden temporary sibling ``.<name>.<8 random chars>.tmp/``, then rename
it over the final name. A crash or a full disk never leaves a half-written file under the final name; a temporary
folder left by a killed run is removed at the next write to the same destination (only folders matching that exact
pattern and holding nothing but the library's own entries).

Output checks (``check_output``), the same for every writer (merged model, peft adapter, sparse delta, compressed
model, predictions, reports), run by the callbacks at set-up (before training) and again by the writer itself:

- ``~`` is expanded; the path must not be empty, a symbolic link, the current folder or one of its parents, the home
  folder or the file-system root; the nearest existing parent must be a folder this user may write in;
- a folder output must not be a file (a file output not a folder);
- outputs must not contain each other (``adapter_dir`` inside ``merged_dir``, or the same folder), and must not equal
  or contain the run's own folders (the Trainer's ``default_root_dir``, the log folder, the checkpoint folders);
- an existing, non-empty destination is replaced only when it holds exactly what lightning-ft itself wrote there
  before, as the same kind of output (re-running into its own previous output), or when the caller passes
  ``overwrite=True``: then the destination is replaced whole, and only once the new output is completely written.

lightning-ft's own output is recognised by a marker file (``MARKER``, written into model folders by
``mark_output``, listing every file written) or, for formats whose folders hold a fixed set of files (peft adapter,
sparse delta), by that set and a signature inside the files (see each writer's ``is_own_*``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = ".lightning_ft_output.json"
WRITER = "lightning-ft"
MODEL_KIND = "model"  # the marker kind of model folders (merged model, compressed model)
SIGNATURE = "lightning_ft"  # key of the safetensors metadata that marks a fixed-layout folder lightning-ft wrote
#: kind -> (config file, weights file) of the fixed-layout folders (their writers: lora.peft_format, sparse.export)
SIGNED_FOLDERS = {
    "peft_adapter": ("adapter_config.json", "adapter_model.safetensors"),
    "sparse_delta": ("sparse_config.json", "sparse_delta.safetensors"),
}
_TMP_RANDOM = r"[a-z0-9_]{8}"  # tempfile.mkdtemp's random part


class OutputPathError(ValueError):
    """An output path lightning-ft refuses before writing anything (the message names the path and what to do)."""


# ---- user paths ----------------------------------------------------------------------------------------------------
def user_path(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded (relative paths stay relative)."""
    return Path(os.path.expanduser(os.fspath(path)))


def _shown(given: str, path: Path) -> str:
    """The path as the user wrote it (and what it means, when ``~`` was expanded)."""
    return repr(given) if given == str(path) else f"{given!r} ({path})"


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(user_path(path)))


def _inside(inner: Path, outer: Path) -> bool:
    """True when ``inner`` lies strictly inside ``outer`` (both real paths)."""
    return outer in inner.parents


def _is_local(path: Any) -> bool:
    return path is not None and "://" not in os.fspath(path)


# ---- recognising the library's own output ------------------------------------------------------------------------
def _files(folder: Path) -> set[str]:
    """Every file and empty folder under ``folder``, relative, with ``/`` separators."""
    out = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out.update((rel / f).as_posix() for f in files)
        if not dirs and not files and rel != Path("."):
            out.add(rel.as_posix() + "/")
    return out


def mark_output(folder: str | os.PathLike, kind: str) -> None:
    """Write the marker into ``folder`` (call last, in the temporary folder): the kind and every file written."""
    folder = Path(folder)
    files = sorted(_files(folder) - {MARKER})
    (folder / MARKER).write_text(json.dumps({"writer": WRITER, "kind": kind, "files": files}, indent=1) + "\n")


def marked_kind(folder: str | os.PathLike) -> str | None:
    """The kind recorded by ``folder``'s marker when the folder holds nothing but the files the marker lists."""
    folder = Path(folder)
    try:
        info = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("writer") != WRITER or not isinstance(info.get("files"), list):
        return None
    if _files(folder) - {MARKER} - set(info["files"]):
        return None  # something was added after lightning-ft wrote the folder
    return info.get("kind")


def only_files(folder: str | os.PathLike, names: Iterable[str]) -> bool:
    """True when ``folder`` holds nothing but (some of) the plain files ``names``."""
    folder = Path(folder)
    return all(e.name in set(names) and e.is_file(follow_symlinks=False) for e in os.scandir(folder))


def signed_kind(folder: str | os.PathLike) -> str | None:
    """The kind of a fixed-layout folder lightning-ft wrote (``SIGNED_FOLDERS``), recognised by its weights file's
    ``SIGNATURE`` metadata, when it holds nothing else; else None."""
    folder = Path(folder)
    for kind, (config, weights) in SIGNED_FOLDERS.items():
        if safetensors_metadata(folder / weights).get(SIGNATURE) == kind:
            return kind if only_files(folder, (config, weights)) else None
    return None


def is_own_adapter_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds an adapter lightning-ft wrote (peft adapter or sparse delta) and nothing else.

    Either kind may replace the other: ``MergeAdapters`` writes one or the other to ``adapter_dir`` by method."""
    return signed_kind(folder) in SIGNED_FOLDERS


def is_own_model_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a model folder lightning-ft wrote (``MergeAdapters``' merged model,
    ``save_compressed``) and nothing was added to it since."""
    return marked_kind(folder) == MODEL_KIND


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header ({} when unreadable), without reading the tensors."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


# ---- the checks ----------------------------------------------------------------------------------------------------
def check_output(
    path: str | os.PathLike,
    what: str,
    *,
    is_own: Callable[[Path], bool],
    folder: bool = True,
    overwrite: bool = False,
    others: Iterable[tuple[str, str | os.PathLike | None]] = (),
    protected: Iterable[tuple[str, str | os.PathLike | None]] = (),
) -> Path:
    """Check that ``path`` may be written as ``what`` (e.g. ``"merged_dir"``); return it with ``~`` expanded.

    ``is_own(path)``: whether an existing, non-empty ``path`` is the library's own earlier output of this kind
    (replaced without ``overwrite``). ``others``: ``(name, path)`` of the other outputs of the same run (none may
    contain another or be the same). ``protected``: ``(name, folder)`` that the output must not equal or contain
    (the run's log and checkpoint folders). Raises ``OutputPathError`` (a ``ValueError``) naming the path.
    """
    given = os.fspath(path)
    if not given.strip():
        raise OutputPathError(f"{what} is empty: give the path of a new folder or file for it")
    p = user_path(given)
    shown, real = _shown(given, p), _real(p)
    new_name = what.removesuffix("_dir") if what.endswith("_dir") else "output"
    example = os.path.join(given, new_name) if folder else os.path.join(given, Path(p).name or "output")
    hint = f"give {what} a {'folder' if folder else 'file'} of its own (e.g. {example!r})"

    cwd, home = Path(os.path.realpath(os.getcwd())), _real("~")
    if real == cwd or _inside(cwd, real):
        where = "is the current folder" if real == cwd else "contains the current folder"
        raise OutputPathError(f"{what} {shown} {where}: it would be replaced whole; {hint}")
    if real == home or real.parent == real:
        raise OutputPathError(f"{what} {shown} is {'your home folder' if real == home else 'the root'}; {hint}")
    if p.is_symlink():
        raise OutputPathError(
            f"{what} {shown} is a symbolic link: lightning-ft replaces an output whole and would replace the link, "
            "not what it points to; give the real path"
        )
    if folder and p.exists() and not p.is_dir():
        raise OutputPathError(
            f"{what} {shown} is a file, not a folder: give the path of a folder ({what} is written as a folder of "
            "files)"
        )
    if not folder and p.is_dir():
        example = os.path.join(given, "output")
        raise OutputPathError(f"{what} {shown} is a folder: give the path of a file (e.g. {example!r})")
    parent = Path(os.path.abspath(p)).parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot create {what} {shown}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"cannot write {what} {shown}: {parent} is not writable for this user (read-only folder or file "
            "system); choose a writable location or fix the permissions"
        )

    for name, other in others:
        if other is None:
            continue
        o = _real(other)
        if o == real:
            raise OutputPathError(
                f"{what} {shown} and {name} {os.fspath(other)!r} are the same path: each output needs its own"
            )
        if _inside(o, real) or _inside(real, o):
            inner, outer = ((name, other), (what, given)) if _inside(o, real) else ((what, given), (name, other))
            raise OutputPathError(
                f"{inner[0]} {os.fspath(inner[1])!r} is inside {outer[0]} {os.fspath(outer[1])!r}: writing "
                f"{outer[0]} would replace it; give them separate folders (e.g. 'out/merged' and 'out/adapter')"
            )
    for name, folder_path in protected:
        if not _is_local(folder_path):
            continue
        f = _real(folder_path)
        if f == real or _inside(f, real):
            where = "is" if f == real else "contains"
            raise OutputPathError(
                f"{what} {shown} {where} the {name} ({folder_path}): writing {what} would replace the run's own "
                f"files; {hint}"
            )

    if overwrite or not p.exists():
        return p
    if folder:
        entries = sorted(e.name for e in os.scandir(p))
        empty = not entries
    else:
        entries, empty = [p.name], p.stat().st_size == 0
    if not empty and not is_own(p):
        listed = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        holds = (
            f"holds files lightning-ft did not write ({listed})" if folder else "exists; lightning-ft did not write it"
        )
        instead = "a new or empty folder, or pass overwrite=True to replace it (everything in it is deleted)"
        raise OutputPathError(
            f"{what} {shown} {holds}; writing {what} would replace it whole. Give "
            + (instead if folder else "a new file path, or pass overwrite=True to replace the file")
        )
    return p


def trainer_folders(trainer: Any) -> list[tuple[str, str]]:
    """``(name, folder)`` of a Lightning Trainer's own folders: ``default_root_dir``, the loggers' folders and the
    checkpoint folders (as ``ModelCheckpoint`` will resolve them). Call on every rank (``trainer.log_dir``
    broadcasts)."""
    out = [("Trainer's default_root_dir", trainer.default_root_dir)]
    loggers = list(getattr(trainer, "loggers", []) or [])
    if loggers:
        out.append(("log folder", trainer.log_dir))
    for logger in loggers:
        folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        out.append((f"{type(logger).__name__}'s folder", folder))
    for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
        dirpath = getattr(cb, "dirpath", None)
        if dirpath is None and loggers:  # ModelCheckpoint's default, resolved in its own setup (after ours)
            first = loggers[0]
            version = first.version if isinstance(first.version, str) else f"version_{first.version}"
            dirpath = os.path.join(first.save_dir or trainer.default_root_dir, str(first.name), version, "checkpoints")
        elif dirpath is None:
            dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        out.append(("checkpoint folder", dirpath))
    return [(n, os.fspath(f)) for n, f in out if f is not None]


# ---- atomic writes -------------------------------------------------------------------------------------------------
def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders ``.<name>.XXXXXXXX.tmp`` next to ``path`` that a killed write left behind
    (only folders holding nothing but the library's own entries). A previous output parked there by a write killed
    between its two renames is moved back to ``path`` first. Returns the removed folders."""
    path = user_path(path)
    parent = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_TMP_RANDOM}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if set(os.listdir(entry.path)) <= {path.name, f"{path.name}.old"}:
                old = Path(entry.path) / f"{path.name}.old"
                if old.exists() and not os.path.lexists(path):  # killed between the two renames: put it back
                    os.replace(old, path)
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    Works for files and for directories (the caller creates whichever it needs at the yielded path). An existing
    folder at ``path`` is replaced whole (check it first with ``check_output``). On an exception the temporary file
    or folder is removed, ``path`` is left untouched, and an ``OSError`` names ``path``, not the temporary path.
    Temporary folders of earlier killed writes to ``path`` are removed first.
    """
    path = user_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        message = f"cannot create the folder {path.parent} to write {path}: {err.strerror or err}"
        raise OSError(err.errno, message) from err
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = tmp / f"{path.name}.old"
            os.replace(path, old)
            try:
                os.replace(target, path)
            except BaseException:
                os.replace(old, path)
                raise
        else:
            os.replace(target, path)
    except OSError as err:  # name the user's path, never the temporary one
        text = str(err.strerror or err).replace(str(target), str(path)).replace(str(tmp), str(path.parent))
        if err.strerror and err.filename and str(tmp) not in str(err.filename):
            text += f": {err.filename}"
        message = f"could not write {path}: {text}"
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err
    except Exception as err:
        err.add_note(f"(while writing {path}; nothing was written there)")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_with_atomic(path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Call ``save(tmp_path)`` and rename the result to ``path`` (e.g. ``fig.savefig``)."""
    with atomic_path(path) as tmp:
        save(tmp)
