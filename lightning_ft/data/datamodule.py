"""``FineTuneDataModule``: one data module for every method and task."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_ft.data.classification import ClassificationFormat, check_label_names, infer_labels
from lightning_ft.data.collate import Collator
from lightning_ft.data.formats import DataFormat, EncodedSplit, Example
from lightning_ft.data.instruction import InstructionFormat
from lightning_ft.data.packing import check_packing, pack_examples
from lightning_ft.data.resumable import ResumableDataLoader
from lightning_ft.data.samplers import (
    EpochShuffleSampler,
    LengthGroupedSampler,
    ShardSampler,
    even_shards,
    filler_row,
)
from lightning_ft.data.sources import Source, load_rows, split_rows
from lightning_ft.data.text import TextFormat

log = logging.getLogger(__name__)

Format = Literal["instruction", "classification", "text"]
#: the row formats, by name; each class names the model-side task it trains (``model_task``)
FORMATS: dict[str, type[DataFormat]] = {
    "instruction": InstructionFormat,
    "classification": ClassificationFormat,
    "text": TextFormat,
}
#: the default of ``format=``
DEFAULT_FORMAT = "instruction"


def resolve_format(format: str | None = None, task: str | None = None) -> str:
    """The row format from ``format=`` and its older name ``task=`` (kept as an alias for existing code and
    configs). ``task`` overrides a ``format`` left at its default; two different explicit values are refused."""
    if task is not None and format not in (None, DEFAULT_FORMAT, task):
        raise ValueError(f"format={format!r} and task={task!r} disagree; `task` is the old name of `format`, give one")
    name = task if task is not None else (format or DEFAULT_FORMAT)
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose one of {list(FORMATS)}")
    return name


def model_task_for(format: str | None = None, task: str | None = None) -> str:
    """The model-side task a row format trains: ``"instruction"`` / ``"text"`` -> ``"causal_lm"``,
    ``"classification"`` -> ``"classification"`` (arguments as for :func:`resolve_format`)."""
    return FORMATS[resolve_format(format, task)].model_task


def shared_choices(rows: dict[str, list[dict]], column: str) -> dict[str, list[str]]:
    """For each evaluation split whose rows all have the same ``column`` list of choices: that list."""
    out = {}
    for name in ("val", "test"):
        found = [r.get(column) for r in rows.get(name, [])]
        sets = {tuple(map(str, c)) if isinstance(c, (list, tuple)) else None for c in found}
        if len(sets) == 1 and None not in sets:
            out[name] = list(sets.pop())
    return out


class FineTuneDataModule(L.LightningDataModule):
    """Tokenises, batches and (optionally) packs data for any ``lightning-ft`` module or a user's own.

    Args:
        tokenizer: a tokenizer, or a model name / path / short name for ``lightning_ft.models.load_tokenizer``.
        format: how rows are read: ``"instruction"`` (``messages`` or ``prompt`` / ``response`` columns),
            ``"classification"`` (``text``, optional ``text_pair``, ``label``) or ``"text"`` (a plain corpus cut
            into blocks). The model-side task follows from it (``causal_lm`` or ``classification``).
        train, val, test, predict: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` path, a list of dicts or a
            ``datasets.Dataset``.
        val_fraction, test_fraction: when ``val`` / ``test`` are not given, cut them from ``train`` with ``seed``.
        labels: the ordered label set for classification; inferred from the train split when omitted.
        max_length: longest sequence in tokens; longer examples are truncated and counted.
        packing: pack several causal-LM training examples per row (no attention across them). Before the first
            training batch the model in training is probed once (``lightning_ft.data.packing.check_packing``): an
            architecture that lets packed examples attend to each other is refused with an error.
        packing_check: ``False`` skips that probe (for a model the probe cannot run, at your own risk).
        group_by_length: batch training examples of similar length together (and evaluate longest first).
        pad_to_multiple_of: pad each batch's length up to a multiple of this (8 suits tensor cores).
        max_train_examples / max_eval_examples: keep only the first N rows of each split (after splitting).
        task: the former name of ``format``, still accepted (``FineTuneDataModule(tok, task="classification")``,
            ``data.task`` in a recipe); it overrides a ``format`` left at its default.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        format: Format = DEFAULT_FORMAT,
        train: Source | None = None,
        val: Source | None = None,
        test: Source | None = None,
        predict: Source | None = None,
        val_fraction: float = 0.0,
        test_fraction: float = 0.0,
        labels: list[str] | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        packing: bool = False,
        packing_check: bool = True,
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str = "messages",
        choices_column: str = "choices",
        system_prompt: str | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        task: Format | None = None,
    ) -> None:
        super().__init__()
        format = resolve_format(format, task)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if packing and format == "classification":
            raise ValueError("packing applies to causal-LM tasks ('instruction', 'text'), not 'classification'")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        for name, value in (("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for all rows), got {value!r}")
        if labels is not None and format == "classification":
            check_label_names(labels)  # refuses a string, an empty list and duplicate names
        # the alias `task` is not saved: Lightning merges module and data hparams for loggers and refuses a key with
        # two values, and the module's `task` ("causal_lm") is another thing than the row format ("instruction")
        self.save_hyperparameters(ignore=["tokenizer", "train", "val", "test", "predict", "task"])
        self.hparams["format"] = format
        self._tokenizer = tokenizer
        self.sources = {"train": train, "val": val, "test": test, "predict": predict}
        self.format = format
        self.labels = list(labels) if labels is not None else None
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.packing = packing
        self.packing_check = packing_check
        self._packing_checked: int | None = None  # id() of the model last probed
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.fractions = (val_fraction, test_fraction)
        self.columns = dict(
            prompt_column=prompt_column,
            response_column=response_column,
            messages_column=messages_column,
            choices_column=choices_column,
            system_prompt=system_prompt,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
        )
        self.max_examples = {"train": max_train_examples, "val": max_eval_examples, "test": max_eval_examples}
        self.splits: dict[str, EncodedSplit] = {}
        self.row_format: DataFormat | None = None  # built from `format` at set-up
        #: per evaluation split, the choices every row shares (names for the choice metrics' figures), if any
        self.choice_names: dict[str, list[str]] = {}

    @property
    def task(self) -> str:
        """The former name of :attr:`format` (read-only)."""
        return self.format

    @property
    def model_task(self) -> str:
        """The model-side task these rows train: ``"causal_lm"`` or ``"classification"``."""
        return FORMATS[self.format].model_task

    # ---- set-up ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if isinstance(self._tokenizer, str):
            from lightning_ft.models import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    def make_format(self, rows: dict[str, list[dict]]) -> DataFormat:
        c = self.columns
        if self.format == "instruction":
            keys = ("prompt_column", "response_column", "messages_column", "choices_column", "system_prompt")
            return InstructionFormat(**{k: c[k] for k in keys})
        if self.format == "text":
            return TextFormat(c["text_column"])
        if self.labels is None:
            if "train" not in rows:
                raise ValueError("classification without a train split needs `labels` (the ordered label set)")
            self.labels = infer_labels(rows["train"], c["label_column"], "train")
            # the inferred set replaces `labels=None` in the hparams too: Lightning refuses module and data hparams
            # that share a key with two values, and the module gets the same labels
            self.save_hyperparameters({"labels": self.labels})
            rank_zero_info(f"lightning-ft: inferred labels {self.labels} from the train split")
        return ClassificationFormat(self.labels, c["text_column"], c["text_pair_column"], c["label_column"])

    def read_splits(self) -> dict[str, list[dict]]:
        """Rows of every split that has a source; val / test cut from train by fraction when asked."""
        rows = {name: load_rows(src, name) for name, src in self.sources.items() if src is not None}
        if "train" in rows and any(self.fractions):
            train, val, test = split_rows(rows["train"], self.fractions, self.seed)
            rows["train"] = train
            for name, part, frac in (("val", val, self.fractions[0]), ("test", test, self.fractions[1])):
                if frac and name in rows:
                    raise ValueError(f"give either a {name} source or {name}_fraction, not both")
                if frac:
                    if not part:
                        raise ValueError(f"{name}_fraction={frac} leaves the {name} split empty; raise it")
                    rows[name] = part
        for name, limit in self.max_examples.items():
            if limit is not None and name in rows:
                rows[name] = rows[name][:limit]
        return rows

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        rows = self.read_splits()
        self.row_format = self.make_format(rows)
        for name, split_rows_ in rows.items():
            if name == "predict":
                self.splits[name] = self.row_format.encode_for_predict(split_rows_, self.tokenizer, self.max_length)
            else:
                self.splits[name] = self.row_format.encode(split_rows_, self.tokenizer, self.max_length, name)
        self.choice_names = shared_choices(rows, self.columns["choices_column"]) if self.format == "instruction" else {}
        if self.packing and "train" in self.splits:
            unpacked = self.splits["train"]
            packed = pack_examples(unpacked.examples, self.max_length, self.seed)
            self.splits["train"] = EncodedSplit(
                packed, unpacked.num_truncated, {"unpacked_examples": len(unpacked.examples)}
            )
        for name, split in self.splits.items():
            rank_zero_info(f"lightning-ft data: {name}: {self.describe(name, split)}")

    def describe(self, name: str, split: EncodedSplit) -> str:
        """Examples, tokens, truncated count and padding fraction of one split (as batched here)."""
        stats = self.split_stats(name, split)
        text = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
        return text

    def split_stats(self, name: str, split: EncodedSplit) -> dict[str, Any]:
        """Counts of one split; ``padding_fraction`` is estimated for one epoch batched as the loaders batch it."""
        lengths = [len(e["input_ids"]) for e in split.examples]
        batch_size = self.batch_size_of(name)
        sampler = self.sample_order(name, lengths)
        order = list(sampler) if sampler is not None else range(len(lengths))
        padded = 0
        for start in range(0, len(order), batch_size):
            chunk = [lengths[i] for i in order[start : start + batch_size]]
            longest = max(chunk)
            if self.pad_to_multiple_of:
                longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
            padded += longest * len(chunk)
        stats: dict[str, Any] = {"examples": len(lengths), "tokens": sum(lengths), "truncated": split.num_truncated}
        stats["padding_fraction"] = 1 - sum(lengths) / padded if padded else 0.0
        stats.update(split.extra)
        return stats

    # ---- loaders ---------------------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def batch_size_of(self, name: str) -> int:
        return self.batch_size if name == "train" else self.eval_batch_size

    def sample_order(self, name: str, lengths: list[int]) -> Iterable[int] | None:
        """The order in which split ``name`` (examples of these token ``lengths``) is batched; ``None``: as stored.

        The one definition used by the loaders and by :meth:`split_stats`. Training is shuffled, seeded per epoch
        (``set_epoch``) so a resumed run sees the same order as an unbroken one, and length-grouped when asked;
        with ``group_by_length`` val / test go longest first (metrics do not depend on the order; less padding).
        """
        if name == "train":
            if self.group_by_length:
                return LengthGroupedSampler(lengths, self.batch_size_of(name), self.seed)
            return EpochShuffleSampler(len(lengths), self.seed)
        if self.group_by_length and name in ("val", "test"):
            return sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return None

    def _loader(self, name: str, padding_side: str = "right") -> DataLoader:
        if name not in self.splits:
            raise RuntimeError(f"no {name} data: pass `{name}=` to FineTuneDataModule (or a {name}_fraction)")
        examples = self.splits[name].examples
        sampler = self.sample_order(name, [len(e["input_ids"]) for e in examples])
        if name in ("val", "test"):
            examples, sampler = self._every_row_once(examples, sampler)
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size_of(name),
            sampler=sampler,
            collate_fn=Collator(self.pad_token_id, self.pad_to_multiple_of, padding_side),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if name == "train":  # resumes mid-epoch with the batches an unbroken run sees
            return ResumableDataLoader(examples, consumed_batches=self._consumed_train_batches, **kwargs)
        return DataLoader(examples, **kwargs)

    def _every_row_once(
        self, examples: list[Example], order: Iterable[int] | None
    ) -> tuple[list[Example], Iterable[int] | None]:
        """On several processes, split the evaluation rows across ranks so that each is scored exactly once.

        Lightning's default ``DistributedSampler`` pads the ranks to equal counts with repeated rows, which then
        count twice in the metrics (up to ``world_size - 1`` rows; its warning says so). Under DDP the ranks may
        hold one row (one batch) apart: evaluation runs no collective per batch (the metrics synchronise once, at
        epoch end). Sharded strategies (FSDP) gather weights in every forward, so every rank needs the same number
        of batches of the same sizes: the short ranks get *filler* rows (``samplers.filler_row``: a copy of a row
        with every target ignored and its generated answer unscored), as does DDP with fewer rows than ranks.
        Returns the rows to index (the split's, then the fillers) and this rank's sampler.
        """
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
        from lightning.pytorch.strategies import DDPStrategy

        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1 or not examples:
            return examples, order
        n, world, rank = len(examples), trainer.world_size, trainer.global_rank
        order = list(range(n)) if order is None else list(order)
        if isinstance(trainer.strategy, DDPStrategy) and n >= world:
            return examples, UnrepeatedDistributedSamplerWrapper(order, num_replicas=world, rank=rank, shuffle=False)
        indices, fillers = even_shards(order, world, rank)
        rows = list(examples) + [filler_row(examples[i]) for i in fillers]
        return rows, ShardSampler(rows, indices, num_replicas=world, rank=rank)

    def _consumed_train_batches(self) -> int | None:
        """Batches of the current epoch the Trainer has trained on (0 without a Trainer); ``None`` once the epoch is
        over for the Trainer (``limit_train_batches`` can end it before the loader's end)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        consumed = trainer.fit_loop.epoch_loop.batch_idx + 1
        return None if consumed >= trainer.num_training_batches else consumed

    @override
    def train_dataloader(self) -> DataLoader:
        if self.packing and self.packing_check:
            self.check_packing_on_model()
        return self._loader("train")

    def check_packing_on_model(self) -> None:
        """Probe the Trainer's model (once per model): refuse packing where packed examples would see each other."""
        from lightning_ft.modeling import hf_models

        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        if module is None:  # not attached to a Trainer (a loader asked for by hand): checked at fit
            return
        models = hf_models(module)
        if not models:
            raise ValueError(
                f"packing=True: found no Hugging Face model in {type(module).__name__} to check that packed examples "
                "stay apart. Use packing=False, or packing_check=False if you know your model supports restarting "
                "position_ids."
            )
        if self._packing_checked != id(models[0]):
            check_packing(models[0])
            self._packing_checked = id(models[0])

    @override
    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.splits:
            return []  # no validation data: Lightning skips validation
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    @override
    def predict_dataloader(self) -> DataLoader:
        # generation continues after the prompt, so prompts are left-padded
        side = "left" if self.model_task == "causal_lm" else "right"
        return self._loader("predict", padding_side=side)
