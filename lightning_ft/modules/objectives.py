"""Pure-torch losses shared by the modules: causal-LM token sums and multiple-choice log-likelihood scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def causal_lm_sums(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token NLL over unmasked targets.

    Args:
        logits: (B, T, V); position t predicts token t + 1.
        labels: (B, T) token ids, -100 where no loss is taken (prompt, padding).

    Returns:
        ``(nll_sum, num_tokens, num_correct)``, scalars: summed NLL in float32, the number of targets, and how many of
        them the argmax predicts. The mean loss is ``nll_sum / num_tokens``.
    """
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # only the unmasked positions go through log-softmax: with prompt masking most positions are skipped
    picked = logits[mask].float()
    target = targets[mask]
    nll_sum = F.cross_entropy(picked, target, reduction="sum")
    num_correct = (picked.argmax(-1) == target).sum()
    return nll_sum, mask.sum(), num_correct


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed log-probability of the unmasked targets of each row.

    Args:
        logits: (N, T, V); labels: (N, T) with -100 outside the scored span.

    Returns:
        (N,) float32 log P(scored tokens | preceding tokens).
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def choice_scores(logits: Tensor, labels: Tensor, num_rows: int) -> Tensor:
    """Log-likelihood of each choice: (B*K, T, V) logits and (B*K, T) choice labels -> (B, K) scores."""
    return sequence_logprobs(logits, labels).view(num_rows, -1)
