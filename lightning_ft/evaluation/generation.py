"""Batched generation for evaluation: left-padded prompts, a KV cache, stop at EOS or the end of the turn.

Pure torch plus the model's own ``generate`` (transformers' ``GenerationMixin``), no Lightning. Greedy decoding by
default; ``generation_kwargs`` pass any other ``generate`` setting (``do_sample``, ``temperature``, ``top_p``,
``num_beams``, ``repetition_penalty``, ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

#: end-of-turn tokens of common chat templates; those in a tokenizer's vocabulary stop generation with its EOS
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's EOS id plus the ids of the end-of-turn tokens it knows (ChatML, Llama 3, Gemma, ...)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    if not ids:
        raise ValueError(
            "the tokenizer has no EOS token and none of the known end-of-turn tokens "
            f"{list(END_OF_TURN_TOKENS)}: generation could not stop before max_new_tokens. Set tokenizer.eos_token."
        )
    return list(dict.fromkeys(ids))


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """``tokens`` up to (not including) the first stop token."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_token_id: int,
    use_cache: bool = True,
    generation_kwargs: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Continue each prompt; return the new tokens of each row up to its first stop token.

    Args:
        model: a causal LM with ``generate`` (transformers).
        prompt_ids: (B, P) prompts, **left**-padded, so every row's next token goes to the same column.
        prompt_mask: (B, P) 1 on prompt tokens, 0 on padding.
        max_new_tokens: at most this many new tokens per row.
        stop_ids: a row stops at the first of these (see :func:`stop_token_ids`).
        pad_token_id: fills rows that stopped early.
        use_cache: reuse the keys / values of earlier positions (one token per step instead of the whole sequence).
        generation_kwargs: further ``generate`` settings; greedy (``do_sample=False``) unless they say otherwise.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_mask[:, -1].lt(1).any():
        raise ValueError("prompts must be left-padded: the last column must hold every prompt's last token")
    kwargs = {"do_sample": False, "num_beams": 1, **(generation_kwargs or {})}
    if not kwargs["do_sample"]:  # drop sampling settings a model's generation_config may carry (they warn)
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_token_id,
        use_cache=use_cache,
        **kwargs,
    )
    new = out[:, prompt_ids.shape[1] :].tolist()
    return [cut_at_stop(row, stop_ids) for row in new]


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    use_cache: bool = True,
    generation_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """:func:`generate` with the tokenizer's stop and pad tokens; the answers decoded without special tokens."""
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    rows = generate(
        model,
        prompt_ids,
        prompt_mask,
        max_new_tokens=max_new_tokens,
        stop_ids=stops,
        pad_token_id=pad,
        use_cache=use_cache,
        generation_kwargs=generation_kwargs,
    )
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
