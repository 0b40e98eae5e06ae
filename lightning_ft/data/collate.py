"""Batching: dynamic padding and the choice-scoring layout (packing: ``lightning_ft.data.packing``)."""

from __future__ import annotations

import torch

from lightning_ft.data.formats import Example

IGNORE_INDEX = -100


def _pad(seqs: list[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def texts_to_tensor(texts: list[str]) -> torch.Tensor:
    """(B, L) long: the UTF-8 bytes of each text, padded with -1 (at least one column)."""
    raw = [list(t.encode("utf-8")) for t in texts]
    return _pad(raw, -1, max(1, *map(len, raw)))


def tensor_to_texts(encoded: torch.Tensor) -> list[str]:
    """The texts of :func:`texts_to_tensor`."""
    return [bytes(row[row >= 0].tolist()).decode("utf-8") for row in encoded.cpu()]


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


class Collator:
    """Pad a list of examples to the longest in the batch (optionally to a multiple of ``pad_to_multiple_of``).

    Output keys, ``torch.long`` unless said:
      * ``input_ids`` (B, T); ``attention_mask`` (B, T), absent for packed rows (their ``position_ids`` (B, T)
        restart at 0 per example, which transformers turns into a block-diagonal causal mask);
      * ``labels``: (B, T) with -100 on prompt and padding for causal LM, or (B,) class ids for classification;
      * ``token_type_ids`` (B, T) when the tokenizer makes them;
      * for rows with choices (see ``lightning_ft.scoring``): ``choice_prompt_ids`` / ``choice_prompt_mask`` (B, P),
        the prompts left-padded; ``choice_ids`` / ``choice_mask`` (B*K, C), the K choices' tokens of each prompt,
        right-padded; ``choice_target`` (B,) the index of the right choice (-100 when unknown);
      * for evaluation rows with a free-text answer: ``gen_prompt_ids`` / ``gen_prompt_mask`` (B, P), the prompts
        left-padded for generation, and ``reference_bytes`` (B, L) the answers' UTF-8 bytes, -1 after the end
        (``tensor_to_texts`` reads them back; bytes, because a batch holds tensors only);
      * ``filler`` (B,) bool, only in a batch that holds evaluation shard fillers (``data.samplers.filler_row``):
        True on the rows that repeat another rank's row to even out the shards and must not be scored.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.left = padding_side == "left"

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        length = _round_up(max(len(e["input_ids"]) for e in examples), self.pad_to_multiple_of)
        ids = [e["input_ids"] for e in examples]
        batch = {"input_ids": _pad(ids, self.pad_token_id, length, self.left)}
        if "position_ids" in examples[0]:
            # padding is a segment of its own with positions 0, 1, ... so it never attends into an example
            pos = [e["position_ids"] + list(range(length - len(e["position_ids"]))) for e in examples]
            batch["position_ids"] = torch.tensor(pos, dtype=torch.long)
        else:
            batch["attention_mask"] = _pad([[1] * len(s) for s in ids], 0, length, self.left)
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], 0, length, self.left)
        if "labels" in examples[0]:
            batch["labels"] = _pad([e["labels"] for e in examples], IGNORE_INDEX, length, self.left)
        elif "label" in examples[0]:
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        if "choice_ids" in examples[0]:
            batch.update(self.choice_batch(examples))
        if "gen_prompt_ids" in examples[0]:
            prompts = [e["gen_prompt_ids"] for e in examples]
            prompt_len = _round_up(max(map(len, prompts)), self.pad_to_multiple_of)
            batch["gen_prompt_ids"] = _pad(prompts, self.pad_token_id, prompt_len, left=True)
            batch["gen_prompt_mask"] = _pad([[1] * len(p) for p in prompts], 0, prompt_len, left=True)
            batch["reference_bytes"] = texts_to_tensor([e["reference"] for e in examples])
        if any(e.get("filler") for e in examples):  # evaluation shard fillers (data.samplers.filler_row)
            batch["filler"] = torch.tensor([bool(e.get("filler")) for e in examples])
        return batch

    def choice_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        num_choices = {len(e["choice_ids"]) for e in examples}
        if len(num_choices) != 1:
            raise ValueError(f"every row must have the same number of choices, got {sorted(num_choices)}")
        prompts = [e["prompt_ids"] for e in examples]
        choices = [cont for e in examples for cont in e["choice_ids"]]
        prompt_len = _round_up(max(map(len, prompts)), self.pad_to_multiple_of)
        choice_len = max(map(len, choices))
        return {
            "choice_prompt_ids": _pad(prompts, self.pad_token_id, prompt_len, left=True),
            "choice_prompt_mask": _pad([[1] * len(p) for p in prompts], 0, prompt_len, left=True),
            "choice_ids": _pad(choices, self.pad_token_id, choice_len),
            "choice_mask": _pad([[1] * len(c) for c in choices], 0, choice_len),
            "choice_target": torch.tensor([e["choice_label"] for e in examples], dtype=torch.long),
        }
