"""Multiple-choice scoring of a causal LM: log P(choice | prompt) with one forward pass over each prompt.

The prompt is run once (left-padded, so its last token sits in the same column of every row and only that
column's logits are computed); its key/value cache is then repeated for the K choices and only the choice tokens
are run. Scoring K choices therefore costs about one prompt pass instead of K passes over prompt + choice.
Works with any Hugging Face causal LM that takes a KV cache and ``position_ids``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers >= 5.2) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_logits_only(model: nn.Module) -> dict:
    """``logits_to_keep=1`` for models that take it (transformers' causal LMs): skip the other positions' logits."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def score_choices(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    choice_ids: Tensor,
    choice_mask: Tensor,
) -> Tensor:
    """Summed log-probability of each choice's tokens after its prompt.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=..., position_ids=...)``.
        prompt_ids: (B, P) prompts, **left**-padded.
        prompt_mask: (B, P) 1 on prompt tokens, 0 on padding.
        choice_ids: (B*K, C) the K choices of each prompt (rows ``b*K .. b*K+K-1``), right-padded.
        choice_mask: (B*K, C) 1 on choice tokens, 0 on padding; every choice has at least one token.

    Returns:
        (B, K) float32 log P(choice | prompt).
    """
    batch, num_choices = prompt_ids.shape[0], choice_ids.shape[0] // prompt_ids.shape[0]
    if prompt_mask[:, -1].lt(1).any():
        raise ValueError("prompts must be left-padded: the last column must hold every prompt's last token")
    if choice_mask[:, 0].lt(1).any():
        raise ValueError("every choice needs at least one token")
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=prompt_pos,
        use_cache=True,
        **_last_logits_only(model),
    )
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # (B, V): predicts each choice's first token
    first = first.repeat_interleave(num_choices, 0).gather(-1, choice_ids[:, :1]).squeeze(-1)  # (B*K,)
    if choice_ids.shape[1] == 1:
        return first.view(batch, num_choices)

    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers >= 5.2 renamed it
    cache.batch_repeat_interleave(num_choices)
    lengths = prompt_mask.sum(-1).repeat_interleave(num_choices)  # (B*K,)
    steps = torch.arange(choice_ids.shape[1], device=choice_ids.device)
    rest = model(
        input_ids=choice_ids,
        attention_mask=torch.cat([prompt_mask.repeat_interleave(num_choices, 0), choice_mask], 1),
        position_ids=lengths[:, None] + steps,
        use_cache=True,
        **{_cache_argument(model): cache},
    ).logits[:, :-1]  # (B*K, C-1, V): position j predicts choice token j + 1
    logp = torch.log_softmax(rest.float(), -1).gather(-1, choice_ids[:, 1:, None]).squeeze(-1)
    total = first + (logp * choice_mask[:, 1:]).sum(-1)
    return total.view(batch, num_choices)
