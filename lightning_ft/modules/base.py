"""``FineTuneModule``: the training / evaluation / prediction logic that every method module shares.

A method module (``SFTModule``, later ``LoRAModule`` and ``SparseModule``) is this base plus the callbacks it returns
from ``configure_callbacks()``; a user who prefers their own LightningModule adds the same callbacks by hand.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from typing_extensions import override

from lightning_ft import metrics as M
from lightning_ft._compat import attached_trainer
from lightning_ft.callbacks.token_loss import TokenMeanLoss
from lightning_ft.data.collate import tensor_to_texts
from lightning_ft.evaluation.evaluator import Evaluator
from lightning_ft.evaluation.generation import generate_text
from lightning_ft.evaluation.run_outputs import write_confusion, write_loss_history, write_stage_results
from lightning_ft.modeling import MODEL_INPUTS, enable_activation_checkpointing, is_activation_checkpointing
from lightning_ft.modules.loss_watch import NonFiniteLossWatch
from lightning_ft.modules.objectives import IGNORE_INDEX, next_token_targets, target_mask, token_sums
from lightning_ft.modules.optim import SCHEDULES, decay_groups, warmup_decay
from lightning_ft.scoring import score_choices as choice_logprobs
from lightning_ft.strategies.sharding import is_sharded

ModelTask = Literal["causal_lm", "classification"]
STAGES = ("train", "val", "test")
#: where evaluation generates answers for rows without ``choices`` (``eval_generation``)
GENERATION_STAGES = {"none": (), "test": ("test",), "val_test": ("val", "test")}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


class FineTuneModule(L.LightningModule):
    """Shared base: a Hugging Face model, its loss and metrics, AdamW with warm-up and decay.

    Args:
        model_name_or_path: short name, local directory, GGUF file or hub id for ``lightning_ft.models.load_model``.
            The model is built in ``configure_model`` (lazily, so FSDP can shard it as it is made).
        task: ``"causal_lm"`` or ``"classification"``.
        labels: the ordered label names of a classification task.
        model: an already built model to use instead of loading ``model_name_or_path``.
        learning_rate, weight_decay, betas, eps: AdamW settings; biases and norm weights get no weight decay.
        warmup_steps / warmup_ratio: linear warm-up length in steps, or as a share of all training steps.
        scheduler: ``"linear"``, ``"cosine"`` or ``"constant"`` after warm-up; ``min_lr_ratio`` is the floor.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        dtype: weight dtype at load (``"float32"`` default, ``"bfloat16"``); mixed precision is the Trainer's
            ``precision`` setting.
        max_new_tokens: the longest generated answer, in tokens (evaluation and ``predict_step``).
        eval_lm_loss: in validation / test of causal-LM rows that have ``choices``, also compute the LM loss and
            perplexity of the answers (one more forward pass over prompt + answer). ``False`` only scores the choices.
        eval_generation: where causal-LM rows *without* ``choices`` (free-text answers) get an answer generated and
            scored against theirs (exact match, token F1, ROUGE-L, BLEU, chrF; see ``lightning_ft.evaluation``):
            ``"val_test"`` (default), ``"test"`` or ``"none"``. The answers go to ``generations_<stage>.jsonl`` in
            the run folder, next to ``metrics_<stage>.json``.
        val_generation_rows: in validation, generate for the first this many rows only (in total: each of N
            processes takes ``ceil(rows / N)``; ``None``: every row). Validation runs at every ``val_check_interval``
            and generating costs up to ``max_new_tokens`` forward passes per batch, so the default 256 keeps it
            cheap on big validation sets; the same rows are scored each time, so epochs compare. Test always
            generates for every row (limit it with the data module's ``max_eval_examples``).
        generation_kwargs: further ``generate`` settings (``do_sample``, ``temperature``, ``num_beams``, ...);
            greedy decoding by default. Generation stops at EOS or the chat template's end-of-turn token.
        calibration_bins: equal-width confidence bins of the expected calibration error and reliability diagram.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        task: ModelTask = "causal_lm",
        labels: list[str] | None = None,
        model: nn.Module | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int = 32,
        eval_lm_loss: bool = True,
        eval_generation: Literal["none", "test", "val_test"] = "val_test",
        val_generation_rows: int | None = 256,
        generation_kwargs: dict[str, Any] | None = None,
        calibration_bins: int = 15,
    ) -> None:
        super().__init__()
        if task not in ("causal_lm", "classification"):
            raise ValueError(f"unknown task {task!r}; choose 'causal_lm' or 'classification'")
        if task == "classification" and not labels:
            raise ValueError("a classification module needs `labels`, the ordered label names")
        if model is None and model_name_or_path is None:
            raise ValueError("give `model_name_or_path` (or an already built `model`)")
        if scheduler not in SCHEDULES:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {list(SCHEDULES)}")
        if eval_generation not in GENERATION_STAGES:
            raise ValueError(f"unknown eval_generation {eval_generation!r}; choose one of {list(GENERATION_STAGES)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if val_generation_rows is not None and val_generation_rows < 0:
            raise ValueError(f"val_generation_rows must be 0 or more (None: every row), got {val_generation_rows}")
        self.save_hyperparameters(ignore=["model"])
        self.model_name_or_path = model_name_or_path
        self.task = task
        self.labels = list(labels) if labels else None
        self.model = model
        self._tokenizer = None
        # ModuleDict keys may not shadow nn.Module attributes such as `train`, hence the "_" suffix
        if task == "classification":
            self.metrics = nn.ModuleDict({f"{s}_": M.classification_metrics(self.labels, f"{s}/") for s in STAGES})
            self.losses = nn.ModuleDict({f"{s}_": M.MeanMetric() for s in STAGES})
            self.confusion = M.confusion_matrix(self.labels)
        else:
            self.metrics = nn.ModuleDict({f"{s}_": M.CausalLMMetrics(f"{s}/") for s in STAGES})
        # multiple-choice scoring of causal-LM rows with `choices`; built at the first scored batch (K unknown before)
        self.choice_metrics: nn.ModuleDict | None = None
        # val / test: class probabilities (AUROC, AP, calibration), generated answers and their text metrics
        self.evaluator = Evaluator(calibration_bins)
        self.loss_history: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
        # a NaN / inf loss is noted on the device and raised at the logging interval: no host sync per step
        self.loss_watch = {s: NonFiniteLossWatch() for s in STAGES}

    # ---- model -----------------------------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        if self.model is None:
            from lightning_ft.models import load_model

            hp = self.hparams
            self.model = load_model(
                self.model_name_or_path,
                task=self.task,
                labels=self.labels,
                dtype=hp.dtype,
                trust_remote_code=hp.trust_remote_code,
            )
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode: train mode turns dropout on
        # (Lightning's evaluation loops switch to eval mode themselves)
        self.model.train()
        if self.hparams.gradient_checkpointing and not is_activation_checkpointing(self.model):
            enable_activation_checkpointing(self.model, input_grads=True)

    @property
    def tokenizer(self):
        """The data module's tokenizer when there is one, else the model's own."""
        if self._tokenizer is None:
            trainer = attached_trainer(self)
            dm = getattr(trainer, "datamodule", None) if trainer is not None else None
            if dm is not None and hasattr(dm, "tokenizer"):
                self._tokenizer = dm.tokenizer
            else:
                from lightning_ft.models import load_tokenizer

                self._tokenizer = load_tokenizer(self.model_name_or_path)
        return self._tokenizer

    @override
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits: (B, T, V) for causal LM, (B, C) for classification."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if self.task == "causal_lm":
            inputs["use_cache"] = False  # a KV cache would also switch off transformers' packed-sequence masking
        return self.model(**inputs).logits

    def target_logits(self, inputs: dict[str, Tensor], labels: Tensor) -> Tensor:
        """Causal-LM logits at the target positions only: (N, V), row-major over ``target_mask(labels)``.

        Models whose forward takes ``logits_to_keep`` (transformers' causal LMs) project only those positions onto
        the vocabulary; others compute all logits and are indexed.
        """
        mask = target_mask(labels)
        inputs = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
        if self._takes_logits_to_keep():
            return self.model(**inputs, use_cache=False, logits_to_keep=mask).logits
        return self.model(**inputs, use_cache=False).logits[mask]

    def _takes_logits_to_keep(self) -> bool:
        if not hasattr(self, "_logits_to_keep"):
            self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return self._logits_to_keep

    # ---- steps -----------------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor | None:
        """Update ``stage``'s metrics; return the *summed* loss over the batch's loss terms (target tokens for causal
        LMs, rows for classification). ``TokenMeanLoss`` turns the sums into one mean over every term of an optimizer
        step (all micro-batches, all ranks)."""
        if self.task == "classification":
            logits = self(batch)
            labels = batch["labels"]
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")  # rows labelled -100 add nothing
            scored, targets = logits.detach(), labels
            if stage != "train":  # evaluation shard fillers are labelled -100 (no mask in training: no host sync)
                keep = labels != IGNORE_INDEX
                scored, targets = scored[keep], labels[keep]
            if targets.numel():  # torchmetrics refuses empty updates
                self.metrics[f"{stage}_"].update(scored, targets)
                self.losses[f"{stage}_"].update(loss.detach() / targets.numel(), weight=targets.numel())
                if stage == "test":
                    self.confusion.update(scored.argmax(-1), targets)
                if stage != "train":
                    self.evaluator.update_classes(stage, scored, targets)
        else:
            if "gen_prompt_ids" in batch and stage in GENERATION_STAGES[self.hparams.eval_generation]:
                self.generate_and_score(batch, stage)
            scored = stage != "train" and "choice_ids" in batch
            if scored:
                self.score_choices(batch, stage)
                if not self.hparams.eval_lm_loss:
                    return None
            logits = self.target_logits(batch, batch["labels"])
            loss, num_tokens, num_correct = token_sums(logits, next_token_targets(batch["labels"]))
            self.metrics[f"{stage}_"].update(loss.detach(), num_tokens, num_correct)
        self.loss_watch[stage].update(loss, self.global_step)
        return loss

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The summed loss of the micro-batch; ``TokenMeanLoss`` (from ``configure_callbacks``) rescales the
        gradients to the step's token-level mean and logs ``train/loss``."""
        return self.step(batch, "train")

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.step(batch, "val")

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.step(batch, "test")

    def score_choices(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        """Score each choice by its log-likelihood after the prompt; update ``{stage}/choice_*`` metrics. (B, K)."""
        scores = choice_logprobs(
            self.model,
            batch["choice_prompt_ids"],
            batch["choice_prompt_mask"],
            batch["choice_ids"],
            batch["choice_mask"],
        )
        if self.choice_metrics is None:
            names = [str(i) for i in range(scores.shape[1])]
            self.choice_metrics = nn.ModuleDict(
                {f"{s}_": M.classification_metrics(names, f"{s}/choice_") for s in STAGES}
            )
            self.choice_metrics.to(self.device)
        target = batch["choice_target"]
        keep = target != -100
        if keep.any():
            self.choice_metrics[f"{stage}_"].update(scores[keep].detach(), target[keep])
            if stage != "train":
                self.evaluator.update_choices(stage, scores.detach(), target)
        return scores

    def generate_and_score(self, batch: dict[str, Any], stage: str) -> list[str]:
        """Generate answers for the batch's prompts (in validation up to ``val_generation_rows``), score them against
        the batch's reference answers; return the answers."""
        references = tensor_to_texts(batch["reference_bytes"])
        limit = self.hparams.val_generation_rows if stage == "val" else None
        if limit is not None:  # this process's share; every process reaches it at the same batch (equal shards)
            limit = -(-limit // max(self.trainer.world_size, 1))
        left = len(references) if limit is None else limit - self.evaluator.generated_rows(stage)
        take = max(0, min(len(references), left))
        if take == 0:
            return []
        ids, mask = batch["gen_prompt_ids"][:take], batch["gen_prompt_mask"][:take]
        width = int(mask.sum(-1).max())  # the kept rows may need fewer (left) padding columns
        ids, mask = ids[:, -width:], mask[:, -width:]
        kwargs = dict(self.hparams.generation_kwargs or {})
        if is_sharded(self.model):  # sharded weights need every rank in every forward, until all ranks' rows stop
            kwargs.setdefault("synced_gpus", True)  # (not under DDP: a whole model per rank, no per-token all-reduce)
        answers = generate_text(
            self.model, self.tokenizer, ids, mask, max_new_tokens=self.hparams.max_new_tokens, generation_kwargs=kwargs
        )
        prompts = [self.tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(ids, mask)]
        scored = (~batch["filler"][:take]).tolist() if "filler" in batch else None  # fillers: generated, not scored
        self.evaluator.update_generation(stage, prompts, answers, references[:take], scored=scored)
        return answers

    # ---- epoch ends: compute, log, reset ---------------------------------------------------------------------
    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the non-finite loss check syncs with the device, so only every log_every_n_steps batches
        if (batch_idx + 1) % max(self.trainer.log_every_n_steps, 1) == 0:
            self.loss_watch["train"].check("train")
            self.record_train_loss()

    def record_train_loss(self) -> None:
        """Note the last optimizer step's loss (from ``TokenMeanLoss``) for the loss curve."""
        step_loss = next((cb for cb in self.trainer.callbacks if isinstance(cb, TokenMeanLoss)), None)
        value = step_loss.last_step_loss if step_loss is not None else None
        history = self.loss_history["train"]
        if value is not None and (not history or history[-1][0] != self.global_step):
            history.append((self.global_step, value))

    @override
    def on_fit_end(self) -> None:
        """The loss curve to the loggers and ``figures/loss_curve.png``; ``loss_history.json`` in the run folder."""
        write_loss_history(self.trainer, self.loss_history)

    @override
    def on_train_epoch_end(self) -> None:
        self.loss_watch["train"].check("train")
        self.log_stage_metrics("train")

    @override
    def on_validation_epoch_end(self) -> None:
        self.loss_watch["val"].check("val")
        values = self.log_stage_metrics("val")
        if "val/loss" in values and not self.trainer.sanity_checking:
            self.loss_history["val"].append((self.global_step, float(values["val/loss"])))
        self.write_stage_results("val", values, with_figures=False)

    @override
    def on_test_epoch_end(self) -> None:
        self.loss_watch["test"].check("test")
        values = self.log_stage_metrics("test")
        if self.task == "classification":
            self.report_confusion("test")
        self.write_stage_results("test", values, with_figures=True)

    def write_stage_results(self, stage: str, values: dict[str, Tensor], with_figures: bool) -> None:
        """``metrics_<stage>.json``, ``generations_<stage>.jsonl`` and, ``with_figures``, the ROC / PR / reliability
        figures, into the run folder and the loggers (rank 0; see ``evaluation.run_outputs``). Call on every rank."""
        write_stage_results(self.trainer, self.evaluator, stage, values, self.labels, with_figures)

    def log_stage_metrics(self, stage: str) -> dict[str, Tensor]:
        values = {}
        if self.task == "classification":
            if self.losses[f"{stage}_"].update_count:
                values[f"{stage}/loss"] = self.losses[f"{stage}_"].compute()
                values.update(M.flatten_per_class(self.metrics[f"{stage}_"].compute(), self.labels))
            self.losses[f"{stage}_"].reset()
        elif self.metrics[f"{stage}_"].acc.update_count:
            values.update(self.metrics[f"{stage}_"].compute())
        self.metrics[f"{stage}_"].reset()
        choice = self.choice_metrics[f"{stage}_"] if self.choice_metrics is not None else None
        if choice is not None and choice["acc"].update_count:
            values.update({k: v for k, v in choice.compute().items() if v.ndim == 0})
            choice.reset()
        if stage != "train":
            values.update(self.evaluator.compute(stage))  # AUROC / AP / ECE, generation metrics
        if stage == "train":
            values.pop("train/loss", None)  # logged per step
        if values:
            self.log_dict(values, sync_dist=False)  # torchmetrics already reduced across ranks
        return values

    def report_confusion(self, stage: str) -> None:
        if not self.confusion.update_count:
            return
        matrix = self.confusion.compute()
        self.confusion.reset()
        write_confusion(self.trainer, matrix, self.labels, stage)

    # ---- prediction ------------------------------------------------------------------------------------------
    @override
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> list[str]:
        """Predicted label names (classification) or generated answers (causal LM, greedy)."""
        if self.task == "classification":
            logits = self(batch)
            return [self.labels[i] for i in logits.argmax(-1).tolist()]
        return generate_text(
            self.model,
            self.tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            generation_kwargs=self.hparams.generation_kwargs,
        )

    @override
    def setup(self, stage: str) -> None:
        from lightning_ft.strategies.checkpoint_io import check_checkpoints

        check_checkpoints(self.trainer)  # a damaged ckpt_path: its path and a remedy, not torch's EOFError

    @classmethod
    @override
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> FineTuneModule:
        from lightning_ft.file_checks import check_checkpoint

        check_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # before Lightning loads the state dict: a checkpoint that needs a method callback this run lacks names it
        from lightning_ft.resume_checks import check_before_load

        check_before_load(self, checkpoint)

    # ---- callbacks -------------------------------------------------------------------------------------------
    @override
    def configure_callbacks(self) -> list[L.Callback]:
        """``TokenMeanLoss``: ``training_step`` returns summed losses (see ``step``)."""
        return [TokenMeanLoss()]

    # ---- optimisation ----------------------------------------------------------------------------------------
    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for AdamW; method modules override this (e.g. LoRA+ learning rates)."""
        return decay_groups(self.named_parameters(), self.hparams.weight_decay)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self.optimizer_param_groups()
        if not groups:
            raise RuntimeError("no trainable parameters: every parameter has requires_grad=False")
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 10**9
        warmup = hp.warmup_steps or int(hp.warmup_ratio * total)
        scheduler = LambdaLR(optimizer, warmup_decay(hp.scheduler, warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_fit_start(self) -> None:
        if not any(isinstance(cb, TokenMeanLoss) for cb in self.trainer.callbacks):
            # training_step returns summed losses: without the callback the gradients would be sums, silently
            raise RuntimeError(
                f"{type(self).__name__} returns summed losses and needs the TokenMeanLoss callback, which "
                "FineTuneModule.configure_callbacks returns: call super().configure_callbacks() in your override "
                "(or add lightning_ft.callbacks.TokenMeanLoss() to the Trainer's callbacks)."
            )
        trainable, total = count_parameters(self)
        rank_zero_info(
            f"lightning-ft: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
        )
