"""``LoRALinear``: a frozen linear layer plus a trainable low-rank update ``scale * B @ A`` (pure torch).

Variants: rsLoRA (``scale = alpha / sqrt(r)``), DoRA (a trainable magnitude per output feature; the column norm is
detached as in the paper, section 4.3), PiSSA initialisation (the top-``r`` singular triplets of ``W`` move into
``B @ A`` and the base keeps the residual, so the initial output is unchanged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_ft.lora.config import INITS
from lightning_ft.modeling import is_linear, linear_shape


def fold_lora(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, magnitude: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``W + scale * B @ A`` in float32 for an (out, in) ``weight``; with DoRA's ``magnitude`` each row is rescaled
    to it. Returns ``(merged, norm)``: ``norm`` is the row norm DoRA divided by (``None`` without DoRA)."""
    merged = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    if magnitude is None:
        return merged, None
    norm = torch.linalg.norm(merged, dim=1)
    return merged * (magnitude.float() / norm)[:, None], norm


class LoRALinear(nn.Module):
    """``y = base(x) + scale * B(A(dropout(x)))`` with ``base`` frozen.

    An adapter (``lightning_ft.modeling.Adapter``): ``adapter_params()`` are ``lora_A``, ``lora_B`` (and DoRA's
    ``lora_magnitude``), plus the base layer's bias when ``train_bias`` (``bias="lora_only"`` or ``"all"``).

    Shapes: ``lora_A`` (r, in_features), ``lora_B`` (out_features, r), ``lora_magnitude`` (out_features,) for DoRA.
    Input ``x`` (..., in_features); output (..., out_features). Adapters of a half-precision base are kept in
    float32 (their update is computed in float32 and cast to the output dtype).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
        train_bias: bool = False,
    ) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"LoRA wraps nn.Linear or transformers' Conv1D, not {type(base_layer).__name__}")
        in_features, out_features, self.fan_in_fan_out = linear_shape(base_layer)
        if not 1 <= r <= min(in_features, out_features):
            raise ValueError(
                f"rank r={r} must be between 1 and min(in_features, out_features) = {min(in_features, out_features)} "
                f"for a {in_features} -> {out_features} layer"
            )
        if init not in INITS:
            raise ValueError(f"unknown LoRA init {init!r}; choose one of {list(INITS)}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=weight.device))
        self.lora_magnitude: nn.Parameter | None = None
        self.train_bias = train_bias and getattr(base_layer, "bias", None) is not None
        if self.train_bias:
            base_layer.bias.requires_grad_(True)
        self.merged = False
        self._merged_norm: Tensor | None = None  # DoRA: the column norm used at merge time, needed to unmerge
        self.reset_lora_parameters(init)

    # ---- the adapter protocol (lightning_ft.modeling.Adapter) -------------------------------------------------
    adapter_method = "lora"

    def adapter_params(self) -> dict[str, Tensor]:
        """The tensors this layer trains, by their names relative to it."""
        out = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_magnitude is not None:
            out["lora_magnitude"] = self.lora_magnitude
        if self.train_bias:
            out["base_layer.bias"] = self.base_layer.bias
        return out

    def adapter_groups(self) -> dict[str, str]:
        """LoRA+ trains ``lora_B`` at its own learning rate."""
        return {"lora_B": "lora_B"}

    def adapter_config(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "use_rslora": self.use_rslora, "use_dora": self.use_dora}

    # ---- weights ---------------------------------------------------------------------------------------------
    def base_weight(self) -> Tensor:
        """The base weight as (out_features, in_features)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` as (out_features, in_features), float32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def weight_norm(self) -> Tensor:
        """DoRA's per-output-feature norm of ``W + scale * B @ A`` (out_features,), detached, float32."""
        return torch.linalg.norm(self.base_weight().float() + self.delta_weight().detach(), dim=1).detach()

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        if init == "pissa":
            self._pissa_init()
        else:
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.r)
            else:  # what nn.Linear (and peft) use
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(self.weight_norm().to(self.lora_A.dtype))

    def _pissa_init(self) -> None:
        w = self.base_weight().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        s_r = s[: self.r] / self.scaling
        self.lora_A.copy_(torch.sqrt(s_r)[:, None] * vh[: self.r])
        self.lora_B.copy_(u[:, : self.r] * torch.sqrt(s_r)[None, :])
        self._write_base_weight(w - self.delta_weight())

    def _write_base_weight(self, w: Tensor) -> None:
        """Store an (out, in) float32 weight into the base layer in its own layout and dtype."""
        target = self.base_layer.weight
        target.data.copy_((w.T if self.fan_in_fan_out else w).to(target.dtype))

    # ---- forward ---------------------------------------------------------------------------------------------
    @override
    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        dx = self.dropout(x).to(self.lora_A.dtype)
        lora = F.linear(F.linear(dx, self.lora_A) * self.scaling, self.lora_B)  # scale the (.., r) tensor: cheaper
        if not self.use_dora:
            return result + lora.to(result.dtype)
        # DoRA: m * (W + sBA) x / ||W + sBA||  =  base(x) + (m/n - 1) W x + (m/n) sBA x   (bias unchanged)
        scale = (self.lora_magnitude / self.weight_norm()).to(result.dtype)
        if isinstance(self.dropout, nn.Identity):
            base = result if self.base_layer.bias is None else result - self.base_layer.bias
        else:
            base = F.linear(self.dropout(x), self.base_weight().to(x.dtype))
        return result + (scale - 1) * base + scale * lora.to(result.dtype)

    # ---- merge / unmerge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight, in float32, then cast back to the base dtype."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; unmerge it first")
        magnitude = self.lora_magnitude if self.use_dora else None
        merged, self._merged_norm = fold_lora(self.base_weight(), self.lora_A, self.lora_B, self.scaling, magnitude)
        self._write_base_weight(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (up to rounding in the base dtype)."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged")
        w = self.base_weight().float()
        if self.use_dora:
            w = w * (self._merged_norm / self.lora_magnitude.float())[:, None]
        self._write_base_weight(w - self.delta_weight())
        self.merged = False

    @override
    def extra_repr(self) -> str:
        variant = ", rslora" if self.use_rslora else ""
        variant += ", dora" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}{variant}, merged={self.merged}"
