"""Per-input-channel activation statistics of chosen linear layers, from calibration forwards (pure torch).

``calibration`` is either an iterable of batches, each run as ``model(**batch)`` (a dict), ``model(*batch)`` (a
tuple or list) or ``model(batch)`` (anything else), with tensors moved to the model's device; or a callable
``calibration(model)`` that runs the forwards itself (for models whose forward wants something else). Forwards run
in eval mode without gradients; the modules' train / eval modes are restored afterwards. Under
``torch.distributed`` the statistics are summed over all ranks, so every rank computes the same factorisation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

Calibration = Iterable[Any] | Callable[[nn.Module], Any]
Statistic = Literal["abs_mean", "rms"]
STATISTICS = ("abs_mean", "rms")


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor inside (dicts, lists, tuples) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def run_batch(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def _all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sum each tensor over all ranks (one collective for all of them); unchanged outside ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return tensors
    flat = torch.cat([t.double().flatten() for t in tensors])
    device = flat.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t).to(device=device, dtype=t.dtype))
        i += t.numel()
    return out


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module,
    names: Sequence[str],
    calibration: Calibration | None,
    statistic: Statistic = "abs_mean",
    max_batches: int | None = None,
) -> dict[str, Tensor]:
    """``{name: stat}`` with ``stat`` (in_features,) float32: mean ``|x_j|`` or ``sqrt(mean x_j^2)`` of the input
    feature ``j`` of module ``name``, over every token of every calibration batch (padding included).

    Raises ``ValueError`` when there is no calibration, it yields no batch, or no forward reaches the modules.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown activation statistic {statistic!r}; choose one of {list(STATISTICS)}")
    if calibration is None:
        raise ValueError(
            "activation-aware compression (method='asvd') needs calibration data: pass calibration= an iterable "
            "of batches (dicts run as model(**batch)) or a callable that runs model forwards"
        )
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            part = x.abs().sum(0) if statistic == "abs_mean" else x.square().sum(0)
            sums[name] = sums[name] + part if name in sums else part
            counts[name] += x.shape[0]

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        batches = _run(model, calibration, max_batches)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if batches == 0:
        raise ValueError("the calibration data gave no batches; asvd needs at least one")
    silent = [n for n in names if counts[n] == 0]
    if silent:
        raise ValueError(f"no calibration forward reached {len(silent)} targeted layers, e.g. {silent[:3]}")
    reduced = _all_reduce_sum([sums[n] for n in names] + [torch.tensor([float(counts[n]) for n in names])])
    totals = reduced[-1]
    stats = {}
    for i, n in enumerate(names):
        mean = reduced[i] / totals[i].item()
        stats[n] = mean if statistic == "abs_mean" else mean.sqrt()
    return stats


def _run(model: nn.Module, calibration: Calibration, max_batches: int | None) -> int:
    """Run the calibration forwards; the number of batches (1 for a callable)."""
    if callable(calibration) and not isinstance(calibration, (nn.Module, Tensor)):
        calibration(model)
        return 1
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batches = iter(calibration)
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    n = 0
    for batch in batches:
        run_batch(model, move_to(batch, device))
        n += 1
    return n
