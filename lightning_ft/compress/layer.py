"""``LowRankLinear``: a linear layer stored as two smaller linears, ``second(first(x))`` (pure torch).

An ``out x in`` weight ``W`` becomes ``W_r = second.weight @ first.weight`` with ``first`` (in -> r, no bias) and
``second`` (r -> out, the original bias). Parameters fall from ``out * in`` to ``r * (in + out)``, and so do the
multiply-adds per token, whenever ``r < out * in / (in + out)``.

Both factors are plain ``nn.Linear``s, so anything that works on linear layers works on them: LoRA and sparse
fine-tuning adapt ``first`` and ``second`` separately, and merging an adapter back keeps the factorised shape.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import override

#: names of the two factors inside a ``LowRankLinear``
FACTOR_NAMES = ("first", "second")


class LowRankLinear(nn.Module):
    """``y = second(first(x))``: ``first`` (in_features -> rank, no bias), ``second`` (rank -> out_features, bias).

    Shapes: ``first.weight`` (rank, in_features), ``second.weight`` (out_features, rank), ``second.bias``
    (out_features,). Input ``x`` (..., in_features); output (..., out_features).
    """

    #: read by ``lightning_ft.targets.select_modules``: the factors answer to this module's name
    factorized_linear = True

    # ---- the adapter protocol (lightning_ft.modeling.Adapter) -------------------------------------------------
    adapter_method = "low_rank"

    def adapter_params(self) -> dict[str, Tensor]:
        """The factors (and the bias), which train in full when no adapter sits on them."""
        return {name: p for name, p in self.named_parameters()}

    def adapter_groups(self) -> dict[str, str]:
        return {}

    def adapter_config(self) -> dict:
        return {"rank": self.rank, "in_features": self.in_features, "out_features": self.out_features}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank {rank} must be between 1 and min(in_features, out_features) = {min(in_features, out_features)}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, first: Tensor, second: Tensor, bias: Tensor | None = None) -> LowRankLinear:
        """A layer holding ``first`` (rank, in) and ``second`` (out, rank) and ``bias`` (out,), copied."""
        rank, in_features = first.shape
        out_features, rank2 = second.shape
        if rank != rank2:
            raise ValueError(f"factor shapes do not chain: first {tuple(first.shape)}, second {tuple(second.shape)}")
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=first.device, dtype=first.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(first)
            layer.second.weight.copy_(second)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    def dense_weight(self) -> Tensor:
        """``second.weight @ first.weight`` (out_features, in_features), in float32, detached."""
        return (self.second.weight.detach().float() @ self.first.weight.detach().float()).contiguous()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function (weight ``second @ first``, cast to the factors' dtype)."""
        w = self.first.weight
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.second.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight().to(w.dtype))
            if self.second.bias is not None:
                dense.bias.copy_(self.second.bias)
        dense.requires_grad_(w.requires_grad)
        return dense

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @override
    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every ``LowRankLinear`` of ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def dense_params(in_features: int, out_features: int, bias: bool) -> int:
    return in_features * out_features + (out_features if bias else 0)


def low_rank_params(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    return rank * (in_features + out_features) + (out_features if bias else 0)
