"""Data formats: instruction / chat masking and rendering, classification labels, plain-text blocks. No network."""

from __future__ import annotations

import re

import pytest
from helpers import instruction_rows, sentiment_rows

from lightning_ft.data.classification import ClassificationFormat, infer_labels
from lightning_ft.data.instruction import InstructionFormat, render_plain
from lightning_ft.data.text import TextFormat

IGNORE = -100
EOS = "<|im_end|>"
PROMPT = "is the sentiment of this review positive or negative: the movie was great"


# --- helpers ---------------------------------------------------------------------------------------------------


def template_ids(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``apply_chat_template(tokenize=True)``, whatever container this transformers version returns."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"]) if not isinstance(out, list) else out


def text_ids(tok, text: str, add_special_tokens: bool = False) -> list[int]:
    return tok(text, add_special_tokens=add_special_tokens)["input_ids"]


def encode_one(fmt, row: dict, tok, max_length: int = 512) -> dict:
    return fmt.encode([row], tok, max_length, "train").examples[0]


def labelled_spans(tok, ex: dict) -> list[str]:
    """Decoded text of each maximal run of trained (non -100) labels."""
    spans, current = [], []
    for tid, lab in zip(ex["input_ids"], ex["labels"]):
        if lab == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            assert lab == tid, "a trained label must be the input token at the same position"
            current.append(tid)
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def prompt_row(prompt: str = PROMPT, response: str = "positive") -> dict:
    return {"prompt": prompt, "response": response}


def messages_row(*msgs: dict) -> dict:
    return {"messages": list(msgs)}


# --- instruction: masking --------------------------------------------------------------------------------------


def test_tokenizer_fixture_pads_with_eos(tokenizer) -> None:
    # the masking tests below only mean something because pad == eos, as for SmolLM2
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(EOS)


@pytest.mark.parametrize("kind", ["prompt_response", "messages"])
def test_masking_is_exactly_the_prompt(tokenizer, kind: str) -> None:
    if kind == "prompt_response":
        row, prompt_msgs = prompt_row(), [user(PROMPT)]
    else:
        prompt_msgs = [system("answer with one word"), user(PROMPT)]
        row = messages_row(*prompt_msgs, assistant("positive"))
    ex = encode_one(InstructionFormat(), row, tokenizer)

    prompt = template_ids(tokenizer, prompt_msgs, add_generation_prompt=True)
    full = template_ids(tokenizer, prompt_msgs + [assistant("positive")], add_generation_prompt=False)
    n = len(prompt)
    assert ex["input_ids"] == full
    assert ex["input_ids"][:n] == prompt
    assert ex["labels"][:n] == [IGNORE] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]  # every token after the prompt is trained, EOS included

    answer = text_ids(tokenizer, "positive")
    eos_id = tokenizer.eos_token_id
    assert ex["labels"][n : n + len(answer)] == answer
    assert ex["labels"][n + len(answer)] == eos_id  # the end of turn that closes the answer, though pad == eos
    assert set(ex) >= {"input_ids", "labels"} and "prompt_length" not in ex


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_rendering_equals_apply_chat_template(tokenizer, add_generation_prompt: bool) -> None:
    msgs = [system("be brief"), user("hello world"), assistant("great"), user("is it good")]
    ids = InstructionFormat().tokenize(tokenizer, msgs, add_generation_prompt=add_generation_prompt)
    assert ids == template_ids(tokenizer, msgs, add_generation_prompt)
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tokenizer.decode(ids) == rendered


def test_render_plain_is_the_documented_template() -> None:
    msgs = [system("be brief"), user("q1"), assistant("a1"), user("q2")]
    expected = "be brief\n\n### Instruction:\nq1\n\n### Response:\na1</s>\n\n### Instruction:\nq2\n\n### Response:\n"
    assert render_plain(msgs, "</s>", add_generation_prompt=True) == expected
    assert render_plain(msgs[:3], "</s>", add_generation_prompt=False) == expected.split("### Instruction:\nq2")[0]


def test_plain_template_without_chat_template(plain_tokenizer) -> None:
    tok = plain_tokenizer
    assert not tok.chat_template
    ex = encode_one(InstructionFormat(), prompt_row(), tok)
    prompt_text = f"### Instruction:\n{PROMPT}\n\n### Response:\n"
    full_text = f"{prompt_text}positive{EOS}\n\n"
    assert ex["input_ids"] == text_ids(tok, full_text, add_special_tokens=True)
    n = len(text_ids(tok, prompt_text, add_special_tokens=True))
    assert ex["labels"][:n] == [IGNORE] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert tok.eos_token_id in ex["labels"][n:]
    assert labelled_spans(tok, ex) == [f"positive{EOS}\n\n"]


def test_plain_template_with_system_prompt(plain_tokenizer) -> None:
    ex = encode_one(InstructionFormat(system_prompt="be brief"), prompt_row(), plain_tokenizer)
    expected = f"be brief\n\n### Instruction:\n{PROMPT}\n\n### Response:\npositive{EOS}\n\n"
    assert ex["input_ids"] == text_ids(plain_tokenizer, expected, add_special_tokens=True)
    assert labelled_spans(plain_tokenizer, ex) == [f"positive{EOS}\n\n"]


@pytest.mark.parametrize("chat", [True, False])
def test_multi_turn_trains_every_assistant_turn(tokenizer, plain_tokenizer, chat: bool) -> None:
    tok = tokenizer if chat else plain_tokenizer
    msgs = [system("be brief"), user("is the movie great"), assistant("great"), user("and the plot"), assistant("dull")]
    ex = encode_one(InstructionFormat(), messages_row(*msgs), tok)
    end = f"{EOS}\n" if chat else f"{EOS}\n\n"
    assert labelled_spans(tok, ex) == [f"great{end}", f"dull{end}"]
    if chat:
        assert ex["input_ids"] == template_ids(tok, msgs, add_generation_prompt=False)
    # the masked tokens hold every system and user turn
    masked = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE])
    for m in msgs[:2] + msgs[3:4]:
        assert m["content"] in masked


def test_last_message_must_be_the_assistant(tokenizer) -> None:
    with pytest.raises(ValueError, match="assistant"):
        encode_one(InstructionFormat(), messages_row(user("hi"), assistant("hello"), user("bye")), tokenizer)


def test_system_prompt_inserted(tokenizer) -> None:
    fmt = InstructionFormat(system_prompt="answer with one word")
    ex = encode_one(fmt, prompt_row(), tokenizer)
    msgs = [system("answer with one word"), user(PROMPT), assistant("positive")]
    assert ex["input_ids"] == template_ids(tokenizer, msgs, add_generation_prompt=False)
    assert labelled_spans(tokenizer, ex) == [f"positive{EOS}\n"]
    n = len(template_ids(tokenizer, msgs[:2], add_generation_prompt=True))
    assert ex["labels"][:n] == [IGNORE] * n  # the system prompt is masked too


def test_system_prompt_not_added_over_an_existing_system_message(tokenizer) -> None:
    fmt = InstructionFormat(system_prompt="the default")
    msgs = [system("the row's own"), user("hi"), assistant("hello")]
    ex = encode_one(fmt, messages_row(*msgs), tokenizer)
    assert ex["input_ids"] == template_ids(tokenizer, msgs, add_generation_prompt=False)
    assert "the default" not in tokenizer.decode(ex["input_ids"])


# --- instruction: truncation and errors ------------------------------------------------------------------------


def test_truncation_counted(tokenizer) -> None:
    fmt = InstructionFormat()
    short, long_ = prompt_row("hi", "great"), prompt_row("hi", " ".join(["wonderful acting"] * 20))
    full_long = encode_one(fmt, long_, tokenizer)
    full_short = encode_one(fmt, short, tokenizer)
    max_length = len(full_short["input_ids"]) + 5
    assert len(full_long["input_ids"]) > max_length

    split = fmt.encode([short, long_, short, long_, long_], tokenizer, max_length, "train")
    assert split.num_truncated == 3
    lengths = [len(e["input_ids"]) for e in split.examples]
    assert lengths == [len(full_short["input_ids"]), max_length, len(full_short["input_ids"]), max_length, max_length]
    assert split.examples[0] == full_short
    assert split.examples[1]["input_ids"] == full_long["input_ids"][:max_length]
    assert split.examples[1]["labels"] == full_long["labels"][:max_length]
    assert all(len(e["labels"]) == len(e["input_ids"]) for e in split.examples)


def test_example_exactly_max_length_is_not_truncated(tokenizer) -> None:
    fmt = InstructionFormat()
    n = len(encode_one(fmt, prompt_row(), tokenizer)["input_ids"])
    split = fmt.encode([prompt_row()], tokenizer, n, "train")
    assert split.num_truncated == 0 and len(split.examples[0]["input_ids"]) == n


def test_prompt_longer_than_max_length_raises(tokenizer) -> None:
    fmt = InstructionFormat()
    prompt_len = len(template_ids(tokenizer, [user(PROMPT)], add_generation_prompt=True))
    # one answer token still fits: fine, truncated
    split = fmt.encode([prompt_row()], tokenizer, prompt_len + 1, "train")
    assert split.num_truncated == 1 and split.examples[0]["labels"][-1] != IGNORE
    for max_length in (prompt_len, prompt_len - 3):
        with pytest.raises(ValueError, match=f"max_length={max_length}"):
            fmt.encode([prompt_row()], tokenizer, max_length, "train")


def test_missing_column_names_it_and_lists_existing(tokenizer) -> None:
    rows = [{"question": "q", "answer": "a"}]
    with pytest.raises(KeyError) as err:
        InstructionFormat().encode(rows, tokenizer, 64, "train")
    msg = str(err.value)
    assert "prompt" in msg and "response" in msg and "'question'" in msg and "'answer'" in msg
    assert "train" in msg
    # with the columns renamed it works
    ex = encode_one(InstructionFormat(prompt_column="question", response_column="answer"), rows[0], tokenizer)
    assert labelled_spans(tokenizer, ex) == [f"a{EOS}\n"]


def test_missing_response_column_only_matters_for_training(tokenizer) -> None:
    with pytest.raises(KeyError, match="response"):
        InstructionFormat().encode([{"prompt": "q"}], tokenizer, 64, "train")
    assert len(InstructionFormat().encode_for_predict([{"prompt": "q"}], tokenizer, 64).examples) == 1


# --- instruction: choices and prediction -----------------------------------------------------------------------


def test_choices_fields(tokenizer) -> None:
    rows = instruction_rows(4)
    split = InstructionFormat().encode(rows, tokenizer, 128, "val")
    for row, ex in zip(rows, split.examples):
        prompt = template_ids(tokenizer, [user(row["prompt"])], add_generation_prompt=True)
        assert ex["prompt_ids"] == prompt
        assert ex["input_ids"][: len(prompt)] == prompt
        assert [tokenizer.decode(c) for c in ex["choice_ids"]] == [f"negative{EOS}", f"positive{EOS}"]
        for choice, ids in zip(row["choices"], ex["choice_ids"]):
            assert ids == text_ids(tokenizer, choice) + [tokenizer.eos_token_id]
        assert ex["choice_label"] == row["choices"].index(row["response"])
    assert [ex["choice_label"] for ex in split.examples] == [1, 0, 1, 0]


def test_choices_with_messages_rows_and_int_choices(tokenizer) -> None:
    row = {"messages": [user("pick one"), assistant("2")], "choices": [1, 2, 3]}
    ex = InstructionFormat().encode([row], tokenizer, 512, "test").examples[0]
    assert ex["choice_label"] == 1
    assert ex["prompt_ids"] == template_ids(tokenizer, [user("pick one")], add_generation_prompt=True)
    assert [tokenizer.decode(c) for c in ex["choice_ids"]] == [f"1{EOS}", f"2{EOS}", f"3{EOS}"]


def test_answer_not_among_choices_raises(tokenizer) -> None:
    row = {"prompt": "is it good", "response": "maybe", "choices": ["negative", "positive"]}
    with pytest.raises(ValueError, match=r"'maybe' is not one of the choices"):
        InstructionFormat().encode([row], tokenizer, 128, "val")


def test_choice_longer_than_max_length_raises(tokenizer) -> None:
    row = {"prompt": "is it good", "response": "no", "choices": ["no", " ".join(["wonderful acting"] * 30)]}
    with pytest.raises(ValueError, match="max_length=40"):
        InstructionFormat().encode([row], tokenizer, 40, "val")


def test_encode_for_predict_ends_with_generation_prompt(tokenizer) -> None:
    gen = text_ids(tokenizer, "<|im_start|>assistant\n")
    fmt = InstructionFormat()
    rows = [prompt_row(), messages_row(user(PROMPT), assistant("positive")), messages_row(user(PROMPT))]
    split = fmt.encode_for_predict(rows, tokenizer, 128)
    expected = template_ids(tokenizer, [user(PROMPT)], add_generation_prompt=True)
    for ex in split.examples:
        assert set(ex) == {"input_ids"}
        assert ex["input_ids"] == expected
        assert ex["input_ids"][-len(gen) :] == gen
        assert "positive<" not in tokenizer.decode(ex["input_ids"])  # the prompt's own "positive" is fine


def test_encode_for_predict_plain_and_too_long(plain_tokenizer) -> None:
    fmt = InstructionFormat()
    ex = fmt.encode_for_predict([prompt_row()], plain_tokenizer, 128).examples[0]
    assert plain_tokenizer.decode(ex["input_ids"]) == f"### Instruction:\n{PROMPT}\n\n### Response:\n"
    with pytest.raises(ValueError, match="max_length=5"):
        fmt.encode_for_predict([prompt_row()], plain_tokenizer, 5)


# --- classification --------------------------------------------------------------------------------------------


@pytest.fixture
def bert_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    words = "the movie was great a dull film boring with no plot at all and wonderful acting is it good".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(tmp_path))
    assert tok.tokenize("the movie") == ["the", "movie"]  # the vocab file was read
    return tok


def test_classification_string_labels(tokenizer) -> None:
    rows = sentiment_rows(6)
    split = ClassificationFormat(["negative", "positive"]).encode(rows, tokenizer, 64, "train")
    assert [e["label"] for e in split.examples] == [1, 0, 1, 0, 1, 0]
    assert [e["input_ids"] for e in split.examples] == [tokenizer(r["text"])["input_ids"] for r in rows]
    assert "token_type_ids" not in split.examples[0]  # this tokenizer makes none
    # the order of `labels` decides the ids
    flipped = ClassificationFormat(["positive", "negative"]).encode(rows, tokenizer, 64, "train")
    assert [e["label"] for e in flipped.examples] == [0, 1, 0, 1, 0, 1]


def test_classification_int_labels(tokenizer) -> None:
    rows = [{"text": "great", "label": 2}, {"text": "dull", "label": 0}, {"text": "ok", "label": 1}]
    split = ClassificationFormat(["neg", "neutral", "pos"]).encode(rows, tokenizer, 64, "train")
    assert [e["label"] for e in split.examples] == [2, 0, 1]


def test_classification_unknown_label_names_the_label_set(tokenizer) -> None:
    rows = [{"text": "great", "label": "positive"}, {"text": "meh", "label": "neutral"}]
    with pytest.raises(ValueError, match=re.escape("['negative', 'positive']")) as err:
        ClassificationFormat(["negative", "positive"]).encode(rows, tokenizer, 64, "train")
    assert "'neutral'" in str(err.value) and "row 1" in str(err.value)


@pytest.mark.parametrize("bad", [2, -1, True, 1.0, None])
def test_classification_bad_label_values(tokenizer, bad) -> None:
    rows = [{"text": "great", "label": bad}]
    with pytest.raises(ValueError, match="label"):
        ClassificationFormat(["negative", "positive"]).encode(rows, tokenizer, 64, "train")


def test_classification_needs_labels() -> None:
    with pytest.raises(ValueError, match="non-empty label list"):
        ClassificationFormat([])


def test_classification_missing_column(tokenizer) -> None:
    with pytest.raises(KeyError) as err:
        ClassificationFormat(["a", "b"]).encode([{"sentence": "x", "label": "a"}], tokenizer, 64, "train")
    assert "'text'" in str(err.value) and "'sentence'" in str(err.value)


def test_classification_text_pair_token_type_ids(bert_tokenizer) -> None:
    rows = [
        {"premise": "the movie", "hypothesis": "was great", "label": "yes"},
        {"premise": "a dull film", "hypothesis": "no plot at all", "label": "no"},
    ]
    fmt = ClassificationFormat(["no", "yes"], text_column="premise", text_pair_column="hypothesis")
    split = fmt.encode(rows, bert_tokenizer, 64, "train")
    for row, ex in zip(rows, split.examples):
        ref = bert_tokenizer(row["premise"], row["hypothesis"])
        assert ex["input_ids"] == ref["input_ids"]
        assert ex["token_type_ids"] == ref["token_type_ids"]
        assert 0 in ex["token_type_ids"] and 1 in ex["token_type_ids"]
    assert [e["label"] for e in split.examples] == [1, 0]
    # predict keeps the pair too
    pred = fmt.encode_for_predict([{k: v for k, v in r.items() if k != "label"} for r in rows], bert_tokenizer, 64)
    assert [e["token_type_ids"] for e in pred.examples] == [e["token_type_ids"] for e in split.examples]
    assert all("label" not in e for e in pred.examples)


def test_classification_truncation_counted(bert_tokenizer) -> None:
    texts = ["great", "the movie was great", "a dull film with no plot at all", "wonderful"]
    full = [len(bert_tokenizer(t)["input_ids"]) for t in texts]  # [3, 6, 9, 3]
    max_length = 6
    rows = [{"text": t, "label": "x"} for t in texts]
    split = ClassificationFormat(["x"]).encode(rows, bert_tokenizer, max_length, "train")
    assert split.num_truncated == sum(n > max_length for n in full) == 1
    assert [len(e["input_ids"]) for e in split.examples] == [min(n, max_length) for n in full]
    assert split.examples[2]["input_ids"][-1] == bert_tokenizer.sep_token_id  # truncation keeps [SEP]


def test_infer_labels() -> None:
    assert infer_labels(sentiment_rows(4)) == ["negative", "positive"]
    assert infer_labels([{"y": "b"}, {"y": "c"}, {"y": "a"}, {"y": "b"}], label_column="y") == ["a", "b", "c"]
    assert infer_labels([{"label": 2}, {"label": 0}]) == ["0", "1", "2"]  # ints are class indices


def test_infer_labels_numeric_strings_match_ints() -> None:
    as_ints = infer_labels([{"label": i} for i in range(12)])
    as_strings = infer_labels([{"label": str(i)} for i in range(12)])
    assert as_strings == as_ints == [str(i) for i in range(12)]


# --- plain text ------------------------------------------------------------------------------------------------


def test_text_blocks(tokenizer) -> None:
    docs = ["the movie was great and the acting was wonderful", "a dull and boring film", "hello world"]
    eos = tokenizer.eos_token_id
    stream = []
    for d in docs:
        stream += text_ids(tokenizer, d) + [eos]
    max_length = 8
    split = TextFormat().encode([{"text": d} for d in docs], tokenizer, max_length, "train")
    blocks = [e["input_ids"] for e in split.examples]
    chunks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    assert blocks == [c for c in chunks if len(c) > 1]
    assert all(len(b) == max_length for b in blocks[:-1]) and 1 < len(blocks[-1]) <= max_length
    assert all(e["labels"] == e["input_ids"] for e in split.examples)
    assert split.num_truncated == 0 and split.extra["documents"] == 3
    # one EOS closes each document, at the document boundaries
    flat = [t for b in blocks for t in b]
    assert flat.count(eos) == len(docs)
    first_len = len(text_ids(tokenizer, docs[0]))
    assert flat[first_len] == eos and flat[first_len + 1 : first_len + 3] == text_ids(tokenizer, docs[1])[:2]


def test_text_missing_column(tokenizer) -> None:
    with pytest.raises(KeyError, match="body"):
        TextFormat().encode([{"body": "x"}], tokenizer, 8, "train")


def test_choices_must_be_a_list(tokenizer) -> None:
    row = {"prompt": "is it good", "response": "yes", "choices": "['yes', 'no']"}
    with pytest.raises(ValueError, match="must be a list"):
        InstructionFormat().encode([row], tokenizer, 128, "val")


def test_missing_column_in_a_later_row_names_the_row(tokenizer) -> None:
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c"}]
    with pytest.raises(KeyError, match="row 1"):
        InstructionFormat().encode(rows, tokenizer, 128, "train")


def test_choices_are_not_encoded_for_training(tokenizer) -> None:
    ex = encode_one(InstructionFormat(), instruction_rows(1)[0], tokenizer)
    assert "choice_ids" not in ex and "prompt_ids" not in ex
