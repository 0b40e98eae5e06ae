"""Read rows from files, in-memory lists or Hugging Face ``datasets`` objects, and split them by seeded fractions."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]
Source = str | Path | Sequence[dict] | Any  # a path, a list of dicts, or a datasets.Dataset

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def load_rows(source: Source, name: str = "data") -> Rows:
    """Return the rows of ``source`` as a list of dicts.

    ``source`` is a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a list of dicts, or a Hugging Face
    ``datasets.Dataset``. ``name`` (e.g. ``"train"``) is only used in error messages.
    """
    if isinstance(source, (str, Path)):
        rows = _read_file(Path(source), name)
    elif _is_hf_dataset(source):
        rows = [dict(r) for r in source]
    elif isinstance(source, Sequence):
        rows = [_as_row(r, f"{name} row {i}") for i, r in enumerate(source)]
    else:
        raise TypeError(
            f"{name}: expected a file path, a list of dicts or a datasets.Dataset, got {type(source).__name__}"
        )
    if not rows:
        raise ValueError(f"{name}: the dataset {_describe(source)} is empty; give a source with at least one row")
    return rows


def split_rows(rows: Rows, fractions: Sequence[float], seed: int) -> list[Rows]:
    """Shuffle ``rows`` with ``seed`` and cut them into ``len(fractions) + 1`` parts.

    ``fractions`` are the sizes of the trailing parts (e.g. ``(0.1, 0.1)`` gives train 80 %, val 10 %, test 10 %);
    the first part gets the rest. Sizes are ``round(fraction * n)``; the order is the same on every machine.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum to less than 1, got {list(fractions)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    sizes = [round(f * len(rows)) for f in fractions]
    parts, end = [], len(rows)
    for size in reversed(sizes):
        parts.append([rows[i] for i in order[end - size : end]])
        end -= size
    parts.append([rows[i] for i in order[:end]])
    return parts[::-1]


def _read_file(path: Path, name: str) -> Rows:
    if not path.exists():
        where = "" if path.is_absolute() else f" in {Path.cwd()}"
        raise FileNotFoundError(
            f"{name}: file {path} does not exist{where}; check the path, or run the step that writes the file first"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            rows = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{name}: {path} line {lineno} is not valid JSON: {e}") from e
                    rows.append(_as_row(row, f"{name}: {path} line {lineno}"))
            return rows
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            return []  # load_rows reports the empty dataset
        data = json.loads(text)
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list):
            raise ValueError(f"{name}: {path} must hold a JSON list of objects")
        return [_as_row(row, f"{name}: {path} item {i}") for i, row in enumerate(data)]
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = []
            for row in reader:
                if None in row:  # DictReader files surplus fields under the key None
                    raise ValueError(
                        f"{name}: {path} line {reader.line_num} has more fields than the header {reader.fieldnames}; "
                        'quote fields that contain the delimiter (e.g. "great, really")'
                    )
                rows.append(row)
            return rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{name}: reading {path} needs pyarrow: pip install 'lightning-ft[parquet]'") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{name}: unsupported file type {suffix!r} for {path}; use one of {', '.join(SUFFIXES)}")


def _as_row(row: Any, where: str) -> dict[str, Any]:
    """``row`` as a dict of columns; a clear error for anything else (a string, a list, a null)."""
    if not isinstance(row, Mapping):
        raise ValueError(
            f"{where} is {'null' if row is None else repr(row)[:40]}, not an object with named columns "
            'such as {"text": "...", "label": "positive"}. Fix or drop it.'
        )
    return dict(row)


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names")


def _describe(source: Source) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"({type(source).__name__})"
