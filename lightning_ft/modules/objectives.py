"""Pure-torch losses shared by the modules: next-token sums and multiple-choice log-likelihood scores.

Causal-LM losses work on the *target positions* only: the positions t whose next token t + 1 has a label. With prompt
masking that is a small share of all positions, so the model is asked for logits there alone (transformers'
``logits_to_keep``), which skips most of the vocabulary projection and its backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def target_mask(labels: Tensor) -> Tensor:
    """(B, T) bool: True at position t when ``labels[:, t + 1]`` is a target (position t predicts it)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def next_token_targets(labels: Tensor) -> Tensor:
    """(N,) the target token ids, in the row-major order of ``target_mask(labels)``'s True positions."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def token_sums(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(nll_sum, num_tokens, num_correct)`` of (N, V) logits against (N,) targets; NLL in float32."""
    logits = logits.float()
    nll_sum = F.cross_entropy(logits, targets, reduction="sum")
    num_correct = (logits.argmax(-1) == targets).sum()
    return nll_sum, torch.tensor(targets.numel(), device=targets.device), num_correct


def causal_lm_sums(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``token_sums`` from full (B, T, V) logits and (B, T) labels (-100 where no loss is taken)."""
    return token_sums(logits[target_mask(labels)], next_token_targets(labels))


def row_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed log-probability of each row's targets.

    Args:
        logits: (N, V) at the True positions of ``target_mask(labels)``, row-major.
        labels: (R, T), -100 outside the scored span.

    Returns:
        (R,) float32 log P(scored tokens | preceding tokens).
    """
    targets = next_token_targets(labels)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    rows = target_mask(labels).nonzero()[:, 0]
    return torch.zeros(labels.shape[0], device=logp.device).index_add_(0, rows, logp)
