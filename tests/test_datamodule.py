"""FineTuneDataModule: sources, seeded splits, set-up statistics, collation, loaders and the length-grouped sampler."""

from __future__ import annotations

import csv
import gc
import json
from pathlib import Path

import pytest
import torch
from helpers import instruction_rows, sentiment_rows

from lightning_ft.data import datamodule as dm_module
from lightning_ft.data.datamodule import FineTuneDataModule
from lightning_ft.data.samplers import LengthGroupedSampler

IGNORE = -100
WORDS = "the movie was great and the acting was wonderful".split()


# --- helpers ---------------------------------------------------------------------------------------------------


def qa_rows(n: int = 40, varied: bool = False) -> list[dict]:
    """Prompt / response rows with a unique ``id``; ``varied`` makes response lengths range widely (1..24 words)."""
    rows = []
    for i in range(n):
        words = (i * 7) % 24 + 1 if varied else 1 + i % 3
        response = " ".join(WORDS[j % len(WORDS)] for j in range(words))
        rows.append({"id": i, "prompt": f"review {i}: is it good", "response": response})
    return rows


def make_dm(tokenizer, **kwargs) -> FineTuneDataModule:
    kwargs.setdefault("max_length", 128)
    return FineTuneDataModule(tokenizer, **kwargs)


def set_up(tokenizer, **kwargs) -> FineTuneDataModule:
    dm = make_dm(tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def write_rows(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix if not path.name.endswith(".wrapped.json") else ".wrapped"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".wrapped":
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise AssertionError(suffix)
    return path


def ids_of(rows: list[dict]) -> list:
    return [r["id"] for r in rows]


def padding_fraction(batches: list[dict]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return 1 - real / total


# --- sources ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.wrapped.json", "train.csv", "train.parquet"])
def test_file_sources_match_list_source(tokenizer, tmp_path: Path, name: str) -> None:
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in qa_rows(12)]  # strings only: CSV keeps them
    path = write_rows(tmp_path / name, rows)
    reference = set_up(tokenizer, train=rows)
    for source in (path, str(path)):
        dm = make_dm(tokenizer, train=source)
        assert dm.read_splits()["train"] == rows
        dm.setup("fit")
        assert dm.splits["train"].examples == reference.splits["train"].examples


def test_csv_classification_source(tokenizer, tmp_path: Path) -> None:
    rows = sentiment_rows(8)
    dm = set_up(tokenizer, task="classification", train=write_rows(tmp_path / "t.csv", rows))
    assert dm.labels == ["negative", "positive"]
    assert [e["label"] for e in dm.splits["train"].examples] == [1, 0] * 4


def test_missing_file(tokenizer, tmp_path: Path) -> None:
    dm = make_dm(tokenizer, train=tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "name, content",
    [
        ("e.jsonl", ""),
        ("e.jsonl", "\n\n"),
        ("e.csv", ""),
        ("e.csv", "prompt,response\n"),
        ("e.json", "[]"),
        ("e.json", '{"data": []}'),
        ("e.json", ""),
    ],
)
def test_empty_file_says_empty(tokenizer, tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        make_dm(tokenizer, train=path).setup("fit")


def test_empty_list_and_empty_parquet_say_empty(tokenizer, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "e.parquet")
    for source in ([], tmp_path / "e.parquet"):
        with pytest.raises(ValueError, match="empty"):
            make_dm(tokenizer, train=source).setup("fit")


def test_unsupported_suffix(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'") as err:
        make_dm(tokenizer, train=path).setup("fit")
    assert all(s in str(err.value) for s in (".jsonl", ".json", ".csv", ".parquet"))


def test_invalid_jsonl_line_named(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{not json}\n')
    with pytest.raises(ValueError, match="line 2"):
        make_dm(tokenizer, train=path).setup("fit")


def test_unknown_task_lists_tasks(tokenizer) -> None:
    with pytest.raises(ValueError, match="'chat'") as err:
        FineTuneDataModule(tokenizer, task="chat", train=qa_rows(4))
    assert all(t in str(err.value) for t in ("instruction", "classification", "text"))


# --- splits ----------------------------------------------------------------------------------------------------


def test_fraction_split_sizes_and_no_overlap(tokenizer) -> None:
    rows = qa_rows(40)
    parts = make_dm(tokenizer, train=rows, val_fraction=0.2, test_fraction=0.1, seed=3).read_splits()
    train, val, test = (ids_of(parts[k]) for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (28, 8, 4)
    assert sorted(train + val + test) == list(range(40))  # no overlap, nothing lost
    assert train != sorted(train) or val != sorted(val)  # shuffled, not cut from the end
    dm = set_up(tokenizer, train=rows, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert {k: len(s.examples) for k, s in dm.splits.items()} == {"train": 28, "val": 8, "test": 4}


def test_fraction_split_deterministic_per_seed(tokenizer) -> None:
    def split(seed: int) -> dict[str, list]:
        parts = make_dm(tokenizer, train=qa_rows(40), val_fraction=0.25, seed=seed).read_splits()
        return {k: ids_of(v) for k, v in parts.items()}

    a, b, c = split(0), split(0), split(1)
    assert set(a) == {"train", "val"}
    assert a == b
    assert set(a["val"]) != set(c["val"])


def test_val_and_val_fraction_together_error(tokenizer) -> None:
    dm = make_dm(tokenizer, train=qa_rows(20), val=qa_rows(4), val_fraction=0.2)
    with pytest.raises(ValueError, match="val source or val_fraction"):
        dm.setup("fit")


def test_given_val_kept_with_test_fraction(tokenizer) -> None:
    val = qa_rows(3)
    parts = make_dm(tokenizer, train=qa_rows(20), val=val, test_fraction=0.25).read_splits()
    assert parts["val"] == val and len(parts["test"]) == 5 and len(parts["train"]) == 15


def test_fraction_leaving_split_empty_errors(tokenizer) -> None:
    with pytest.raises(ValueError, match="empty"):
        make_dm(tokenizer, train=qa_rows(4), val_fraction=0.1).setup("fit")


def test_max_examples(tokenizer) -> None:
    rows = qa_rows(40)
    full = make_dm(tokenizer, train=rows, val_fraction=0.25).read_splits()
    dm = set_up(tokenizer, train=rows, val_fraction=0.25, max_train_examples=5, max_eval_examples=3)
    limited = dm.read_splits()
    assert ids_of(limited["train"]) == ids_of(full["train"])[:5]
    assert ids_of(limited["val"]) == ids_of(full["val"])[:3]
    assert len(dm.splits["train"].examples) == 5 and len(dm.splits["val"].examples) == 3


# --- set-up statistics -----------------------------------------------------------------------------------------


def test_setup_logs_stats(tokenizer, monkeypatch) -> None:
    rows = qa_rows(20, varied=True)
    max_length = 48
    full = set_up(tokenizer, train=rows, max_length=512).splits["train"].examples
    messages: list[str] = []
    monkeypatch.setattr(dm_module, "rank_zero_info", lambda msg, *a, **k: messages.append(str(msg)))
    dm = set_up(tokenizer, train=rows, val=rows[:10], max_length=max_length, batch_size=4, eval_batch_size=3)

    full_lengths = [len(e["input_ids"]) for e in full]
    n_trunc = sum(n > max_length for n in full_lengths)
    assert 0 < n_trunc < len(rows)

    stats = dm.split_stats("train", dm.splits["train"])
    lengths = [min(n, max_length) for n in full_lengths]
    assert stats["examples"] == 20 and stats["tokens"] == sum(lengths) and stats["truncated"] == n_trunc
    assert 0 < stats["padding_fraction"] < 1

    # val is not shuffled: batches of 3 consecutive examples
    val_stats = dm.split_stats("val", dm.splits["val"])
    val_lengths = lengths[:10]
    padded = sum(max(val_lengths[i : i + 3]) * len(val_lengths[i : i + 3]) for i in range(0, 10, 3))
    assert val_stats["padding_fraction"] == pytest.approx(1 - sum(val_lengths) / padded)
    assert val_stats["truncated"] == sum(n > max_length for n in full_lengths[:10])

    train_msg = [m for m in messages if "train:" in m]
    assert len(train_msg) == 1 and any("val:" in m for m in messages)
    for key in ("examples=20", f"tokens={sum(lengths)}", f"truncated={n_trunc}", "padding_fraction=0."):
        assert key in train_msg[0]


def test_group_by_length_lowers_padding(tokenizer) -> None:
    rows = qa_rows(64, varied=True)
    kw = dict(train=rows, batch_size=4, seed=0)
    plain, grouped = set_up(tokenizer, **kw), set_up(tokenizer, group_by_length=True, **kw)
    p_plain = plain.split_stats("train", plain.splits["train"])["padding_fraction"]
    p_grouped = grouped.split_stats("train", grouped.splits["train"])["padding_fraction"]
    assert p_grouped < p_plain / 2
    # and the real train loaders agree
    torch.manual_seed(0)
    assert padding_fraction(list(grouped.train_dataloader())) < padding_fraction(list(plain.train_dataloader())) / 2


# --- collation -------------------------------------------------------------------------------------------------


def test_dynamic_padding_to_longest(tokenizer) -> None:
    rows = qa_rows(6, varied=True)
    dm = set_up(tokenizer, train=rows, val=rows, eval_batch_size=3)
    examples = dm.splits["val"].examples
    batches = list(dm.val_dataloader())
    assert len(batches) == 2
    for b, chunk in zip(batches, (examples[:3], examples[3:])):
        longest = max(len(e["input_ids"]) for e in chunk)
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, longest)
        for i, e in enumerate(chunk):
            n = len(e["input_ids"])
            assert b["input_ids"][i, :n].tolist() == e["input_ids"]
            assert b["labels"][i, :n].tolist() == e["labels"]
            assert b["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
            assert (b["input_ids"][i, n:] == dm.pad_token_id).all()
            assert (b["labels"][i, n:] == IGNORE).all()
        assert all(t.dtype == torch.long for t in b.values())


def test_pad_to_multiple_of_8(tokenizer) -> None:
    rows = qa_rows(8, varied=True)
    dm = set_up(tokenizer, train=rows, val=rows, eval_batch_size=4, pad_to_multiple_of=8)
    examples = dm.splits["val"].examples
    for b, chunk in zip(dm.val_dataloader(), (examples[:4], examples[4:])):
        longest = max(len(e["input_ids"]) for e in chunk)
        width = b["input_ids"].shape[1]
        assert width % 8 == 0 and longest <= width < longest + 8
        assert b["attention_mask"].sum().item() == sum(len(e["input_ids"]) for e in chunk)
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()


def test_predict_loader_left_pads_causal_task(tokenizer) -> None:
    rows = [{"prompt": "hi"}, {"prompt": "is the movie great and the acting wonderful"}]
    dm = set_up(tokenizer, train=qa_rows(4), predict=rows, eval_batch_size=2)
    examples = dm.splits["predict"].examples
    (batch,) = list(dm.predict_dataloader())
    assert "labels" not in batch
    width = batch["input_ids"].shape[1]
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["input_ids"][i, width - n :].tolist() == e["input_ids"]
        assert batch["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is padded on the left


def test_classification_batches(tokenizer) -> None:
    rows = sentiment_rows(6)
    predict = [{"text": "great"}, {"text": "a dull film"}]
    dm = set_up(tokenizer, task="classification", train=rows, val=rows, predict=predict, eval_batch_size=6)
    (batch,) = list(dm.val_dataloader())
    assert batch["labels"].tolist() == [1, 0, 1, 0, 1, 0]
    (pred,) = list(dm.predict_dataloader())
    assert pred["attention_mask"][0, 0] == 1  # classification predicts with right padding


# --- loaders ---------------------------------------------------------------------------------------------------


def collect(dm: FineTuneDataModule, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    loader = dm.train_dataloader()
    batches = list(loader)
    del loader
    gc.collect()  # shuts persistent workers down
    return batches


def same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_workers_give_same_batches_as_main_process(tokenizer) -> None:
    rows = qa_rows(24, varied=True)
    dm0 = set_up(tokenizer, train=rows, batch_size=4, num_workers=0)
    dm2 = set_up(tokenizer, train=rows, batch_size=4, num_workers=2)
    b0, b2 = collect(dm0, 123), collect(dm2, 123)
    assert len(b0) == 6
    assert same_batches(b0, b2)
    assert same_batches(b0, collect(dm0, 124))  # the global torch seed does not change the order...
    other = set_up(tokenizer, train=rows, batch_size=4, num_workers=0, seed=1)
    assert not same_batches(b0, collect(other, 123))  # ...the data module's seed does


def test_train_loader_covers_every_example_once(tokenizer) -> None:
    rows = qa_rows(10)
    dm = set_up(tokenizer, train=rows, batch_size=4, group_by_length=True)
    batches = collect(dm, 0)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    seen = sorted(tuple(row[m.bool()].tolist()) for b in batches for row, m in zip(b["input_ids"], b["attention_mask"]))
    assert seen == sorted(tuple(e["input_ids"]) for e in dm.splits["train"].examples)


def test_missing_split_loader_error(tokenizer) -> None:
    dm = set_up(tokenizer, train=qa_rows(4))
    assert dm.val_dataloader() == []  # fit without validation data simply skips validation
    with pytest.raises(RuntimeError, match="test"):
        dm.test_dataloader()


def test_text_task_loader(tokenizer) -> None:
    dm = set_up(tokenizer, task="text", train=[{"text": " ".join(WORDS)}] * 5, max_length=16, batch_size=2)
    for b in collect(dm, 0):
        masked = b["attention_mask"] == 0
        assert torch.equal(b["labels"][~masked], b["input_ids"][~masked]) and (b["labels"][masked] == IGNORE).all()


def test_classification_labels_inferred(tokenizer) -> None:
    dm = set_up(tokenizer, task="classification", train=sentiment_rows(8), val=sentiment_rows(4))
    assert dm.labels == ["negative", "positive"]
    assert [e["label"] for e in dm.splits["val"].examples] == [1, 0, 1, 0]
    given = set_up(tokenizer, task="classification", train=sentiment_rows(4), labels=["positive", "negative"])
    assert given.labels == ["positive", "negative"]
    assert [e["label"] for e in given.splits["train"].examples] == [0, 1, 0, 1]


def test_classification_without_train_needs_labels(tokenizer) -> None:
    with pytest.raises(ValueError, match="labels"):
        set_up(tokenizer, task="classification", val=sentiment_rows(4))


def test_instruction_choices_through_the_datamodule(tokenizer) -> None:
    rows = instruction_rows(4)
    dm = set_up(tokenizer, train=rows, val=rows, eval_batch_size=4)
    (batch,) = list(dm.val_dataloader())
    assert batch["choice_target"].tolist() == [1, 0, 1, 0]
    assert batch["choice_ids"].shape[0] == 8  # 4 rows x 2 choices
    assert batch["choice_prompt_mask"][:, -1].all()  # prompts are left-padded


# --- LengthGroupedSampler --------------------------------------------------------------------------------------


def sampler_order(lengths: list[int], seed: int = 0, epoch: int = 0, batch_size: int = 2, mult: int = 3) -> list[int]:
    s = LengthGroupedSampler(lengths, batch_size, seed=seed, mega_batch_mult=mult)
    s.set_epoch(epoch)
    return list(s)


def test_length_grouped_sampler() -> None:
    lengths = [(i * 37) % 101 for i in range(50)]
    order = sampler_order(lengths)
    assert sorted(order) == list(range(50)) and len(LengthGroupedSampler(lengths, 2)) == 50
    assert order == sampler_order(lengths)  # deterministic per (seed, epoch)
    assert order != sampler_order(lengths, epoch=1)  # reshuffled each epoch
    assert order != sampler_order(lengths, seed=5)
    assert sampler_order(lengths, epoch=1) == sampler_order(lengths, epoch=1)
    # each mega-batch (2 * 3 indices) is sorted longest first
    for start in range(0, 50, 6):
        chunk = [lengths[i] for i in order[start : start + 6]]
        assert chunk == sorted(chunk, reverse=True)
    assert order != sorted(range(50), key=lambda i: -lengths[i])  # still shuffled across mega-batches


def test_train_order_depends_only_on_seed_and_epoch(tokenizer) -> None:
    """Resuming needs the same order as an unbroken run: the global RNG must not change it."""
    from helpers import sentiment_rows

    from lightning_ft import FineTuneDataModule

    def first_batch(global_seed: int, epoch: int) -> list[list[int]]:
        dm = FineTuneDataModule(tokenizer, task="classification", train=sentiment_rows(32), batch_size=4, seed=3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(global_seed)
        return next(iter(loader))["input_ids"].tolist()

    assert first_batch(0, 0) == first_batch(1, 0)
    assert first_batch(0, 0) != first_batch(0, 1)


def test_fit_without_validation_data_skips_validation(tokenizer) -> None:
    from helpers import sentiment_rows

    from lightning_ft import FineTuneDataModule

    dm = FineTuneDataModule(tokenizer, task="classification", train=sentiment_rows(8), labels=["negative", "positive"])
    dm.setup("fit")
    assert dm.val_dataloader() == []


# --- format (and its former name, task) ------------------------------------------------------------------------


def test_format_and_its_alias_task(tokenizer) -> None:
    new = FineTuneDataModule(tokenizer, format="classification", train=sentiment_rows(4))
    old = FineTuneDataModule(tokenizer, task="classification", train=sentiment_rows(4))
    positional = FineTuneDataModule(tokenizer, "classification", train=sentiment_rows(4))
    for dm in (new, old, positional):
        assert dm.format == dm.task == "classification" and dm.model_task == "classification"
        assert dm.hparams["format"] == "classification" and "task" not in dm.hparams and "data_task" not in dm.hparams
    assert FineTuneDataModule(tokenizer, train=qa_rows(4)).model_task == "causal_lm"
    assert FineTuneDataModule(tokenizer, format="text", task="text", train=qa_rows(4)).format == "text"
    with pytest.raises(ValueError, match="disagree"):
        FineTuneDataModule(tokenizer, format="text", task="classification", train=qa_rows(4))
    with pytest.raises(ValueError, match="'chat'"):
        FineTuneDataModule(tokenizer, format="chat", train=qa_rows(4))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_loaders_batch_in_the_order_split_stats_counts(tokenizer, group_by_length) -> None:
    """One definition of each split's sample order: the loaders use the order ``split_stats`` estimates padding for."""
    rows = qa_rows(24, varied=True)
    dm = set_up(tokenizer, train=rows, val=rows, batch_size=4, eval_batch_size=5, group_by_length=group_by_length)
    for name, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        examples = dm.splits[name].examples
        lengths = [len(e["input_ids"]) for e in examples]
        order = dm.sample_order(name, lengths)
        order = list(order) if order is not None else list(range(len(lengths)))
        padded = 0
        for batch, start in zip(loader, range(0, len(order), loader.batch_size)):
            chunk = order[start : start + loader.batch_size]
            assert batch["input_ids"].shape == (len(chunk), max(lengths[i] for i in chunk))
            padded += batch["input_ids"].numel()
        stats = dm.split_stats(name, dm.splits[name])
        assert stats["padding_fraction"] == pytest.approx(1 - sum(lengths) / padded)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_evaluation_scores_every_row_exactly_once(tokenizer, world_size: int) -> None:
    """Under DDP the val / test rows are split across ranks without the repeated rows Lightning's sampler pads with
    (7 rows on 2 or 3 ranks would score 1 or 2 of them twice); a sharded strategy keeps Lightning's sampler."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data.distributed import DistributedSampler

    rows = qa_rows(7, varied=True)
    seen = []
    for rank in range(world_size):
        data = FineTuneDataModule(tokenizer, task="instruction", train=rows, val=rows, test=rows, eval_batch_size=2)
        data.setup("fit")
        data.setup("test")
        data.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, strategy=DDPStrategy())
        for loader in (data.val_dataloader(), data.test_dataloader()):
            assert isinstance(loader.sampler, DistributedSampler)  # Lightning leaves it alone
        seen.append([ids for batch in data.test_dataloader() for ids in batch["input_ids"].tolist()])
    scored = [tuple(t for t in ids if t != tokenizer.pad_token_id) for rank_rows in seen for ids in rank_rows]
    assert len(scored) == 7 and len(set(scored)) == 7  # every row once, none twice
    sizes = [len(rank_rows) for rank_rows in seen]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("strategy", "rows", "world_size"), [("fsdp", 7, 2), ("fsdp", 7, 3), ("fsdp", 2, 4), ("ddp", 2, 3)]
)
def test_sharded_evaluation_evens_the_shards_with_fillers_that_score_nothing(tokenizer, strategy, rows, world_size):
    """A sharded model (FSDP) needs equal batches on every rank, and so does DDP with fewer rows than ranks: the short
    ranks get filler rows (another rank's row, every target -100, flagged) so that every real row counts once."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch.utils.data.distributed import DistributedSampler

    strategy_cls = ModelParallelStrategy if strategy == "fsdp" else DDPStrategy
    data_rows = qa_rows(rows, varied=True)
    classes = [{"text": f"review {i} " * (i + 1), "label": ["neg", "pos"][i % 2]} for i in range(rows)]
    for fmt, train in (("instruction", data_rows), ("classification", classes)):
        real, shapes = [], []
        for rank in range(world_size):
            data = FineTuneDataModule(tokenizer, format=fmt, train=train, test=train, eval_batch_size=2)
            data.setup("test")
            data.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, strategy=strategy_cls())
            loader = data.test_dataloader()
            assert isinstance(loader.sampler, DistributedSampler)  # Lightning leaves it alone
            batches = list(loader)
            shapes.append([b["input_ids"].shape[0] for b in batches])
            for b in batches:
                filler = b.get("filler", torch.zeros(len(b["input_ids"]), dtype=torch.bool))
                for ids, labels, is_filler in zip(b["input_ids"].tolist(), b["labels"], filler.tolist()):
                    if is_filler:
                        assert (labels == -100).all()  # no loss term, no metric update
                    else:
                        assert (labels != -100).any()
                        real.append(tuple(t for t in ids if t != tokenizer.pad_token_id))
        assert len({tuple(s) for s in shapes}) == 1  # the same batches, of the same sizes, on every rank
        assert len(real) == rows and len(set(real)) == rows  # every real row once
