"""AdamW parameter groups and warm-up + decay learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from torch import nn

from lightning_ft.modeling import adapter_param_names

SCHEDULES = ("linear", "cosine", "constant")


def decay_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (matrices) and an undecayed one (biases, norm weights).

    Every parameter with fewer than 2 dimensions (biases, LayerNorm / RMSNorm weights) gets no weight decay.
    """
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adapter_groups(
    module: nn.Module, weight_decay: float, lr: float, group_lr: dict[str, float] | None = None
) -> list[dict]:
    """AdamW groups for a module with adapter layers: every trainable tensor goes to the group its adapter layer
    declares (``lightning_ft.modeling.Adapter.adapter_groups``), others to ``decay`` (matrices) or ``no_decay``
    (fewer than 2 dimensions: biases, norms, DoRA magnitudes).

    Declared groups are decayed and named after the declaration (``LearningRateMonitor`` shows the name);
    ``group_lr`` sets a group's learning rate (default ``lr``). Empty groups are left out.
    """
    declared = adapter_param_names(module)
    groups: dict[str, dict] = {
        "decay": {"name": "decay", "params": [], "weight_decay": weight_decay, "lr": lr},
    }
    no_decay = {"name": "no_decay", "params": [], "weight_decay": 0.0, "lr": lr}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        group = declared.get(name, "default")
        if group != "default":
            rate = (group_lr or {}).get(group, lr)
            groups.setdefault(group, {"name": group, "params": [], "weight_decay": weight_decay, "lr": rate})
            groups[group]["params"].append(p)
        else:
            (groups["decay"] if p.ndim >= 2 else no_decay)["params"].append(p)
    return [g for g in [*groups.values(), no_decay] if g["params"]]


def loraplus_groups(module: nn.Module, weight_decay: float, lr: float, ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al., 2024): the ``lora_B`` matrices learn ``ratio`` times faster than everything else.

    Groups: matrices at ``lr`` with weight decay, ``lora_B`` (as ``LoRALinear`` declares it) at ``lr * ratio``
    with weight decay, and parameters with fewer than 2 dimensions (biases, norms, DoRA magnitudes) at ``lr``
    without weight decay. Each group has a ``name`` (``LearningRateMonitor`` shows it).
    """
    if ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be positive, got {ratio}")
    return adapter_groups(module, weight_decay, lr, {"lora_B": lr * ratio})


def warmup_decay(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then linear / cosine decay to ``min_ratio``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown scheduler {schedule!r}; choose one of {list(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * shape

    return factor
