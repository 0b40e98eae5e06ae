"""Sequence classification data: ``text`` (and optionally ``text_pair``) with a ``label`` given as an int or a name.

An int label is a class index into the label set, a string label a class name. One split may not mix the two kinds
(``1`` next to ``"negative"`` would silently mean ``labels[1]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.utilities import rank_zero_warn
from transformers import PreTrainedTokenizerBase

from lightning_ft.data.formats import EncodedSplit, describe_value, require_columns, require_text


def check_label_names(labels: Sequence) -> list[str]:
    """``labels`` as a list of distinct strings; a clear error for a string, an empty list or duplicate names."""
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise ValueError(f"`labels` must be a list of class names, e.g. ['negative', 'positive'], got {labels!r}")
    if not labels:
        raise ValueError("classification needs a non-empty label list, e.g. labels=['negative', 'positive']")
    names = [str(x) for x in labels]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"`labels` {names} name {dupes} more than once; each class needs exactly one name. Remove the duplicates."
        )
    return names


def check_label_values(rows: list[dict], label_column: str, split: str) -> None:
    """Every label is an int or a non-empty string, and a split holds only one of the two kinds."""
    first: dict[str, tuple[int, int | str]] = {}  # kind -> (row, value) of its first occurrence
    for idx, row in enumerate(rows):
        value = row[label_column]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(
                f"{split} row {idx}: label {describe_value(value)} must be an int (a class index) or a string "
                "(a class name). Fix the label or drop the row."
            )
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{split} row {idx}: the label is empty (a missing value?). Fill it in or drop the row.")
        kind = "int" if isinstance(value, int) else "string"
        first.setdefault(kind, (idx, value))
        if len(first) == 2:
            other = "string" if kind == "int" else "int"
            other_idx, other_value = first[other]
            raise ValueError(
                f"{split} row {idx}: label {value!r} is {'an' if kind == 'int' else 'a'} {kind} but row {other_idx} "
                f"has the {other} label {other_value!r}. An int label is a class index and a string label a class "
                "name, so one split cannot mix them. Write every label as a name (e.g. 'positive') or every label "
                "as an index."
            )


def infer_labels(rows: list[dict], label_column: str = "label", split: str = "train") -> list[str]:
    """The label set of ``rows``, used when no label list is given.

    Int labels are class indices, so ``0..max`` are all classes. String labels are sorted, numerically when they are
    all integers (a CSV gives ``"2"`` where JSONL gives ``2``; both must map to the same class order). Rows without
    ``label_column``, labels that are neither ints nor strings, and a mix of the two kinds are refused.
    """
    require_columns(rows, [label_column], split)
    check_label_values(rows, label_column, split)
    values = {r[label_column] for r in rows}
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    names = {str(v) for v in values}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


class ClassificationFormat:
    """Rows with a text column, an optional text-pair column and a label column.

    ``labels`` is the ordered label set: a string label maps to its index in it; an int label must lie in
    ``range(len(labels))``.
    """

    model_task = "classification"

    def __init__(
        self,
        labels: list[str],
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
    ) -> None:
        self.labels = check_label_names(labels)
        self.label2id = {name: i for i, name in enumerate(self.labels)}
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column

    def label_id(self, value: int | str, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(
                f"{where}: label {describe_value(value)} must be an int (a class index) or a string (a class name). "
                "Fix the label or drop the row."
            )
        if isinstance(value, int):
            if not 0 <= value < len(self.labels):
                raise ValueError(
                    f"{where}: label {value} is outside 0..{len(self.labels) - 1} (labels {self.labels}); an int "
                    "label is a class index. Fix the label or give `labels` with every class."
                )
            return value
        if value not in self.label2id:
            raise ValueError(f"{where}: label {value!r} is not in the label set {self.labels}; add it to `labels`")
        return self.label2id[value]

    def warn_missing_classes(self, label_ids: list[int], split: str) -> None:
        """Warn when ``split`` has rows of fewer than two classes, or lacks a class of the label set."""
        present = set(label_ids)
        missing = [name for i, name in enumerate(self.labels) if i not in present]
        if len(present) == 1:
            only = self.labels[next(iter(present))]
            rank_zero_warn(
                f"{split} split: every row has the label {only!r}, so the model can only learn to predict that "
                f"class (label set {self.labels}). Add {split} rows of the other classes."
            )
        elif missing:
            rank_zero_warn(
                f"{split} split: no row has the label(s) {missing} of the label set {self.labels}, so the model "
                f"never learns to predict them. Add {split} rows of these classes or remove them from `labels`."
            )

    def _texts(self, rows: list[dict]) -> tuple[list[str], list[str] | None]:
        texts = [r[self.text_column] for r in rows]
        pairs = [r[self.text_pair_column] for r in rows] if self.text_pair_column else None
        return texts, pairs

    def _tokenize(
        self, tokenizer: PreTrainedTokenizerBase, rows: list[dict], max_length: int
    ) -> tuple[list[dict], int]:
        texts, pairs = self._texts(rows)
        full_lengths = [len(ids) for ids in tokenizer(texts, pairs, truncation=False)["input_ids"]]
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        examples = [{k: enc[k][i] for k in keys} for i in range(len(rows))]
        return examples, sum(n > max_length for n in full_lengths)

    def encode(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, split: str) -> EncodedSplit:
        columns = [self.text_column, self.label_column] + ([self.text_pair_column] if self.text_pair_column else [])
        require_columns(rows, columns, split)
        require_text(rows, [self.text_column, self.text_pair_column], split)
        check_label_values(rows, self.label_column, split)
        label_ids = [self.label_id(r[self.label_column], f"{split} row {i}") for i, r in enumerate(rows)]
        if split == "train":
            self.warn_missing_classes(label_ids, split)
        examples, truncated = self._tokenize(tokenizer, rows, max_length)
        for ex, y in zip(examples, label_ids):
            ex["label"] = y
        return EncodedSplit(examples, truncated)

    def encode_for_predict(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedSplit:
        columns = [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])
        require_columns(rows, columns, "predict")
        require_text(rows, columns, "predict")
        examples, truncated = self._tokenize(tokenizer, rows, max_length)
        return EncodedSplit(examples, truncated)
