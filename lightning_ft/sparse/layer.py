"""``SparseLinear``: a linear layer of which only the weight entries at ``indices`` train (pure torch).

Two storage modes:

- ``"delta"``: the base weight is frozen; a trainable ``values`` vector (k,) holds the change at ``indices``, and the
  forward uses ``W + scatter(values)`` (``lightning_ft.sparse.delta``). Gradients and optimizer state exist for the k
  selected entries only: the mode that saves memory.
- ``"mask"``: the base weight itself trains, densely; ``GradientMask`` (``lightning_ft.sparse.mask``) keeps every
  entry outside ``indices`` bitwise unchanged. Gradient and optimizer state are dense: the memory of full
  fine-tuning. ``base_values`` (k,) remembers the pretrained entries at ``indices`` (to export the change, and to
  revert entries that re-selection drops).

``indices`` index the flattened weight *as stored* (``weight.view(-1)``: (out, in) for ``nn.Linear``, (in, out) for
transformers' ``Conv1D``); they are int64, sorted and unique, and are validated whenever they are loaded. In both
modes the layer's state dict holds ``indices`` and ``values`` (the change in delta mode, the trained weights at
``indices`` in mask mode), so an adapter-only checkpoint of k entries restores the layer exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_ft.modeling import is_linear, linear_shape
from lightning_ft.sparse.delta import effective_weight, sparse_delta_linear

Mode = Literal["delta", "mask"]
MODES = ("delta", "mask")


def check_indices(indices: Tensor, numel: int, where: str = "indices") -> None:
    """Raise ``ValueError`` unless ``indices`` is a 1-D int64 tensor, strictly increasing, within ``[0, numel)``."""
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64:
        got = getattr(indices, "dtype", type(indices))
        raise ValueError(f"{where}: sparse indices must be an int64 tensor, got {got}")
    if indices.ndim != 1:
        raise ValueError(f"{where}: sparse indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel() > numel:
        raise ValueError(f"{where}: {indices.numel()} indices for a weight of {numel} entries")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ValueError(
            f"{where}: sparse indices must lie in [0, {numel}), got min {int(indices.min())}, max {int(indices.max())}"
        )
    if indices.numel() > 1 and bool((indices[1:] <= indices[:-1]).any()):
        raise ValueError(f"{where}: sparse indices must be sorted and unique (strictly increasing)")


class SparseLinear(nn.Module):
    """A linear layer whose training changes only the weight entries at ``indices``.

    Shapes: ``indices`` (k,) int64 into ``base_layer.weight.view(-1)``; ``values`` (k,) in delta mode (float32 for a
    half-precision base); input (..., in_features), output (..., out_features). ``grad_accumulator``, when set to a
    float32 tensor shaped like the weight, collects the dense weight gradient of delta-mode backward passes (for
    dynamic re-selection).
    """

    def __init__(self, base_layer: nn.Module, indices: Tensor, mode: Mode = "delta") -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"sparse layers wrap nn.Linear or transformers' Conv1D, not {type(base_layer).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown sparse mode {mode!r}; choose one of {list(MODES)}")
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        weight = base_layer.weight
        check_indices(indices, weight.numel())
        self.base_layer = base_layer
        self.mode = mode
        self.register_buffer("indices", indices.to(weight.device, copy=True))
        self.values: nn.Parameter | None = None
        if mode == "delta":
            base_layer.weight.requires_grad_(False)
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=weight.device))
        else:
            base_layer.weight.requires_grad_(True)
            self.register_buffer("base_values", weight.detach().reshape(-1)[self.indices].clone(), persistent=False)
        self.grad_accumulator: Tensor | None = None

    # ---- the adapter protocol (lightning_ft.modeling.Adapter) -------------------------------------------------
    adapter_method = "sparse"

    def adapter_params(self) -> dict[str, Tensor]:
        """What this layer trains and a checkpoint keeps: ``indices`` and ``values`` (in mask mode ``values`` is
        written from the dense weight, which trains)."""
        out = {"indices": self.indices}
        out["values"] = self.values if self.values is not None else self.base_layer.weight
        return out

    def adapter_groups(self) -> dict[str, str]:
        """Delta values are weight entries: decayed like matrices although 1-D."""
        return {"values": "sparse_values"} if self.values is not None else {}

    def adapter_config(self) -> dict:
        return {"mode": self.mode, "nnz": self.nnz, "shape": list(self.base_layer.weight.shape)}

    @property
    def numel(self) -> int:
        return self.base_layer.weight.numel()

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def delta_values(self) -> Tensor:
        """The trained change at ``indices`` (k,), float32, detached."""
        if self.values is not None:
            return self.values.detach().float()
        return self.base_layer.weight.detach().reshape(-1)[self.indices].float() - self.base_values.float()

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.values is None:  # mask mode: the dense weight trains
            return self.base_layer(x)
        w = self.base_layer.weight
        return sparse_delta_linear(
            x, w, self.base_layer.bias, self.indices, self.values, self.fan_in_fan_out, self.grad_accumulator
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base weight (float32 sum, cast back); in mask mode the weight already holds it."""
        if self.values is not None:
            w = self.base_layer.weight
            w.copy_(effective_weight(w, self.indices, self.values))
            self.values.zero_()

    # ---- state dict: indices and values only are needed to restore the layer over its pretrained base ------------
    @override
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.values is None:
            destination[prefix + "values"] = self.base_layer.weight.detach().reshape(-1)[self.indices]

    @override
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        indices, values = state_dict.get(prefix + "indices"), state_dict.get(prefix + "values")
        where = prefix.rstrip(".") or type(self).__name__
        weight = self.base_layer.weight
        if indices is not None:
            check_indices(indices, weight.numel(), where)
            if values is not None and values.shape != indices.shape:
                raise ValueError(f"{where}: {values.numel()} values for {indices.numel()} indices")
        with torch.no_grad():
            if self.values is None:  # mask mode: back to the pretrained entries before moving the mask
                weight.view(-1).index_copy_(0, self.indices, self.base_values.to(weight.dtype))
            if indices is not None and indices.numel() != self.nnz:  # a re-sized mask (global allocation)
                self.indices = self.indices.new_zeros(indices.shape)
                if self.values is not None:
                    self.values.data = self.values.new_zeros(indices.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if self.values is None:
            with torch.no_grad():
                self.base_values = weight.detach().reshape(-1)[self.indices].clone()
                if values is not None and indices is not None:
                    weight.view(-1).index_copy_(0, self.indices, values.to(weight.device, weight.dtype))
            if prefix + "values" in unexpected_keys:
                unexpected_keys.remove(prefix + "values")

    @override
    def extra_repr(self) -> str:
        return f"mode={self.mode}, nnz={self.nnz}, density={self.nnz / max(self.numel, 1):.4g}"
