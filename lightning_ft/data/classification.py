"""Sequence classification data: ``text`` (and optionally ``text_pair``) with a ``label`` given as an int or a name."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lightning_ft.data.formats import EncodedSplit, require_columns


def infer_labels(rows: list[dict], label_column: str = "label") -> list[str]:
    """The label set of ``rows``, used when no label list is given.

    Int labels are class indices, so ``0..max`` are all classes. String labels are sorted, numerically when they are
    all integers (a CSV gives ``"2"`` where JSONL gives ``2``; both must map to the same class order).
    """
    values = {r[label_column] for r in rows}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
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
        if not labels:
            raise ValueError("classification needs a non-empty label list, e.g. labels=['negative', 'positive']")
        self.labels = [str(x) for x in labels]
        self.label2id = {name: i for i, name in enumerate(self.labels)}
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column

    def label_id(self, value: int | str, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where}: label {value!r} must be an int or a string")
        if isinstance(value, int):
            if not 0 <= value < len(self.labels):
                raise ValueError(f"{where}: label {value} is outside 0..{len(self.labels) - 1} (labels {self.labels})")
            return value
        if value not in self.label2id:
            raise ValueError(f"{where}: label {value!r} is not in the label set {self.labels}; add it to `labels`")
        return self.label2id[value]

    def _texts(self, rows: list[dict]) -> tuple[list[str], list[str] | None]:
        texts = [str(r[self.text_column]) for r in rows]
        pairs = [str(r[self.text_pair_column]) for r in rows] if self.text_pair_column else None
        return texts, pairs

    def _tokenize(self, tokenizer: PreTrainedTokenizerBase, rows: list[dict], max_length: int) -> tuple[list[dict], int]:
        texts, pairs = self._texts(rows)
        full_lengths = [len(ids) for ids in tokenizer(texts, pairs, truncation=False)["input_ids"]]
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        examples = [{k: enc[k][i] for k in keys} for i in range(len(rows))]
        return examples, sum(n > max_length for n in full_lengths)

    def encode(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, split: str) -> EncodedSplit:
        columns = [self.text_column, self.label_column] + ([self.text_pair_column] if self.text_pair_column else [])
        require_columns(rows, columns, split)
        label_ids = [self.label_id(r[self.label_column], f"{split} row {i}") for i, r in enumerate(rows)]
        examples, truncated = self._tokenize(tokenizer, rows, max_length)
        for ex, y in zip(examples, label_ids):
            ex["label"] = y
        return EncodedSplit(examples, truncated)

    def encode_for_predict(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedSplit:
        require_columns(rows, [self.text_column], "predict")
        examples, truncated = self._tokenize(tokenizer, rows, max_length)
        return EncodedSplit(examples, truncated)
