"""Plain-text corpora for causal-LM training and perplexity: documents joined by EOS and cut into fixed blocks."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lightning_ft.data.formats import EncodedSplit, require_columns, require_text


class TextFormat:
    """Rows with a ``text`` column. Every token is a label; blocks are ``max_length`` long (the last may be shorter)."""

    model_task = "causal_lm"

    def __init__(self, text_column: str = "text") -> None:
        self.text_column = text_column

    def encode(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, split: str) -> EncodedSplit:
        require_columns(rows, [self.text_column], split)
        require_text(rows, [self.text_column], split)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream: list[int] = []
        for ids in tokenizer([r[self.text_column] for r in rows], add_special_tokens=False)["input_ids"]:
            stream.extend(ids + eos)
        blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
        examples = [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]
        return EncodedSplit(examples, num_truncated=0, extra={"documents": len(rows)})

    def encode_for_predict(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedSplit:
        require_columns(rows, [self.text_column], "predict")
        require_text(rows, [self.text_column], "predict")
        enc = tokenizer([r[self.text_column] for r in rows], truncation=True, max_length=max_length)
        return EncodedSplit([{"input_ids": ids} for ids in enc["input_ids"]])
