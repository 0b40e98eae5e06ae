"""``FineTuneDataModule``: one data module for every method and task."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_ft.data.classification import ClassificationFormat, check_label_names, infer_labels
from lightning_ft.data.collate import Collator
from lightning_ft.data.formats import DataFormat, EncodedSplit
from lightning_ft.data.instruction import InstructionFormat
from lightning_ft.data.packing import check_packing, pack_examples
from lightning_ft.data.resumable import ResumableDataLoader
from lightning_ft.data.samplers import EpochShuffleSampler, LengthGroupedSampler
from lightning_ft.data.sources import Source, load_rows, split_rows
from lightning_ft.data.text import TextFormat

log = logging.getLogger(__name__)

Task = Literal["instruction", "classification", "text"]
TASKS = ("instruction", "classification", "text")
#: the model-side task each data task trains (used by the CLI to configure the module)
MODEL_TASK = {"instruction": "causal_lm", "classification": "classification", "text": "causal_lm"}


def model_task_for(task: str) -> str:
    """``"instruction"`` / ``"text"`` -> ``"causal_lm"``; ``"classification"`` -> ``"classification"``."""
    if task not in MODEL_TASK:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return MODEL_TASK[task]


class FineTuneDataModule(L.LightningDataModule):
    """Tokenises, batches and (optionally) packs data for any ``lightning-ft`` module or a user's own.

    Args:
        tokenizer: a tokenizer, or a model name / path / short name for ``lightning_ft.models.load_tokenizer``.
        task: ``"instruction"`` (``messages`` or ``prompt`` / ``response`` columns), ``"classification"``
            (``text``, optional ``text_pair``, ``label``) or ``"text"`` (a plain corpus cut into blocks).
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
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        task: Task = "instruction",
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
    ) -> None:
        super().__init__()
        model_task_for(task)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if packing and task == "classification":
            raise ValueError("packing applies to causal-LM tasks ('instruction', 'text'), not 'classification'")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        for name, value in (("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for all rows), got {value!r}")
        if labels is not None and task == "classification":
            check_label_names(labels)  # refuses a string, an empty list and duplicate names
        # "task" is saved as "data_task": Lightning merges module and data hparams for loggers and refuses a key
        # with two values, and the module's task ("causal_lm") differs from the data task ("instruction")
        self.save_hyperparameters(ignore=["tokenizer", "train", "val", "test", "predict", "task"])
        self.hparams["data_task"] = task
        self._tokenizer = tokenizer
        self.sources = {"train": train, "val": val, "test": test, "predict": predict}
        self.task = task
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
            prompt_column=prompt_column, response_column=response_column, messages_column=messages_column,
            choices_column=choices_column, system_prompt=system_prompt, text_column=text_column,
            text_pair_column=text_pair_column, label_column=label_column,
        )  # fmt: skip
        self.max_examples = {"train": max_train_examples, "val": max_eval_examples, "test": max_eval_examples}
        self.splits: dict[str, EncodedSplit] = {}
        self.format: DataFormat | None = None

    # ---- set-up ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if isinstance(self._tokenizer, str):
            from lightning_ft.models import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    def make_format(self, rows: dict[str, list[dict]]) -> DataFormat:
        c = self.columns
        if self.task == "instruction":
            keys = ("prompt_column", "response_column", "messages_column", "choices_column", "system_prompt")
            return InstructionFormat(**{k: c[k] for k in keys})
        if self.task == "text":
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

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        rows = self.read_splits()
        self.format = self.make_format(rows)
        for name, split_rows_ in rows.items():
            if name == "predict":
                self.splits[name] = self.format.encode_for_predict(split_rows_, self.tokenizer, self.max_length)
            else:
                self.splits[name] = self.format.encode(split_rows_, self.tokenizer, self.max_length, name)
        if self.packing and "train" in self.splits:
            unpacked = self.splits["train"]
            packed = pack_examples(unpacked.examples, self.max_length, self.seed)
            self.splits["train"] = EncodedSplit(packed, unpacked.num_truncated, {"unpacked_examples": len(unpacked.examples)})
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
        batch_size = self.batch_size if name == "train" else self.eval_batch_size
        order = list(range(len(lengths)))
        if name == "train" and self.group_by_length:
            order = list(LengthGroupedSampler(lengths, batch_size, self.seed))
        elif name in ("val", "test") and self.group_by_length:
            order = sorted(order, key=lambda i: -lengths[i])
        elif name == "train":
            order = list(EpochShuffleSampler(len(lengths), self.seed))
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

    def _loader(self, name: str, shuffle: bool, padding_side: str = "right") -> DataLoader:
        if name not in self.splits:
            raise RuntimeError(f"no {name} data: pass `{name}=` to FineTuneDataModule (or a {name}_fraction)")
        examples = self.splits[name].examples
        batch_size = self.batch_size if name == "train" else self.eval_batch_size
        sampler = None
        if shuffle:  # seeded per epoch, so a resumed run sees the same order as an unbroken one
            lengths = [len(e["input_ids"]) for e in examples]
            if self.group_by_length:
                sampler = LengthGroupedSampler(lengths, batch_size, self.seed)
            else:
                sampler = EpochShuffleSampler(len(examples), self.seed)
            shuffle = False
        elif self.group_by_length and name in ("val", "test"):
            # metrics do not depend on the order, so evaluate longest first with little padding
            sampler = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
        kwargs: dict[str, Any] = dict(
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            collate_fn=Collator(self.pad_token_id, self.pad_to_multiple_of, padding_side),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if name == "train":  # resumes mid-epoch with the batches an unbroken run sees
            return ResumableDataLoader(examples, consumed_batches=self._consumed_train_batches, **kwargs)
        return DataLoader(examples, **kwargs)

    def _consumed_train_batches(self) -> int:
        """Batches of the current epoch the Trainer has trained on (0 without a Trainer)."""
        trainer = getattr(self, "trainer", None)
        return trainer.fit_loop.epoch_loop.batch_idx + 1 if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        if self.packing and self.packing_check:
            self.check_packing_on_model()
        return self._loader("train", shuffle=True)

    def check_packing_on_model(self) -> None:
        """Probe the Trainer's model (once per model): refuse packing when packed examples would attend to each other."""
        from lightning_ft.strategies.sharding import hf_models

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

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.splits:
            return []  # no validation data: Lightning skips validation
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        # generation continues after the prompt, so prompts are left-padded
        side = "left" if self.format is not None and self.format.model_task == "causal_lm" else "right"
        return self._loader("predict", shuffle=False, padding_side=side)
