"""What a compression did, layer by layer, and parameter counts of any model (for reports and benchmarks)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from lightning_ft.compress.layer import LowRankLinear
from lightning_ft.modeling import adapter_param_names, is_linear


@dataclass
class LayerReport:
    """One targeted layer: ``rank`` is None when it was kept dense (``reason`` says why)."""

    name: str
    in_features: int
    out_features: int
    full_rank: int
    rank: int | None
    params_before: int
    params_after: int
    energy: float | None = None  # share of sum(sigma^2) kept (in the activation-scaled space for asvd)
    reason: str = ""

    @property
    def factorized(self) -> bool:
        return self.rank is not None


@dataclass
class CompressionReport:
    """Returned by ``compress_low_rank``: per-layer ranks and parameter counts, and the model's totals."""

    method: str
    budget: dict[str, float]
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0  # every parameter of the model (shared ones once), before and after
    params_after: int = 0

    @property
    def factorized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.factorized]

    @property
    def kept_dense(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.factorized]

    @property
    def targeted_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def targeted_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.factorized}

    def summary(self) -> str:
        share = self.params_after / max(self.params_before, 1)
        tshare = self.targeted_after / max(self.targeted_before, 1)
        return (
            f"{self.method}: {len(self.factorized)} of {len(self.layers)} targeted layers factorised; targeted "
            f"parameters {self.targeted_before:,} -> {self.targeted_after:,} ({100 * tshare:.1f}%), model "
            f"{self.params_before:,} -> {self.params_after:,} ({100 * share:.1f}%)"
        )

    def table(self, max_rows: int | None = None) -> str:
        """Markdown: one row per targeted layer (the first ``max_rows``), then the totals."""
        lines = [
            "| layer | shape (out x in) | rank | params before | params after | energy kept |",
            "|---|---|---:|---:|---:|---:|",
        ]
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for r in rows:
            rank = f"{r.rank} / {r.full_rank}" if r.factorized else f"dense ({r.reason})"
            energy = "" if r.energy is None else f"{100 * r.energy:.2f}%"
            lines.append(
                f"| {r.name} | {r.out_features} x {r.in_features} | {rank} | {r.params_before:,} "
                f"| {r.params_after:,} | {energy} |"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"| ... {len(self.layers) - max_rows} more | | | | | |")
        lines.append(f"| targeted total | | | {self.targeted_before:,} | {self.targeted_after:,} | |")
        lines.append(f"| model total | | | {self.params_before:,} | {self.params_after:,} | |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(targeted_before=self.targeted_before, targeted_after=self.targeted_after)
        return out


@dataclass
class ParameterCounts:
    """Parameters of a model by kind (shared / tied parameters counted once)."""

    total: int
    trainable: int
    low_rank: int  # inside LowRankLinear layers (both factors and the bias)
    dense_linear: int  # in other linear layers (nn.Linear, GPT-2 Conv1D), output heads included
    adapters: int  # LoRA / DoRA adapter weights
    other: int  # embeddings, norms, ...

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "frozen": self.frozen}


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Count ``model``'s parameters by kind; a benchmark compares these before and after compression."""
    modules = dict(model.named_modules())
    low_rank_prefixes = [n for n, m in modules.items() if isinstance(m, LowRankLinear)]
    counts = dict.fromkeys(("total", "trainable", "low_rank", "dense_linear", "adapters", "other"), 0)
    adapters = {n for n in adapter_param_names(model, "lora") if not n.endswith(".base_layer.bias")}
    for name, p in model.named_parameters():
        owner_name = name.rpartition(".")[0]
        n = p.numel()
        counts["total"] += n
        counts["trainable"] += n if p.requires_grad else 0
        if name in adapters:
            counts["adapters"] += n
        elif any(owner_name == q or owner_name.startswith(q + ".") for q in low_rank_prefixes):
            counts["low_rank"] += n
        elif is_linear(modules.get(owner_name, model)):
            counts["dense_linear"] += n
        else:
            counts["other"] += n
    return ParameterCounts(**counts)


def count_params(model: nn.Module) -> int:
    """Every parameter of ``model``, shared ones once."""
    return sum(p.numel() for p in model.parameters())
