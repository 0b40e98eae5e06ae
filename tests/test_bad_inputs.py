"""Bad inputs through the public API: each is refused (or warned about) with the split, the row and a fix.

Every case builds ``FineTuneDataModule(tokenizer, ...)`` and calls ``setup()``; refusals of arguments happen at
construction. The CLI's handling of the same mistakes is in ``test_cli.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import instruction_rows, sentiment_rows

from lightning_ft import FineTuneDataModule


def classification(train=None, **kw) -> dict:
    return dict(task="classification", train=sentiment_rows(6) if train is None else train, **kw)


def instruction(train=None, **kw) -> dict:
    return dict(task="instruction", train=instruction_rows(4) if train is None else train, **kw)


def with_row(rows: list[dict], index: int, **changes) -> list[dict]:
    """``rows`` with row ``index`` changed (a value of ``...`` deletes the column)."""
    rows = [dict(r) for r in rows]
    for key, value in changes.items():
        if value is ...:
            rows[index].pop(key)
        else:
            rows[index][key] = value
    return rows


def chat(*turns) -> dict:
    return {"messages": list(turns)}


USER = {"role": "user", "content": "is it good"}
ANSWER = {"role": "assistant", "content": "positive"}
GOOD_CHAT = [chat(USER, ANSWER)] * 3

# (id, data module keywords, exception, message pattern); files are written by FILES below
REFUSED = [
    # classification labels
    (
        "mixed-int-and-string-labels-inferred",
        classification(
            [
                {"text": "a great film", "label": 1},
                {"text": "dull", "label": "negative"},
                {"text": "great", "label": "positive"},
            ]
        ),
        ValueError,
        r"train row 1: label 'negative' is a string but row 0 has the int label 1\b.*every label as a name",
    ),
    (
        "mixed-labels-with-a-given-label-set",
        classification(with_row(sentiment_rows(6), 3, label=0), labels=["negative", "positive"]),
        ValueError,
        r"train row 3: label 0 is an int but row 0 has the string label 'positive'",
    ),
    (
        "mixed-labels-in-val",
        classification(val=with_row(sentiment_rows(4), 2, label=1)),
        ValueError,
        r"val row 2: label 1 is an int but row 0 has the string label",
    ),
    (
        "null-label",
        classification(with_row(sentiment_rows(6), 2, label=None)),
        ValueError,
        r"train row 2: label null must be an int \(a class index\) or a string.*drop the row",
    ),
    (
        "float-label",
        classification(with_row(sentiment_rows(6), 4, label=1.0), labels=["negative", "positive"]),
        ValueError,
        r"train row 4: label a float \(1\.0\) must be an int",
    ),
    (
        "empty-label",
        classification(with_row(sentiment_rows(6), 1, label="")),
        ValueError,
        r"train row 1: the label is empty \(a missing value\?\)",
    ),
    (
        "missing-label-column-inferred",
        classification(with_row(sentiment_rows(6), 2, label=...)),
        KeyError,
        r"train row 2: column\(s\) \['label'\] not found",
    ),
    (
        "int-label-outside-the-set",
        classification([{"text": "x", "label": i} for i in (0, 1, 5)], val=[{"text": "x", "label": 7}]),
        ValueError,
        r"val row 0: label 7 is outside 0\.\.5 .*give `labels` with every class",
    ),
    # classification text
    (
        "null-text",
        classification(with_row(sentiment_rows(6), 1, text=None)),
        ValueError,
        r"train row 1: `text` is null, not a string\. Fill it in",
    ),
    (
        "int-text",
        classification(with_row(sentiment_rows(6), 5, text=42)),
        ValueError,
        r"train row 5: `text` is an int \(42\), not a string",
    ),
    (
        "null-text-pair",
        classification(
            [{"text": "a", "pair": "b", "label": "x"}, {"text": "a", "pair": None, "label": "y"}],
            text_pair_column="pair",
        ),
        ValueError,
        r"train row 1: `pair` is null, not a string",
    ),
    (
        "null-text-in-predict",
        classification(predict=[{"text": "fine"}, {"text": None}]),
        ValueError,
        r"predict row 1: `text` is null",
    ),
    # instruction rows
    (
        "null-prompt",
        instruction(with_row(instruction_rows(4), 2, prompt=None)),
        ValueError,
        r"train row 2: `prompt` is null, not a string",
    ),
    (
        "null-response",
        instruction(with_row(instruction_rows(4), 3, response=None)),
        ValueError,
        r"train row 3: `response` is null, not a string",
    ),
    (
        "list-response",
        instruction(with_row(instruction_rows(4), 0, response=["positive"])),
        ValueError,
        r"train row 0: `response` is a list \(\['positive'\]\)",
    ),
    (
        "null-prompt-in-val",
        instruction(val=with_row(instruction_rows(4), 1, prompt=None)),
        ValueError,
        r"val row 1: `prompt` is null",
    ),
    (
        "null-prompt-in-predict",
        instruction(predict=[{"prompt": "hi"}, {"prompt": None}]),
        ValueError,
        r"predict row 1: `prompt` is null",
    ),
    # chat turns
    (
        "messages-is-a-string",
        instruction(GOOD_CHAT + [{"messages": "user: hi\nassistant: hello"}]),
        ValueError,
        r"train row 3: `messages` is a str \('user: hi\\nassistant: hello'\), not a list of turns",
    ),
    (
        "turn-without-content",
        instruction([chat(USER, ANSWER), chat(USER, {"role": "assistant"})]),
        ValueError,
        r"train row 1: turn 1 of `messages` has no 'content' .*every turn needs 'role' and 'content'",
    ),
    (
        "turn-without-role",
        instruction([chat({"content": "hi"}, ANSWER)]),
        ValueError,
        r"train row 0: turn 0 of `messages` has no 'role'",
    ),
    (
        "sharegpt-turns",
        instruction([chat({"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"})]),
        ValueError,
        r"train row 0: turn 0 of `messages` has no 'role' and no 'content'.*ShareGPT",
    ),
    (
        "turn-with-null-content",
        instruction(GOOD_CHAT + [chat(USER, {"role": "assistant", "content": None})]),
        ValueError,
        r"train row 3: turn 1 of `messages`: 'content' is null, not a string",
    ),
    (
        "turn-is-a-string",
        instruction([chat("hi", ANSWER)]),
        ValueError,
        r"train row 0: turn 0 of `messages` is a str \('hi'\), not a dict",
    ),
    (
        "null-messages-and-no-prompt",
        instruction(GOOD_CHAT + [{"messages": None}]),
        ValueError,
        r"train row 3: `messages` is null, not a list of turns",
    ),
    ("empty-messages", instruction(GOOD_CHAT + [chat()]), ValueError, r"train row 3: `messages` is empty"),
    (
        "chat-without-an-answer",
        instruction(GOOD_CHAT + [chat(USER)]),
        ValueError,
        r"train row 3: the last turn of `messages` must be the assistant's answer .*got role 'user'\. End the "
        r"conversation",
    ),
    # plain text
    (
        "null-document",
        dict(task="text", train=[{"text": "a great film"}, {"text": None}]),
        ValueError,
        r"train row 1: `text` is null, not a string",
    ),
    # rows that are not objects
    (
        "row-is-a-string",
        classification(sentiment_rows(2) + ["a dull film"]),
        ValueError,
        r"train row 2 is 'a dull film', not an object with named columns",
    ),
]

# refused when the data module is built: (id, keywords, message pattern)
REFUSED_AT_CONSTRUCTION = [
    ("batch-size-0", classification(batch_size=0), r"batch_size must be a whole number of at least 1, got 0"),
    ("negative-batch-size", classification(batch_size=-2), r"batch_size must be .* at least 1, got -2"),
    ("eval-batch-size-0", classification(eval_batch_size=0), r"eval_batch_size must be .* at least 1, got 0"),
    (
        "duplicate-labels",
        classification(labels=["negative", "positive", "negative"]),
        r"`labels` \['negative', 'positive', 'negative'\] name \['negative'\] more than once.*Remove the duplicates",
    ),
    ("labels-as-one-string", classification(labels="negative,positive"), r"`labels` must be a list of class names"),
    ("max-train-examples-0", classification(max_train_examples=0), r"max_train_examples must be at least 1"),
]

FILES = [
    (
        "jsonl-line-is-a-list",
        "train.jsonl",
        '{"text": "great", "label": "positive"}\n["dull", "negative"]\n',
        r"train: .*train\.jsonl line 2 is \['dull', 'negative'\], not an object",
    ),
    (
        "jsonl-line-is-null",
        "train.jsonl",
        '{"text": "great", "label": "positive"}\n\nnull\n',
        r"train: .*train\.jsonl line 3 is null, not an object",
    ),
    (
        "json-item-is-a-string",
        "train.json",
        '[{"text": "great", "label": "positive"}, "dull"]',
        r"train: .*train\.json item 1 is 'dull', not an object",
    ),
    (
        "csv-unquoted-comma",
        "train.csv",
        "text,label\ngreat,positive\ndull, boring,negative\n",
        r"train: .*train\.csv line 3 has more fields than the header \['text', 'label'\]; quote fields",
    ),
    (
        "csv-missing-label-value",
        "train.csv",
        "text,label\ngreat,positive\ndull\n",
        r"train row 1: label null must be an int",
    ),
]


def set_up(tokenizer, **kw) -> FineTuneDataModule:
    dm = FineTuneDataModule(tokenizer, max_length=64, batch_size=2, **kw)
    dm.setup("fit")
    return dm


@pytest.mark.filterwarnings("ignore:train split")
@pytest.mark.parametrize("kw, error, pattern", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_rows_are_refused(tokenizer, kw, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        set_up(tokenizer, **kw)


@pytest.mark.parametrize(
    "kw, pattern", [c[1:] for c in REFUSED_AT_CONSTRUCTION], ids=[c[0] for c in REFUSED_AT_CONSTRUCTION]
)
def test_bad_arguments_are_refused_at_construction(tokenizer, kw, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        FineTuneDataModule(tokenizer, **kw)


@pytest.mark.parametrize("name, content, pattern", [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_bad_files_are_refused(tokenizer, tmp_path: Path, name, content, pattern) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=pattern):
        set_up(tokenizer, **classification(str(tmp_path / name)))


def test_a_class_absent_from_train_is_warned_about(tokenizer) -> None:
    rows = [r for r in sentiment_rows(6) if r["label"] == "positive"] + [{"text": "so so", "label": "neutral"}]
    with pytest.warns(UserWarning, match=r"train split: no row has the label\(s\) \['negative'\] .*Add train rows"):
        dm = set_up(tokenizer, **classification(rows, labels=["negative", "neutral", "positive"]))
    assert dm.labels == ["negative", "neutral", "positive"]  # a warning, not a refusal
    # int labels are class indices: an inferred 0..max has a hole where no row has the index
    with pytest.warns(UserWarning, match=r"no row has the label\(s\) \['1'\]"):
        set_up(tokenizer, **classification([{"text": "a", "label": 0}, {"text": "b", "label": 2}]))


def test_a_single_class_train_split_is_warned_about(tokenizer) -> None:
    rows = [r for r in sentiment_rows(6) if r["label"] == "positive"]
    with pytest.warns(UserWarning, match=r"train split: every row has the label 'positive'"):
        set_up(tokenizer, **classification(rows))


def test_inferred_labels_reach_the_data_hparams_and_valid_rows_pass(tokenizer, tmp_path: Path) -> None:
    """Lightning refuses module and data hparams that share a key with two values: the inferred set replaces None.
    And the checks refuse only what they should: numeric strings (CSV) in one split next to ints (JSONL) in another,
    empty texts, chat rows with a system turn."""
    dm = set_up(tokenizer, **classification())
    assert dm.hparams_initial["labels"] == dm.labels == ["negative", "positive"]

    (tmp_path / "val.csv").write_text("text,label\ngreat,1\ndull,0\n")
    dm = set_up(
        tokenizer,
        **classification([{"text": "", "label": 0}, {"text": "b", "label": 1}], val=str(tmp_path / "val.csv")),
    )
    assert dm.labels == ["0", "1"] and [e["label"] for e in dm.splits["val"].examples] == [1, 0]
    system = {"role": "system", "content": "be brief"}
    # a null messages column is an absent one: datasets / Parquet fill the columns a row lacks with None
    prompt_rows = [{**r, "messages": None} for r in instruction_rows(2)]
    dm = set_up(
        tokenizer, **instruction([{**chat(system, USER, ANSWER), "prompt": None, "response": None}, *prompt_rows])
    )
    assert len(dm.splits["train"].examples) == 3
