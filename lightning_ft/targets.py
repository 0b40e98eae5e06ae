"""Choosing target modules by name: shared by LoRA, sparse fine-tuning and compression (pure torch)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from lightning_ft.modeling import is_linear

#: heads left out of "all-linear": they map to the vocabulary or to the labels (train them via modules_to_save)
OUTPUT_HEADS = ("lm_head", "classifier", "score", "qa_outputs", "cls", "embed_out", "output")


def _is_output_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    if name.split(".")[-1] in OUTPUT_HEADS or name.split(".")[0] in OUTPUT_HEADS:
        return True
    get_out = getattr(model, "get_output_embeddings", None)
    return callable(get_out) and get_out() is module


def select_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    exclude_modules: str | Sequence[str] | None = None,
    module_filter=is_linear,
) -> list[str]:
    """Names of the modules of ``model`` to adapt.

    ``target_modules`` is ``"all-linear"`` (every linear layer except output heads such as ``lm_head`` /
    ``classifier``), a list of names or name suffixes (``["q_proj", "v_proj"]`` matches
    ``model.layers.0.self_attn.q_proj``), or a regex string matched against the full name. ``exclude_modules``
    takes the same forms and removes matches. Raises ``ValueError`` listing the candidate names when a listed name
    matches nothing, or when nothing is selected.

    The two factors of a factorised layer (a module with ``factorized_linear = True``, such as
    ``lightning_ft.compress.LowRankLinear``) also answer to that layer's name: after compression, ``["q_proj"]``
    selects ``...q_proj.first`` and ``...q_proj.second``.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and module_filter(m)]
    names = [n for n, _ in candidates]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no linear layers to adapt")
    aliases = _factor_owners(model, names)
    if target_modules == "all-linear":
        chosen = [n for n, m in candidates if not _is_output_head(model, n, m)]
    else:
        chosen = _match(names, target_modules, "target_modules", aliases)
    if exclude_modules:
        excluded = set(_match(names, exclude_modules, "exclude_modules", aliases))
        chosen = [n for n in chosen if n not in excluded]
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} selects no module; candidates: {_summary(names)}")
    return chosen


def _factor_owners(model: nn.Module, names: list[str]) -> dict[str, str]:
    """``{factor name: owner name}`` for candidates that are direct children of a factorised layer."""
    owners = {n for n, m in model.named_modules() if n and getattr(m, "factorized_linear", False)}
    return {n: n.rpartition(".")[0] for n in names if n.rpartition(".")[0] in owners}


def _match(names: list[str], spec: str | Sequence[str], what: str, aliases: dict[str, str] | None = None) -> list[str]:
    aliases = aliases or {}
    if isinstance(spec, str):
        pattern = re.compile(spec)
        found = [n for n in names if pattern.fullmatch(n) or (n in aliases and pattern.fullmatch(aliases[n]))]
        if not found:
            raise ValueError(f"{what} regex {spec!r} matches none of the linear layers: {_summary(names)}")
        return found
    found = []
    for key in spec:
        hits = [n for n in names if any(a == key or a.endswith("." + key) for a in (n, aliases.get(n, n)))]
        if not hits:
            raise ValueError(f"{what}: no linear layer named {key!r}; candidates: {_summary(names)}")
        found += hits
    return [n for n in names if n in set(found)]


def _summary(names: list[str]) -> str:
    """Distinct last name parts (``q_proj``, ``v_proj``, ...) plus a few full names, for error messages."""
    suffixes = sorted({n.split(".")[-1] for n in names})
    return f"suffixes {suffixes}; e.g. {names[:3]}"


def match_pattern(name: str, patterns: dict[str, int | float] | None, default: int | float) -> int | float:
    """The value of the first regex key in ``patterns`` that matches ``name`` (``re.search``), else ``default``."""
    for key, value in (patterns or {}).items():
        if re.search(key, name):
            return value
    return default
