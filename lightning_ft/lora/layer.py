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
from lightning_ft.lora.fused import FusedInput
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
        self._norm_cache: tuple[tuple, Tensor] | None = None  # DoRA: (key of the base weight, its squared row norms)
        self._fused: FusedInput | None = None  # set by ``lightning_ft.lora.fused.fuse_siblings``
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
        """The base weight as (out_features, in_features) (de-quantised for a quantised base layer)."""
        layer = self.base_layer
        w = layer.dequantized_weight() if hasattr(layer, "dequantized_weight") else layer.weight
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` as (out_features, in_features), float32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def weight_norm(self) -> Tensor:
        """DoRA's per-output-feature norm of ``W + scale * B @ A`` (out_features,), detached, float32.

        Without forming the (out, in) matrix: ``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i
        + s^2 B_i (A A^T) B_i^T``; ``||W_i||^2`` of the frozen base is cached (see ``base_row_norms``). Rows whose
        norm is zero get a tiny positive one, so ``magnitude / norm`` never divides by zero (a zero row has a zero
        magnitude at init, so the row stays zero instead of turning NaN).
        """
        with torch.no_grad():
            w, a, b = self.base_weight(), self.lora_A.detach().float(), self.lora_B.detach().float()
            wa = w.float() @ a.T  # (out, r)
            sq = self.base_row_norms() + 2 * self.scaling * (b * wa).sum(1)
            sq += self.scaling**2 * ((b @ (a @ a.T)) * b).sum(1)
            return sq.clamp_min(torch.finfo(torch.float32).tiny).sqrt()

    def base_row_norms(self) -> Tensor:
        """``||W_i||^2`` of the base weight (out_features,), float32; cached while the base weight is the same tensor
        with the same storage and version (a load, ``.to()``, merge / unmerge or PiSSA init all recompute it)."""
        if torch.compiler.is_compiling():  # the cache key would break the graph; the compiler fuses the reduction
            return self.base_weight().detach().float().square().sum(1)
        w = self.base_layer.weight
        key = (id(w), w.data_ptr(), w._version, w.dtype, w.device)
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                norms = self.base_weight().float().square().sum(1)
            self._norm_cache = (key, norms)
        return self._norm_cache[1]

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
        self._norm_cache = None  # ``.data.copy_`` leaves the version counter alone

    # ---- forward ---------------------------------------------------------------------------------------------
    def lora_hidden(self, x: Tensor) -> Tensor:
        """``A @ dropout(x)`` as (..., r), in the adapters' dtype; shared with fused siblings where possible."""
        if self._fused is not None and (h := self._fused.lora_input(self, x)) is not None:
            return h
        return F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)

    def _owns_base_output(self) -> bool:
        """No forward hook (on the base layer, or global) sees the base layer's input and output: this layer may call
        it on a flattened input and write into its output."""
        return not (self.base_layer._forward_hooks or nn.modules.module._global_forward_hooks)

    def add_update(self, result: Tensor, h: Tensor) -> Tensor:
        """``result + scale * h @ B^T``: one ``addmm`` (the add and the scale ride in the GEMM) where the dtypes
        allow, else the plain expression. ``result`` (..., out), ``h`` (..., r).

        The base layer's output is updated in place when nothing else can hold it (``_owns_base_output``): no new
        (..., out) tensor to allocate and write, and in the backward pass the gradient of ``result`` is the incoming
        gradient itself rather than a copy (when ``result`` is 2-D; on a view autograd copies, so ``forward`` calls
        the base on the flattened input). Autograd allows it: the base matmul saves its input and weight, not its
        output.
        """
        if result.dtype == h.dtype and result.is_contiguous():
            flat = result if result.dim() == 2 else result.view(-1, self.out_features)
            h2 = h.reshape(-1, self.r)
            if self._owns_base_output():
                flat.addmm_(h2, self.lora_B.T, alpha=self.scaling)
                return result
            return torch.addmm(flat, h2, self.lora_B.T, alpha=self.scaling).view(result.shape)
        h = h.reshape(*result.shape[:-1], self.r)  # forward may have flattened the base's input
        return result + (F.linear(h, self.lora_B) * self.scaling).to(result.dtype)

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if not self.use_dora and self._owns_base_output():
            # the base on (tokens, in): its (tokens, out) output is no view, so the update goes into it in place
            # without autograd's copy for in-place ops on views
            result = self.base_layer(x.reshape(-1, x.shape[-1]))
            out = self.add_update(result, self.lora_hidden(x))
            return out.view(*x.shape[:-1], out.shape[-1])
        if not self.use_dora:
            return self.add_update(self.base_layer(x), self.lora_hidden(x))
        result = self.base_layer(x)
        if not isinstance(self.dropout, nn.Identity):
            return self._dora_with_dropout(x, result)
        h = self.lora_hidden(x)
        # DoRA: m (W + sBA) x / ||W + sBA|| + b  =  (m / n) (Wx + s BAx) + b: one GEMM-fused add, one addcmul
        scale = (self.lora_magnitude / self.weight_norm()).to(result.dtype)
        bias = self.base_layer.bias
        update = self.add_update(result if bias is None else result - bias, h)
        return update * scale if bias is None else torch.addcmul(bias.to(result.dtype), update, scale)

    def _dora_with_dropout(self, x: Tensor, result: Tensor) -> Tensor:
        """DoRA when dropout is on: the base term needs ``W @ dropout(x)``, one more matmul (as in peft)."""
        dx = self.dropout(x)
        lora = F.linear(F.linear(dx.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        scale = (self.lora_magnitude / self.weight_norm()).to(result.dtype)
        base = F.linear(dx, self.base_weight().to(x.dtype))
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
