"""SFTModule and the shared module base on tiny random Llama and BERT models."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import LossRecorder, instruction_rows, quick_trainer, sentiment_rows, tiny_bert, tiny_llama
from helpers import lm_data as shared_lm_data

from lightning_ft import FineTuneDataModule, SFTModule
from lightning_ft.modules.optim import decay_groups, warmup_decay

LABELS = ["negative", "positive"]


def trainer(tmp_path, max_steps=20, **kw):
    return quick_trainer(tmp_path, max_steps=max_steps, **kw)


def lm_data(tokenizer, n=32, **kw):
    return shared_lm_data(tokenizer, n=n, **kw)


def cls_data(tokenizer, **kw):
    rows = sentiment_rows(32)
    return FineTuneDataModule(
        tokenizer,
        task="classification",
        train=rows,
        val=rows[:8],
        test=rows[:8],
        labels=LABELS,
        max_length=32,
        batch_size=8,
        **kw,
    )


@pytest.mark.parametrize("packing", [False, True])
def test_causal_lm_loss_falls(tmp_path, tokenizer, packing):
    torch.manual_seed(0)
    module = SFTModule(model=tiny_llama(len(tokenizer)), learning_rate=1e-2)
    rec = LossRecorder()
    trainer(tmp_path, callbacks=[rec]).fit(module, lm_data(tokenizer, packing=packing))
    assert len(rec.losses) == 20
    assert sum(rec.losses[-3:]) / 3 < 0.7 * sum(rec.losses[:3]) / 3


def test_classification_loss_falls_and_test_writes_confusion(tmp_path, tokenizer):
    torch.manual_seed(0)
    module = SFTModule(model=tiny_bert(len(tokenizer)), task="classification", labels=LABELS, learning_rate=5e-3)
    rec = LossRecorder()
    t = trainer(tmp_path, callbacks=[rec])
    dm = cls_data(tokenizer)
    t.fit(module, dm)
    assert sum(rec.losses[-3:]) / 3 < 0.7 * sum(rec.losses[:3]) / 3
    result = t.test(module, dm)[0]
    assert set(result) >= {"test/loss", "test/acc", "test/f1", "test/precision_positive", "test/recall_negative"}
    assert (tmp_path / "confusion_matrix_test.png").read_bytes()[:4] == b"\x89PNG"
    assert "| negative |" in (tmp_path / "confusion_matrix_test.md").read_text()


def test_validation_scores_choices(tmp_path, tokenizer):
    module = SFTModule(model=tiny_llama(len(tokenizer)))
    result = trainer(tmp_path, limit_val_batches=1.0).validate(module, lm_data(tokenizer))[0]
    assert {"val/loss", "val/ppl", "val/acc", "val/choice_acc", "val/choice_f1"} <= set(result)
    assert math.isclose(result["val/ppl"], math.exp(result["val/loss"]), rel_tol=1e-4)


def test_bf16_mixed_precision_trains(tmp_path, tokenizer):
    module = SFTModule(model=tiny_llama(len(tokenizer)), learning_rate=1e-3)
    rec = LossRecorder()
    trainer(tmp_path, max_steps=3, precision="bf16-mixed", callbacks=[rec]).fit(module, lm_data(tokenizer))
    assert len(rec.losses) == 3 and all(math.isfinite(x) for x in rec.losses)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    batch = next(iter(_loader(tokenizer)))
    grads = []
    for checkpointing in (False, True):
        module = SFTModule(model=tiny_llama(len(tokenizer)), gradient_checkpointing=checkpointing)
        module.configure_model()
        module.model.train()
        module.step(batch, "train").backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    assert module.model.is_gradient_checkpointing
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def _loader(tokenizer):
    dm = lm_data(tokenizer)
    dm.setup("fit")
    return dm.train_dataloader()


def test_no_weight_decay_on_biases_and_norms():
    model = tiny_bert(100)
    groups = decay_groups(model.named_parameters(), 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        expect = not (name.endswith("bias") or "LayerNorm" in name)
        assert (id(p) in decayed) == expect, name
    assert groups[1]["weight_decay"] == 0.0


def test_schedules():
    linear = warmup_decay("linear", warmup_steps=4, total_steps=14)
    assert [round(linear(s), 3) for s in (0, 3, 4, 9, 14)] == [0.2, 0.8, 1.0, 0.5, 0.0]
    cosine = warmup_decay("cosine", warmup_steps=0, total_steps=10, min_ratio=0.1)
    assert cosine(0) == 1.0 and math.isclose(cosine(5), 0.55) and math.isclose(cosine(10), 0.1)
    with pytest.raises(ValueError, match="unknown scheduler"):
        warmup_decay("step", 0, 1)


def test_scheduler_is_stepped_per_optimizer_step(tmp_path, tokenizer):
    module = SFTModule(model=tiny_llama(len(tokenizer)), learning_rate=1e-3, warmup_steps=5)
    t = trainer(tmp_path, max_steps=5)
    t.fit(module, lm_data(tokenizer))
    lr = t.optimizers[0].param_groups[0]["lr"]
    assert math.isclose(lr, 1e-3 * linear_after(5, 5, 5), rel_tol=1e-6)


def linear_after(step, warmup, total):
    return warmup_decay("linear", warmup, total)(step)


def test_nan_loss_fails_with_advice(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="Lower the learning rate"):
        trainer(tmp_path, max_steps=1).fit(SFTModule(model=model), lm_data(tokenizer))


def test_predict_generates_text_and_labels(tmp_path, tokenizer):
    rows = [{"prompt": r["prompt"]} for r in instruction_rows(4)]
    dm = FineTuneDataModule(tokenizer, task="instruction", predict=rows, max_length=128, batch_size=2)
    out = trainer(tmp_path).predict(SFTModule(model=tiny_llama(len(tokenizer)), max_new_tokens=3), dm)
    assert [len(b) for b in out] == [2, 2] and all(isinstance(s, str) for b in out for s in b)

    dm = FineTuneDataModule(tokenizer, task="classification", predict=sentiment_rows(5), labels=LABELS, batch_size=4)
    module = SFTModule(model=tiny_bert(len(tokenizer)), task="classification", labels=LABELS)
    preds = [p for b in trainer(tmp_path).predict(module, dm) for p in b]
    assert len(preds) == 5 and set(preds) <= set(LABELS)


def test_parameter_counts_logged(tmp_path, tokenizer, caplog):
    import logging

    caplog.set_level(logging.INFO)
    trainer(tmp_path, max_steps=1).fit(SFTModule(model=tiny_llama(len(tokenizer))), lm_data(tokenizer))
    assert any("trainable of" in r.message for r in caplog.records)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="labels"):
        SFTModule(model_name_or_path="x", task="classification")
    with pytest.raises(ValueError, match="unknown task"):
        SFTModule(model_name_or_path="x", task="seq2seq")
    with pytest.raises(ValueError, match="model_name_or_path"):
        SFTModule()


def test_prediction_writer_writes_jsonl_in_order(tmp_path, tokenizer):
    import json

    from lightning_ft.callbacks import PredictionWriter

    rows = sentiment_rows(5)
    dm = FineTuneDataModule(tokenizer, task="classification", predict=rows, labels=LABELS, batch_size=2)
    module = SFTModule(model=tiny_bert(len(tokenizer)), task="classification", labels=LABELS)
    out = tmp_path / "preds.jsonl"
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(out)])
    batches = t.predict(module, dm)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(5))
    assert [x["prediction"] for x in lines] == [p for b in batches for p in b]


def test_logits_only_at_target_positions_match_full_logits(tokenizer):
    """The loss computed from logits_to_keep equals the loss from the full (B, T, V) logits."""
    from lightning_ft.modules.objectives import causal_lm_sums, target_mask

    module = SFTModule(model=tiny_llama(len(tokenizer)))
    module.configure_model()
    module.model.eval()
    dm = lm_data(tokenizer)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert module._takes_logits_to_keep()
    with torch.no_grad():
        full = module(batch)
        expected = causal_lm_sums(full, batch["labels"])
        got = module.target_logits(batch, batch["labels"])
        assert got.shape == (int(target_mask(batch["labels"]).sum()), len(tokenizer))
        loss = module.step(batch, "val")  # the summed loss (TokenMeanLoss makes the step's mean)
        torch.testing.assert_close(loss, expected[0], atol=1e-4, rtol=1e-5)
        scores = module.score_choices(batch, "val")
        assert scores.shape == (len(batch["choice_target"]), 2)


def test_nan_loss_is_checked_at_the_logging_interval(tmp_path, tokenizer):
    """No host sync per step: a NaN loss is noted on the device and raised every log_every_n_steps batches."""
    model = tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    module = SFTModule(model=model)
    batches = LossRecorder()
    with pytest.raises(FloatingPointError, match=r"train loss is nan at step 0\. Lower the learning rate"):
        trainer(tmp_path, max_steps=10, log_every_n_steps=3, callbacks=[batches]).fit(module, lm_data(tokenizer))
    assert len(batches.losses) == 3  # found at the third batch, not the first nor the tenth


def test_nonfinite_loss_watch():
    from lightning_ft.modules.loss_watch import NonFiniteLossWatch

    watch = NonFiniteLossWatch()
    watch.check("train")  # nothing seen
    watch.update(torch.tensor(1.5), 0)
    watch.check("train")
    for step, value in enumerate([2.0, float("inf"), float("nan")], start=4):
        watch.update(torch.tensor(value), step)
    with pytest.raises(FloatingPointError, match="val loss is inf at step 5"):
        watch.check("val")
    watch.check("val")  # reset by the check


def test_confusion_report_never_goes_to_the_current_directory(tmp_path, tokenizer, monkeypatch):
    from lightning_ft.report import report_dir

    monkeypatch.chdir(tmp_path)
    bare = L.Trainer(logger=False, accelerator="cpu", devices=1)
    assert bare.default_root_dir == str(tmp_path) and report_dir(bare) is None  # Lightning's fallback: the cwd
    module = SFTModule(model=tiny_bert(len(tokenizer)), task="classification", labels=LABELS)
    L.Trainer(logger=False, accelerator="cpu", devices=1, enable_progress_bar=False).test(module, cls_data(tokenizer))
    assert not list(tmp_path.glob("confusion_matrix_*"))
    run = tmp_path / "run"
    assert report_dir(L.Trainer(logger=False, default_root_dir=run)) == run


def test_token_throughput_counts_without_per_batch_syncs(tmp_path, tokenizer):
    from lightning_ft.callbacks import TokenThroughput
    from lightning_ft.callbacks.throughput import batch_tokens, count_tokens

    class Masks(L.Callback):
        def __init__(self):
            self.tokens = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.tokens += int(batch["attention_mask"].sum())

    batch = {"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    assert isinstance(batch_tokens(batch), torch.Tensor) and count_tokens(batch) == 3
    assert count_tokens({"input_ids": torch.zeros(2, 5)}) == 10 and count_tokens([1]) == 0
    meter, masks = TokenThroughput(log_every=3), Masks()
    trainer(tmp_path, max_steps=7, callbacks=[meter, masks]).fit(
        SFTModule(model=tiny_llama(len(tokenizer))), lm_data(tokenizer)
    )
    assert meter.tokens == masks.tokens > 0 and meter.seconds > 0 and meter.tokens_per_second > 0
    assert meter.state_dict() == {"tokens": masks.tokens, "seconds": meter.seconds}
    with pytest.raises(ValueError, match="log_every"):
        TokenThroughput(log_every=0)
