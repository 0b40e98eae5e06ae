"""``GradientMask``: mask mode, where dense weights train but entries outside the mask never move (pure torch).

An unselected entry could move three ways, and each is closed:

- its gradient: ``mask_gradients`` sets it to exactly zero (call it after backward, gradient accumulation and AMP
  unscaling, before clipping; the ``SparseMask`` callback calls it in ``on_before_optimizer_step``; for plain
  training loops ``attach`` calls it in a step pre-hook);
- optimizer state: a gradient that is zero from the first step keeps Adam's moments (and SGD's momentum) exactly
  zero there, so the update ``-lr * 0 / (sqrt(0) + eps)`` is exactly zero; re-selection zeroes the state of every
  entry it adds or drops (``lightning_ft.sparse.reselect``);
- weight decay: decoupled decay (AdamW, or ``decoupled_weight_decay=True``) shrinks every entry. ``attach`` takes it
  over: the groups holding masked weights get ``weight_decay=0`` and, after each step, their parameters are decayed by
  ``1 - lr * weight_decay`` (masked weights at selected entries only), i.e. the same decay applied just after the
  update instead of just before it (a difference of order ``lr**2 * weight_decay``). Coupled decay (Adam's default,
  SGD) enters the gradient and the momentum, so for it, and for optimizers not known to leave zero-gradient entries
  alone, the masked weights are copied before each step and their unselected entries restored after it: exact for
  any optimizer, at the cost of one copy of the masked weights during the step.

Memory: mask mode keeps dense gradients and dense optimizer state, i.e. the memory of full fine-tuning of the
targeted weights, plus a bool mask (one byte per entry). Delta mode is the mode that saves memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_ft.sparse.layer import SparseLinear

#: optimizers that leave an entry with zero gradient and zero state exactly where it is (weight decay aside)
ZERO_GRADIENT_STILL = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.SGD,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


def is_decoupled(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``optimizer`` applies ``group``'s weight decay as ``p *= 1 - lr * wd`` (AdamW style)."""
    return isinstance(optimizer, torch.optim.AdamW) or (
        isinstance(optimizer, (torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam))
        and bool(group.get("decoupled_weight_decay", False))
    )


class GradientMask:
    """Keeps the mask-mode ``SparseLinear`` weights of a model fixed outside their ``indices`` (see the module doc).

    ``frozen[p]`` is the bool mask (True = must not move) of each masked weight ``p``, shaped like ``p``.
    """

    def __init__(self, layers: Mapping[str, SparseLinear]) -> None:
        self.layers = {n: layer for n, layer in layers.items() if layer.values is None}
        self.frozen: dict[Tensor, Tensor] = {}
        self.refresh()
        self._handles: list[Any] = []
        # (optimizer, group index, weight decay taken over); by index: load_state_dict replaces the group dicts
        self._decay: list[tuple[torch.optim.Optimizer, int, float]] = []
        self._restore: list[Tensor] = []  # masked weights restored after each step
        self._saved: dict[Tensor, Tensor] = {}
        self._mask_in_step = True

    def refresh(self) -> None:
        """Rebuild the masks from the layers' ``indices`` (after re-selection)."""
        self.frozen = {}
        for layer in self.layers.values():
            w = layer.base_layer.weight
            frozen = torch.ones(w.shape, dtype=torch.bool, device=w.device)
            frozen.view(-1)[layer.indices] = False
            self.frozen[w] = frozen

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient of every masked weight outside its mask."""
        for p, frozen in self.frozen.items():
            if p.grad is not None:
                p.grad.masked_fill_(frozen, 0)

    def attach(self, optimizer: torch.optim.Optimizer, mask_in_step: bool = True) -> None:
        """Take over ``optimizer``'s weight decay where it would move masked entries, and hook its ``step``.

        ``mask_in_step=False`` leaves the gradient masking to the caller: Lightning runs the optimizer's step
        pre-hooks before the closure (forward and backward), i.e. before the last micro-batch's gradient exists.
        """
        self._mask_in_step = mask_in_step
        still = isinstance(optimizer, ZERO_GRADIENT_STILL)
        for i, group in enumerate(optimizer.param_groups):
            masked = [p for p in group["params"] if p in self.frozen]
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            if not masked or (still and wd == 0):
                continue
            if still and is_decoupled(optimizer, group):
                self._decay.append((optimizer, i, wd))
                group["weight_decay"] = 0.0
            else:
                self._restore += masked
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def detach(self) -> None:
        """Remove the hooks and hand the weight decay back to the optimizer."""
        for h in self._handles:
            h.remove()
        for optimizer, i, wd in self._decay:
            optimizer.param_groups[i]["weight_decay"] = wd
        self._handles, self._decay, self._restore, self._saved = [], [], [], {}

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._mask_in_step:
            self.mask_gradients()
        mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._saved = {p: p.detach().clone() for p in self._restore if id(p) in mine}

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, saved in self._saved.items():
            p.copy_(torch.where(self.frozen[p], saved, p))
        self._saved = {}
        for opt, i, wd in self._decay:
            if opt is not optimizer:
                continue
            group = optimizer.param_groups[i]
            factor = 1 - float(group["lr"]) * wd
            for p in group["params"]:
                if p.grad is None:  # as AdamW: parameters without a gradient are not decayed
                    continue
                if p in self.frozen:
                    p.copy_(torch.where(self.frozen[p], p, p * factor))
                else:
                    p.mul_(factor)
