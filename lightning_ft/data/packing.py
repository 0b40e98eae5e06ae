"""Packing several causal-LM examples into one row, and the check that a model keeps packed examples apart.

A packed row has no attention mask: its ``position_ids`` restart at 0 for every example, and transformers derives a
block-diagonal causal mask from them for the architectures that support it (Llama, Qwen2, Mistral, Gemma, GPT-2,
GPT-NeoX, Phi, ... with the eager / SDPA / flash attention implementations; BERT used as a causal LM from transformers
5.25). Others (OPT's learned positions, BERT before 5.25, custom code) ignore restarting positions and let each example
attend to the ones before it, silently; which ones do changes between transformers versions. ``check_packing``
therefore runs the real model once on a packed probe and refuses packing when an example's logits depend on what was
packed before it.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from lightning_ft.data.formats import Example

IGNORE_INDEX = -100


class PackingError(ValueError):
    """The model lets packed examples attend to each other."""


def pack_examples(examples: list[Example], max_length: int, seed: int) -> list[Example]:
    """Greedily pack shuffled causal-LM examples into rows of at most ``max_length`` tokens.

    Each packed row holds ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 for every example. The label
    of each example's first token is set to -100: in an unpacked row that token is never a target, and in a packed
    row it must not become the target of the previous example's last token. Packed logits equal those of each
    example run alone.
    """
    if "labels" not in examples[0] or "label" in examples[0]:
        raise ValueError("packing applies to causal-LM data (instruction or text), not to classification")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[Example] = []
    current: Example = {"input_ids": [], "labels": [], "position_ids": []}
    for i in order:
        ids, labels = examples[i]["input_ids"], examples[i]["labels"]
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX] + labels[1:]
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        rows.append(current)
    return rows


def _probe_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(leak, mismatch) tolerances relative to the logits' largest magnitude, for logits of ``dtype``."""
    if dtype in (torch.float32, torch.float64):
        return 1e-5, 1e-4
    return 1e-3, 5e-2  # half precision: other sequence lengths round differently


@torch.no_grad()
def packing_probe(model: nn.Module, vocab_size: int, seed: int = 0) -> tuple[float, float, torch.dtype]:
    """How much an example's logits change when packed behind another one: ``(leak, mismatch, logits dtype)``.

    Runs one batch of two packed rows ``[A, C]`` and ``[B, C]`` (random tokens, ``position_ids`` restarting at C) and C
    alone. ``leak`` is the largest difference of C's logits between the two rows (same shapes, so exact when nothing
    leaks), ``mismatch`` the largest difference between packed C and C alone; both relative to the largest logit of C
    alone. ``model`` is a Hugging Face causal LM (it takes ``input_ids``, ``position_ids`` and ``use_cache``).
    """
    g = torch.Generator().manual_seed(seed)
    low = min(10, vocab_size - 1)
    a, b, c = (torch.randint(low, vocab_size, (n,), generator=g) for n in (7, 7, 9))
    device = next(model.parameters()).device
    ids = torch.stack([torch.cat([a, c]), torch.cat([b, c])]).to(device)
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(c))]).expand(2, -1).to(device)
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, len(a) :].float()
        alone = model(
            input_ids=c[None].to(device), position_ids=torch.arange(len(c))[None].to(device), use_cache=False
        ).logits
    finally:
        model.train(was_training)
    dtype = alone.dtype
    alone = alone.float()
    scale = max(float(alone.abs().max()), 1.0)
    leak = float((packed[0] - packed[1]).abs().max()) / scale
    mismatch = float((packed - alone).abs().max()) / scale
    return leak, mismatch, dtype


def check_packing(model: nn.Module, vocab_size: int | None = None) -> None:
    """Raise ``PackingError`` unless ``model`` keeps packed examples apart (see ``packing_probe``).

    ``vocab_size`` bounds the probe's random token ids; default: the model's input embedding size.
    """
    name = type(model).__name__
    if vocab_size is None:
        vocab_size = model.get_input_embeddings().num_embeddings
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    try:
        leak, mismatch, dtype = packing_probe(model, vocab_size)
    except Exception as err:  # e.g. a forward that takes no position_ids
        raise PackingError(
            f"packing=True needs a causal LM that takes restarting `position_ids`; {name} failed on a packed probe "
            f"({type(err).__name__}: {err}). Use packing=False."
        ) from err
    max_leak, max_mismatch = _probe_tolerance(dtype)
    if leak > max_leak or mismatch > max_mismatch:
        raise PackingError(
            f"packing=True would let examples attend to each other in {name} (attention implementation {attn!r}): "
            f"an example's logits change by {leak:.2e} with the example packed before it, and differ by "
            f"{mismatch:.2e} from the example alone (relative to its largest logit). This architecture ignores "
            "restarting position_ids. Use packing=False (or an architecture that supports packed position_ids, "
            "e.g. Llama, Qwen2, Mistral, Gemma, GPT-2, GPT-NeoX, Phi)."
        )
