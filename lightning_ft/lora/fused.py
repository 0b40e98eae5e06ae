"""Fused LoRA inputs for sibling projections that read the same activations (pure torch).

Hugging Face attention calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` with one tensor ``x`` (and the MLP
``gate_proj(x)``, ``up_proj(x)``). ``FusedInput`` makes the first sibling called compute ``x @ [A_q; A_k; A_v]^T``
(..., r_q + r_k + r_v) with one GEMM and hands the others their slice; autograd then also fuses the backward: one
GEMM for the input gradient of all the A's and one for their weight gradient. Ranks may differ (the slices do).

Nothing else changes: each ``LoRALinear`` keeps its own ``lora_A`` / ``lora_B`` parameters, so state dicts, peft
export / import, merge / unmerge, DDP and FSDP2 (which shards per parameter) see the unfused layers. The group is a
plain object referenced from each member, not a submodule.

A cached product is reused only by a sibling that is called with the very same tensor object (same version counter,
same grad / inference mode, unchanged A's) and that has not taken its slice yet; anything else recomputes. A group
whose members never consume one product together (cross-attention: ``q`` reads the decoder, ``k`` / ``v`` the
encoder) turns itself off at the first such miss, so it never costs more than one wasted product. Under
``torch.compile`` the layers run unfused (the compiler sees plain per-layer matmuls).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_ft.lora.layer import LoRALinear

# Sibling names that Hugging Face models call with one input: (Llama, Qwen2, Mistral, Phi, ...), BERT, T5, Mixtral
# experts / DBRX style, DistilBERT, GPT-NeoX-style MLPs.
FUSE_SETS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"q", "k", "v"}),
    frozenset({"w1", "w3"}),
    frozenset({"q_lin", "k_lin", "v_lin"}),
    frozenset({"wi_0", "wi_1"}),
)


class FusedInput:
    """The shared ``x @ A^T`` of a group of sibling ``LoRALinear`` layers (see the module docstring).

    ``lora_input(layer, x)`` returns ``layer``'s (..., r) slice of ``x @ [A_1; ...; A_k]^T`` or ``None`` when the
    layer should compute its own (group off, compiling).
    """

    def __init__(self, layers: list[LoRALinear]) -> None:
        self.layers = layers
        self.enabled = True
        self.completed = False  # a product was consumed by every member at least once
        self._clear()

    def _clear(self) -> None:
        self._x: Tensor | None = None
        self._key: tuple | None = None
        self._parts: tuple[Tensor, ...] = ()
        self._pending: set[int] = set()

    def _key_of(self, x: Tensor) -> tuple:
        return (
            -1 if x.is_inference() else x._version,  # inference tensors cannot change in place outside inference
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            tuple(layer.lora_A._version for layer in self.layers),
        )

    def lora_input(self, layer: LoRALinear, x: Tensor) -> Tensor | None:
        if not self.enabled or torch.compiler.is_compiling():
            return None
        i = next(j for j, m in enumerate(self.layers) if m is layer)
        key = self._key_of(x)
        if self._x is x and i in self._pending and self._key == key:
            self._pending.discard(i)
            part = self._parts[i]
            if not self._pending:
                self.completed = True
                self._clear()  # drop the references: nothing leaks into the next call
            return part
        if self._pending and not self.completed and self._x is not x:  # siblings read different inputs: stop fusing
            self.enabled = False
            self._clear()
            return None
        a = torch.cat([m.lora_A for m in self.layers])  # (sum r, in)
        h = F.linear(x.to(a.dtype), a)  # (..., sum r)
        self._parts = h.split([m.r for m in self.layers], dim=-1)
        self._x, self._key = x, key
        self._pending = set(range(len(self.layers))) - {i}
        return self._parts[i]

    def reset(self) -> None:
        """Forget any cached product (kept only between sibling calls of one forward)."""
        self._clear()

    def __getstate__(self) -> dict:  # pickling / deepcopy: never carry cached activations
        state = dict(self.__dict__)
        state.update(_x=None, _key=None, _parts=(), _pending=set())
        return state


def fuse_siblings(model: nn.Module, layers: dict[str, LoRALinear]) -> list[FusedInput]:
    """Group the ``LoRALinear`` layers of ``model`` (``layers``: by module name) that share a parent and form one
    of ``FUSE_SETS`` (at least two members present), without dropout, with equal ``in_features`` and adapter dtype and
    device; attach a ``FusedInput`` to each member. Returns the groups."""
    by_parent: dict[str, dict[str, LoRALinear]] = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, {})[child] = layer
    groups = []
    for children in by_parent.values():
        for names in FUSE_SETS:
            members = [children[n] for n in sorted(names) if n in children]
            if len(members) < 2 or not all(fusable(m, members[0]) for m in members):
                continue
            group = FusedInput(members)
            for m in members:
                m._fused = group
            groups.append(group)
    return groups


def unfuse(layers: dict[str, LoRALinear]) -> None:
    """Detach every layer from its fused group (each computes its own ``x @ A^T`` again)."""
    for layer in layers.values():
        layer._fused = None


def fusable(layer: LoRALinear, first: LoRALinear) -> bool:
    return (
        isinstance(layer.dropout, nn.Identity)
        and layer._fused is None
        and layer.in_features == first.in_features
        and layer.lora_A.dtype == first.lora_A.dtype
        and layer.lora_A.device == first.lora_A.device
    )
