"""What every data format produces: encoded examples plus the counts logged at set-up."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

Example = dict[str, Any]  # token-id lists ("input_ids", "labels", ...) and scalars ("label")


@dataclass
class EncodedSplit:
    """A split after tokenisation.

    ``examples`` hold unpadded ``input_ids`` (and ``labels`` / ``token_type_ids`` / ``label`` / choice fields);
    ``num_truncated`` counts examples cut to ``max_length``.
    """

    examples: list[Example]
    num_truncated: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


class DataFormat(Protocol):
    """How rows of one task become token ids. One class per task: instruction, classification, text."""

    #: the model-side task this format trains ("causal_lm" or "classification")
    model_task: str

    def encode(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, split: str) -> EncodedSplit:
        """Tokenise rows for training or evaluation (labels included)."""

    def encode_for_predict(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedSplit:
        """Tokenise rows for prediction (no answer in the input)."""


def require_columns(rows: list[dict], columns: list[str], split: str, first_row: int = 0) -> None:
    """Raise a clear error when any row lacks any of ``columns`` (rows are numbered from ``first_row``)."""
    for idx, row in enumerate(rows, first_row):
        missing = [c for c in columns if c not in row]
        if missing:
            raise KeyError(
                f"{split} row {idx}: column(s) {missing} not found; the row has columns {sorted(row)}. "
                "Rename them or set the matching *_column argument of FineTuneDataModule."
            )


def describe_value(value: Any) -> str:
    """``null`` for None, else the value's type and a short repr (for messages about a field of the wrong type)."""
    if value is None:
        return "null"
    name, text = type(value).__name__, repr(value)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({text[:40] + '...' if len(text) > 40 else text})"


def require_text(rows: list[dict], columns: Iterable[str | None], split: str, first_row: int = 0) -> None:
    """Raise a clear error when a text field of any row is not a string (``null`` would train on the text "None")."""
    columns = [c for c in columns if c is not None]
    for idx, row in enumerate(rows, first_row):
        for c in columns:
            if not isinstance(row[c], str):
                raise ValueError(
                    f"{split} row {idx}: `{c}` is {describe_value(row[c])}, not a string. "
                    "Fill it in (as text) or drop the row."
                )
