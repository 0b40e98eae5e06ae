"""``Evaluator``: the evaluation state of the ``val`` and ``test`` stages beyond the torchmetrics collections of
``lightning_ft.metrics``: class probabilities for AUROC / AP / calibration and their figures, and generated answers
with their text metrics. ``FineTuneModule`` owns one and calls it from its steps and epoch ends; no Lightning here.

Logged names (with the stage prefix ``val/`` or ``test/``):
  * classification: ``auroc``, ``ap`` (binary: of the second label; more classes: one-vs-rest macro), ``ece``;
  * multiple-choice scoring (probabilities: a softmax over the choices' log-likelihoods): ``choice_auroc``,
    ``choice_ap``, ``choice_ece``;
  * generation: ``gen_exact_match``, ``gen_token_f1``, ``gen_rouge_l``, ``gen_bleu``, ``gen_chrf``.
Figures (``figures``): ``{stage}/roc``, ``{stage}/pr``, ``{stage}/reliability`` (``choice_`` in front for choices),
and ``{stage}/choice_confusion_matrix``.
"""

from __future__ import annotations

from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_ft.evaluation import curves as C
from lightning_ft.evaluation import figures as F
from lightning_ft.evaluation.text_metrics import GenerationMetrics

EVAL_STAGES = ("val", "test")


class Evaluator(nn.Module):
    """Accumulates one epoch of ``val`` or ``test``; :meth:`compute` returns the scalars and keeps what the figures
    need until :meth:`figures` or the next :meth:`compute`."""

    def __init__(self, calibration_bins: int = C.DEFAULT_BINS) -> None:
        super().__init__()
        if calibration_bins < 1:
            raise ValueError(f"calibration_bins must be at least 1, got {calibration_bins}")
        self.calibration_bins = calibration_bins
        # ModuleDict keys may not shadow nn.Module attributes, hence the "_" suffix (as in FineTuneModule)
        self.class_probs = nn.ModuleDict({f"{s}_": C.ProbabilityStore() for s in EVAL_STAGES})
        self.choice_probs = nn.ModuleDict({f"{s}_": C.ProbabilityStore() for s in EVAL_STAGES})
        self.generation = nn.ModuleDict({f"{s}_": GenerationMetrics() for s in EVAL_STAGES})
        self.records: dict[str, list[dict[str, Any]]] = {s: [] for s in EVAL_STAGES}
        self.generated: dict[str, int] = {s: 0 for s in EVAL_STAGES}
        self._computed: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}

    # ---- updates ---------------------------------------------------------------------------------------------
    def update_classes(self, stage: str, logits: Tensor, target: Tensor) -> None:
        """(N, C) logits and (N,) class ids of a classifier."""
        keep = target != -100
        self.class_probs[f"{stage}_"].update(logits[keep].float().softmax(-1), target[keep])

    def update_choices(self, stage: str, scores: Tensor, target: Tensor) -> None:
        """(N, K) choice log-likelihoods and (N,) right-choice ids (-100: unknown, skipped)."""
        keep = target != -100
        self.choice_probs[f"{stage}_"].update(scores[keep].float().softmax(-1), target[keep])

    def generated_rows(self, stage: str) -> int:
        """Rows this rank generated for in the stage so far, scored or not (the same on every rank of a sharded
        model, whose ranks must generate in step)."""
        return self.generated[stage]

    def update_generation(
        self,
        stage: str,
        prompts: list[str],
        predictions: list[str],
        references: list[str],
        scored: list[bool] | None = None,
    ) -> None:
        """Score generated answers against their references; ``scored[i] = False`` leaves row ``i`` out (a filler
        row that only evens out the ranks' shards)."""
        self.generated[stage] += len(predictions)
        rows = list(zip(prompts, predictions, references))
        if scored is not None:
            rows = [row for row, keep in zip(rows, scored) if keep]
        if not rows:
            return
        self.generation[f"{stage}_"].update([g for _, g, _ in rows], [r for _, _, r in rows])
        start = len(self.records[stage])
        self.records[stage] += [
            {"index": start + i, "prompt": p, "reference": r, "prediction": g} for i, (p, g, r) in enumerate(rows)
        ]

    # ---- epoch end -------------------------------------------------------------------------------------------
    def compute(self, stage: str) -> dict[str, Tensor]:
        """The stage's scalars (names with ``{stage}/``), over every rank's rows; resets the stores.

        Call on every rank: the ranks first agree (one ``all_reduce``) on which stores any rank filled, so that a
        rank whose shard gave a store nothing (every choice target unknown, fewer generated rows) still joins the
        gathers instead of leaving the others waiting for it.
        """
        out: dict[str, Tensor] = {}
        self._computed[stage] = {}
        stores = (("class", self.class_probs[f"{stage}_"], ""), ("choice", self.choice_probs[f"{stage}_"], "choice_"))
        gen = self.generation[f"{stage}_"]
        local = [n for _, store, _ in stores for n in (store.update_count, store.num_classes)] + [gen.update_count]
        agreed = self._max_over_ranks(local)
        for i, (kind, store, prefix) in enumerate(stores):
            count, num_classes = agreed[2 * i], agreed[2 * i + 1]
            if count:
                if not store.update_count:  # an empty share, so that the gather has this rank's (0, C) part
                    store.update(torch.zeros(0, num_classes), torch.zeros(0, dtype=torch.long))
                probs, target = store.compute()
                self._computed[stage][kind] = (probs, target)
                out.update(C.summary(probs, target, f"{stage}/{prefix}", self.calibration_bins))
            store.reset()
        if agreed[-1]:
            if not gen.update_count:
                gen.update_empty()
            out.update(gen.compute(f"{stage}/gen_"))
        gen.reset()
        return out

    def _max_over_ranks(self, values: list[int]) -> list[int]:
        """Element-wise maximum of ``values`` over the ranks of the default process group (as is without one)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return values
        device = self.generation["val_"].exact_match.mean_value.device  # the module's device (NCCL: a GPU)
        agreed = torch.tensor(values, dtype=torch.long, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return agreed.tolist()

    def take_records(self, stage: str) -> list[dict[str, Any]]:
        """This rank's generated answers of the stage (``index``, ``prompt``, ``reference``, ``prediction``); the
        stage's generation count starts again."""
        records, self.records[stage] = self.records[stage], []
        self.generated[stage] = 0
        return records

    def forget(self, stage: str) -> None:
        """Drop what the last :meth:`compute` of ``stage`` kept for the figures."""
        self._computed.pop(stage, None)

    def figures(self, stage: str, labels: list[str] | None, choice_names: list[str] | None) -> dict[str, Figure]:
        """ROC, PR and reliability figures of what the last :meth:`compute` of ``stage`` saw (and a confusion matrix
        for choices; classifiers have theirs in ``FineTuneModule.report_confusion``)."""
        out: dict[str, Figure] = {}
        for kind, (probs, target) in self._computed.pop(stage, {}).items():
            k = probs.shape[1]
            prefix = "" if kind == "class" else "choice_"
            names = labels if kind == "class" and labels else choice_names
            names = list(names) if names and len(names) == k else [f"choice {i}" for i in range(k)]
            what = "classifier" if kind == "class" else "multiple-choice scoring"
            if C.has_both_outcomes(target, k):
                prevalence = [float((target == c).float().mean()) for c in range(k)]  # indexed by class id
                out[f"{stage}/{prefix}roc"] = F.roc_figure(C.roc_curves(probs, target), names, f"{stage} ROC, {what}")
                out[f"{stage}/{prefix}pr"] = F.pr_figure(
                    C.pr_curves(probs, target), names, prevalence, f"{stage} precision-recall, {what}"
                )
            bins = C.reliability_bins(probs, target, self.calibration_bins)
            out[f"{stage}/{prefix}reliability"] = F.reliability_figure(bins, f"{stage} reliability, {what}")
            if kind == "choice":
                matrix = torch.zeros(k, k, dtype=torch.long)
                target_cpu = target.cpu()
                matrix.index_put_((target_cpu, probs.argmax(-1).cpu()), torch.ones_like(target_cpu), accumulate=True)
                out[f"{stage}/choice_confusion_matrix"] = F.confusion_figure(
                    matrix, names, f"{stage} confusion matrix, {what}"
                )
        return out
