"""``LoRAConfig``: every LoRA setting, once: defaults, documentation, validation, (de)serialisation (pure Python).

``inject_lora``, the ``LoRA`` callback and ``LoRAModule`` take it (the callback and the module also take its fields as
keyword arguments, generated from it by ``lightning_ft.method_config.takes_config``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lightning_ft.method_config import MethodConfig

INITS = ("default", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")
Bias = Literal["none", "all", "lora_only"]
Init = Literal["default", "gaussian", "pissa"]


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA settings (``W + scale * B @ A`` in the chosen linear layers).

    Args:
        r: rank of the adapters (>= 1).
        alpha: scale numerator: ``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
        dropout: dropout on the adapters' input (training only).
        target_modules: ``"all-linear"`` (every linear layer except output heads), names / name suffixes, or a regex
            (see ``lightning_ft.targets.select_modules``).
        exclude_modules: names / suffixes / a regex removed from the targets.
        rank_pattern: ``{regex: rank}`` overrides per layer (first ``re.search`` match wins).
        alpha_pattern: ``{regex: alpha}`` overrides per layer (first ``re.search`` match wins).
        use_rslora: rank-stabilised scale ``alpha / sqrt(r)``.
        use_dora: DoRA: a trainable magnitude per output feature.
        init: ``"default"`` (kaiming A, zero B), ``"gaussian"`` or ``"pissa"`` (top singular vectors of ``W``).
        modules_to_save: names / suffixes of modules trained in full (e.g. a fresh ``classifier`` head).
        bias: ``"none"`` (biases frozen), ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted layers).
        fuse: compute ``x @ A^T`` once for sibling projections that read the same input (q/k/v, gate/up; see
            ``lightning_ft.lora.fused``). Same numbers, same files; only speed differs. Layers with dropout run unfused.
        compile: ``torch.compile`` each transformer block after injection (``lightning_ft.lora.compile``). Speed only.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: Init = "default"
    modules_to_save: Sequence[str] | None = None
    bias: Bias = "none"
    fuse: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        """Fail early, with the allowed values, on a rank below 1, a negative dropout or an unknown bias / init."""
        if self.r < 1:
            raise ValueError(f"rank r must be >= 1, got {self.r}")
        if not 0 <= self.dropout <= 1:
            raise ValueError(f"dropout must be in [0, 1], got {self.dropout}")
        if self.bias not in BIASES:
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; choose one of {list(INITS)}")
