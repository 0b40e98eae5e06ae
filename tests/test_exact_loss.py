"""The gradient of an optimizer step is the gradient of one mean over every loss term of the step, whatever the batch
layout: batch 8 x 1 == batch 2 x 4 == batch 4 x 2 (gradient accumulation), with and without packing, for the full,
LoRA and sparse modules; gradient clipping sees that gradient; ``train/loss`` is the step's token-level mean.

The rows have answers of 1, 2, 4, ..., 128 words, so micro-batches hold very unequal target-token counts and an
average of per-micro-batch means (the bug this guards against) differs from the token-level mean by about 15 %.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import instruction_rows, quick_trainer, sentiment_rows, tiny_bert, tiny_llama, varied_rows

from lightning_ft import FineTuneDataModule, LoRAModule, SFTModule, SparseModule
from lightning_ft.callbacks.token_loss import TokenMeanLoss
from lightning_ft.modules.objectives import causal_lm_sums


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Trainers here have no root folder: anything they write lands in tmp_path


LAYOUTS = [(8, 1), (2, 4), (4, 2)]  # (batch size, accumulate_grad_batches): the same 8 rows per optimizer step


class StepRecorder(L.Callback):
    """After each optimizer step: the gradients it used (after rescaling and clipping)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # gradient accumulation: no optimizer step in this batch
        self._step = trainer.global_step
        named = pl_module.named_parameters()
        self.grads.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})


def make_module(method: str, vocab: int):
    model = tiny_llama(vocab)
    if method == "sft":
        return SFTModule(model=model, learning_rate=1e-3)
    if method == "lora":
        return LoRAModule(model=model, r=4, alpha=8, learning_rate=1e-3)
    return SparseModule(model=model, density=0.1, criterion="magnitude", learning_rate=1e-3)


def run(tokenizer, method: str, batch_size: int, accumulate: int, packing: bool, steps: int = 3, **trainer_kw):
    L.seed_everything(0, verbose=False)
    module = make_module(method, len(tokenizer))
    data = FineTuneDataModule(
        tokenizer,
        task="instruction",
        train=varied_rows(32 if packing else 8),  # packed: 18 rows of unequal lengths, so 2 x 4 and 4 x 2 accumulate
        max_length=256,
        batch_size=batch_size,
        packing=packing,
    )
    recorder = StepRecorder()
    trainer = quick_trainer(
        None, max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[recorder], **trainer_kw
    )
    trainer.fit(module, data)
    params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return recorder, params


def relative_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert got.keys() == ref.keys()
    diff = torch.sqrt(sum((got[k] - ref[k]).double().square().sum() for k in ref))
    norm = torch.sqrt(sum(ref[k].double().square().sum() for k in ref))
    return float(diff / norm)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("method", ["sft", "lora", "sparse"])
def test_accumulated_steps_equal_one_large_batch(tokenizer, method, packing):
    (ref_rec, ref_params), *others = [run(tokenizer, method, b, a, packing) for b, a in LAYOUTS]
    assert len(ref_rec.grads) == 3
    for (b, a), (rec, params) in zip(LAYOUTS[1:], others):
        for step, (got, ref) in enumerate(zip(rec.grads, ref_rec.grads)):
            assert relative_error(got, ref) < 1e-5, f"batch {b} x {a}, step {step}"
        for name, ref in ref_params.items():
            torch.testing.assert_close(params[name], ref, atol=1e-6, rtol=0, msg=f"batch {b} x {a}: {name}")


def test_clipping_sees_the_large_batch_gradient(tokenizer):
    """Clipped to a norm far below the gradient's: the clipped accumulated gradient equals the clipped large batch."""
    ref, _ = run(tokenizer, "sft", 8, 1, False, steps=1, gradient_clip_val=0.01)
    got, _ = run(tokenizer, "sft", 2, 4, False, steps=1, gradient_clip_val=0.01)
    norm = torch.sqrt(sum(g.square().sum() for g in ref.grads[0].values()))
    assert abs(float(norm) - 0.01) < 1e-6  # the clipping acted
    assert relative_error(got.grads[0], ref.grads[0]) < 1e-5


def test_logged_loss_is_the_token_level_mean_of_the_step(tokenizer):
    """``train/loss`` of one step with 4 micro-batches equals the summed NLL over all target tokens / their count."""
    L.seed_everything(0, verbose=False)
    model = tiny_llama(len(tokenizer))
    data = FineTuneDataModule(tokenizer, task="instruction", train=varied_rows(8), max_length=256, batch_size=2)
    data.setup("fit")
    batches = list(data.train_dataloader())
    with torch.no_grad():
        sums = [
            causal_lm_sums(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
            for b in batches
        ]
    expected = float(sum(s[0] for s in sums) / sum(s[1] for s in sums))
    per_batch_means = sum(float(s[0] / s[1]) for s in sums) / len(sums)
    assert abs(expected - per_batch_means) > 1e-3  # the data tells the two apart

    module = SFTModule(model=model, learning_rate=0.0)
    trainer = quick_trainer(None, max_steps=1, accumulate_grad_batches=4)
    trainer.fit(module, data)
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(expected, rel=1e-6)


def test_classification_short_last_batch_weighs_each_row_once(tokenizer):
    """10 rows, batch 4 x 3 (micro-batches of 4, 4, 2) == batch 10 x 1: a per-row mean over the step."""

    def fit(batch_size, accumulate):
        L.seed_everything(0, verbose=False)
        model = tiny_bert(len(tokenizer))
        for m in model.modules():  # dropout would draw other masks for other batch layouts
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        module = SFTModule(model=model, task="classification", labels=["negative", "positive"], learning_rate=1e-3)
        data = FineTuneDataModule(
            tokenizer,
            task="classification",
            train=sentiment_rows(10),
            batch_size=batch_size,
            labels=["negative", "positive"],
        )
        rec = StepRecorder()
        quick_trainer(None, max_steps=2, accumulate_grad_batches=accumulate, callbacks=[rec]).fit(module, data)
        return rec

    ref, got = fit(10, 1), fit(4, 3)
    for step in range(2):
        assert relative_error(got.grads[step], ref.grads[step]) < 1e-5


def test_a_users_module_with_summed_loss_and_the_callback(tokenizer):
    """A user's own module returning the summed NLL, with ``TokenMeanLoss`` added by hand, accumulates exactly."""
    from lightning_ft.modules.objectives import causal_lm_sums

    class UserModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama(len(tokenizer))

        def training_step(self, batch, batch_idx):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return causal_lm_sums(logits, batch["labels"])[0]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(batch_size, accumulate):
        L.seed_everything(0, verbose=False)
        module = UserModule()
        data = FineTuneDataModule(
            tokenizer, task="instruction", train=varied_rows(8), max_length=256, batch_size=batch_size
        )
        rec = StepRecorder()
        quick_trainer(None, max_steps=2, accumulate_grad_batches=accumulate, callbacks=[TokenMeanLoss(), rec]).fit(
            module, data
        )
        return rec

    ref, got = fit(8, 1), fit(2, 4)
    for step in range(2):
        assert relative_error(got.grads[step], ref.grads[step]) < 1e-5


def test_manual_optimization_is_refused(tokenizer):
    class Manual(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = FineTuneDataModule(tokenizer, task="instruction", train=instruction_rows(4), batch_size=2)
    with pytest.raises(RuntimeError, match="automatic optimization"):
        quick_trainer(None, max_steps=1, callbacks=[TokenMeanLoss()]).fit(Manual(), data)


def test_validation_loss_is_token_weighted_over_the_split(tokenizer):
    """val/loss and val/ppl over 4 batches of very unequal token counts: one mean over every target token."""
    L.seed_everything(0, verbose=False)
    model = tiny_llama(len(tokenizer))
    data = FineTuneDataModule(
        tokenizer, task="instruction", train=varied_rows(8), val=varied_rows(8), max_length=256, batch_size=2
    )
    data.setup("validate")
    with torch.no_grad():
        sums = [
            causal_lm_sums(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
            for b in data.val_dataloader()
        ]
    expected = float(sum(s[0] for s in sums) / sum(s[1] for s in sums))
    per_batch_means = sum(float(s[0] / s[1]) for s in sums) / len(sums)
    assert len(sums) == 4 and abs(expected - per_batch_means) > 1e-3
    metrics = quick_trainer(None, limit_val_batches=None).validate(SFTModule(model=model), data, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["val/ppl"] == pytest.approx(float(torch.exp(torch.tensor(expected))), rel=1e-5)


def test_a_micro_batch_without_a_loss_adds_no_targets(tokenizer):
    """A ``training_step`` that returns None for one micro-batch (no backward): the step's mean is over the others."""

    class SkipSecond(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama(len(tokenizer))

        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                return None
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return causal_lm_sums(logits, batch["labels"])[0]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    L.seed_everything(0, verbose=False)
    data = FineTuneDataModule(tokenizer, task="instruction", train=varied_rows(8), max_length=256, batch_size=2)
    module, rec, token_loss = SkipSecond(), StepRecorder(), TokenMeanLoss()
    reference = tiny_llama(len(tokenizer))
    quick_trainer(None, max_steps=1, accumulate_grad_batches=4, callbacks=[token_loss, rec]).fit(module, data)

    data.setup("fit")
    kept = [b for i, b in enumerate(data.train_dataloader()) if i != 1]
    sums = [
        causal_lm_sums(reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        for b in kept
    ]
    count = sum(int(s[1]) for s in sums)
    loss = sum(s[0] for s in sums) / count
    loss.backward()
    expected = {f"model.{n}": p.grad for n, p in reference.named_parameters()}
    assert token_loss.last_step_terms == count
    assert token_loss.last_step_loss == pytest.approx(float(loss), rel=1e-5)
    assert relative_error(rec.grads[0], expected) < 1e-5


def test_a_subclass_that_drops_the_token_loss_callback_is_refused(tokenizer):
    class Mine(SFTModule):
        def configure_callbacks(self):
            return []  # forgot super().configure_callbacks()

    data = FineTuneDataModule(tokenizer, task="instruction", train=instruction_rows(4), batch_size=2)
    with pytest.raises(RuntimeError, match="needs the TokenMeanLoss callback"):
        quick_trainer(None, max_steps=1).fit(Mine(model=tiny_llama(len(tokenizer))), data)
