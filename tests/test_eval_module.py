"""Evaluation through FineTuneModule: AUROC / AP / ECE logged and written, figures in the CSV, TensorBoard and
W&B-offline loggers, generated answers scored and written next to the metrics."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import instruction_rows, sentiment_rows, tiny_bert, tiny_llama, varied_rows
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_ft import FineTuneDataModule, SFTModule
from lightning_ft.evaluation import curves as C
from lightning_ft.evaluation.generation import generate_text
from lightning_ft.evaluation.text_metrics import GenerationMetrics

LABELS = ["negative", "positive"]
FIGURES = {"test_roc.png", "test_pr.png", "test_reliability.png", "test_confusion_matrix.png"}


def trainer(logger, tmp_path, **kw) -> L.Trainer:
    kw.setdefault("max_steps", 6)
    return L.Trainer(
        accelerator="cpu",
        logger=logger,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        **kw,
    )


def classification(tokenizer, seed=0):
    # unequal classes in test (10 positive, 7 negative) and a 3-row last batch
    test = sentiment_rows(20)[:17] + sentiment_rows(4)[1::2]
    dm = FineTuneDataModule(
        tokenizer, task="classification", train=sentiment_rows(32), val=sentiment_rows(8), test=test,
        labels=LABELS, max_length=32, batch_size=8, eval_batch_size=7,
    )  # fmt: skip
    return dm, SFTModule(model=tiny_bert(len(tokenizer), seed=seed), task="classification", labels=LABELS,
                         learning_rate=1e-3)  # fmt: skip


def oracle_probs(module, dm) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    probs, target = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            probs.append(module(batch).softmax(-1))
            target.append(batch["labels"])
    return torch.cat(probs), torch.cat(target)


def test_classifier_metrics_and_figures_with_csv_logger(tmp_path, tokenizer):
    dm, module = classification(tokenizer)
    t = trainer(CSVLogger(tmp_path), tmp_path)
    t.fit(module, dm)
    (logged,) = t.test(module, dm)
    run = tmp_path / "lightning_logs" / "version_0"
    probs, target = oracle_probs(module, dm)
    assert target.tolist().count(1) != target.tolist().count(0)
    pos, neg = probs[target == 1, 1], probs[target == 0, 1]
    pairs = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    assert logged["test/auroc"] == pytest.approx(pairs.mean().item(), abs=1e-5)
    assert logged["test/ece"] == pytest.approx(C.expected_calibration_error(probs, target, 15), abs=1e-5)
    written = json.loads((run / "metrics_test.json").read_text())
    assert written["test/ap"] == pytest.approx(logged["test/ap"]) and written["test/acc"] == logged["test/acc"]
    assert "val/auroc" in json.loads((run / "metrics_val.json").read_text())
    names = {p.name for p in (run / "figures").glob("*.png")}
    assert FIGURES | {"loss_curve.png"} <= names
    history = json.loads((run / "loss_history.json").read_text())
    assert len(history["train/loss"]) == 6 and history["val/loss"]


def test_figures_reach_tensorboard(tmp_path, tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dm, module = classification(tokenizer)
    logger = TensorBoardLogger(tmp_path)
    t = trainer(logger, tmp_path)
    t.fit(module, dm)
    t.test(module, dm)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"test/roc", "test/pr", "test/reliability", "test/confusion_matrix", "loss_curve"} <= tags
    image = events.Images("test/roc")[-1]
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 100
    assert FIGURES <= {p.name for p in (tmp_path / "lightning_logs" / "version_0" / "figures").glob("*.png")}


def test_figures_reach_wandb_offline(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    dm, module = classification(tokenizer)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lft-test")
    t = trainer(logger, tmp_path, max_steps=2)
    t.test(module, dm)
    run_dir = logger.experiment.dir  # .../wandb/offline-run-*/files
    import wandb

    wandb.finish()
    media = {p.name.rsplit("_", 2)[0] for p in (tmp_path / "wandb").glob("offline-run-*/files/media/images/test/*.png")}
    assert {"roc", "pr", "reliability", "confusion"} <= {m.split("_")[0] for m in media}, (media, run_dir)


def test_choice_scoring_gets_curves_and_figures(tmp_path, tokenizer):
    test = instruction_rows(12)[:11]  # 6 / 5
    dm = FineTuneDataModule(tokenizer, task="instruction", test=test, max_length=128, eval_batch_size=4)
    module = SFTModule(model=tiny_llama(len(tokenizer)), task="causal_lm", eval_lm_loss=False)
    t = trainer(CSVLogger(tmp_path), tmp_path)
    (logged,) = t.test(module, dm)
    assert {"test/choice_acc", "test/choice_auroc", "test/choice_ap", "test/choice_ece"} <= set(logged)
    assert dm.choice_names["test"] == ["negative", "positive"]
    figures = {p.name for p in (tmp_path / "lightning_logs" / "version_0" / "figures").glob("*.png")}
    assert {"test_choice_roc.png", "test_choice_pr.png", "test_choice_reliability.png"} <= figures
    assert "test_choice_confusion_matrix.png" in figures


def test_generation_metrics_and_answers_written(tmp_path, tokenizer):
    rows = varied_rows(7, longest=4)
    dm = FineTuneDataModule(tokenizer, task="instruction", test=rows, max_length=128, eval_batch_size=3)
    model = tiny_llama(len(tokenizer), seed=4)
    module = SFTModule(model=model, task="causal_lm", max_new_tokens=5, val_generation_rows=5)
    t = trainer(CSVLogger(tmp_path), tmp_path)
    (logged,) = t.test(module, dm)
    run = tmp_path / "lightning_logs" / "version_0"
    records = [json.loads(line) for line in (run / "generations_test.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == [r["response"] for r in rows]  # test: every row, whatever the cap
    # oracle: each prompt alone, generated outside the module
    for r, row in zip(records, rows):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
        ids = torch.tensor([ids["input_ids"] if hasattr(ids, "keys") else ids])
        (alone,) = generate_text(model, tokenizer, ids, torch.ones_like(ids), max_new_tokens=5)
        assert r["prediction"] == alone
    again = GenerationMetrics()
    again.update([r["prediction"] for r in records], [r["reference"] for r in records])
    for name, value in again.compute("test/gen_").items():
        assert logged[name] == pytest.approx(float(value), abs=1e-6)
    assert json.loads((run / "metrics_test.json").read_text())["test/gen_token_f1"] == pytest.approx(
        logged["test/gen_token_f1"]
    )


def test_validation_generates_for_the_first_val_generation_rows(tmp_path, tokenizer):
    rows = varied_rows(7, longest=4)
    dm = FineTuneDataModule(tokenizer, task="instruction", val=rows, max_length=128, eval_batch_size=3)
    module = SFTModule(model=tiny_llama(len(tokenizer), seed=4), task="causal_lm", max_new_tokens=3,
                       val_generation_rows=5)  # fmt: skip
    t = trainer(CSVLogger(tmp_path), tmp_path)
    for _ in range(2):  # the cap holds per validation run, not once per module
        t.validate(module, dm)
        run = tmp_path / "lightning_logs" / "version_0"  # one logger: the second run replaces the file
        records = [json.loads(line) for line in (run / "generations_val.jsonl").read_text().splitlines()]
        assert [r["reference"] for r in records] == [r["response"] for r in rows[:5]]  # 5 of 7 rows: the cap
    assert SFTModule(model=tiny_llama(len(tokenizer)), task="causal_lm").hparams.val_generation_rows == 256


def test_generation_can_be_switched_off(tmp_path, tokenizer):
    dm = FineTuneDataModule(tokenizer, task="instruction", test=varied_rows(3, 2), max_length=128)
    module = SFTModule(model=tiny_llama(len(tokenizer)), task="causal_lm", eval_generation="none")
    (logged,) = trainer(False, tmp_path).test(module, dm)
    assert not any("gen_" in k for k in logged) and "test/loss" in logged
    with pytest.raises(ValueError, match="eval_generation"):
        SFTModule(model=tiny_llama(len(tokenizer)), eval_generation="always")


def test_generation_under_ddp_gathers_every_rank(tmp_path, tokenizer):
    """Two CPU processes (ddp_spawn, gloo): each generates for its share; rank 0 writes every answer once."""
    rows = varied_rows(6, longest=4)
    dm = FineTuneDataModule(tokenizer, task="instruction", test=rows, max_length=128, eval_batch_size=2)
    module = SFTModule(model=tiny_llama(len(tokenizer), seed=4), task="causal_lm", max_new_tokens=4)
    t = trainer(CSVLogger(tmp_path), tmp_path, strategy="ddp_spawn", devices=2)
    (logged,) = t.test(module, dm)
    run = tmp_path / "lightning_logs" / "version_0"
    records = [json.loads(line) for line in (run / "generations_test.jsonl").read_text().splitlines()]
    assert sorted(r["reference"] for r in records) == sorted(r["response"] for r in rows)
    assert {r["rank"] for r in records} == {0, 1}
    again = GenerationMetrics()
    again.update([r["prediction"] for r in records], [r["reference"] for r in records])
    assert logged["test/gen_token_f1"] == pytest.approx(float(again.compute()["token_f1"]), abs=1e-6)
    # validation: a cap of 3 rows in total is 2 per process (ceil(3 / 2)), the first batch of each
    dm = FineTuneDataModule(tokenizer, task="instruction", val=rows, max_length=128, eval_batch_size=2)
    module.hparams.val_generation_rows = 3
    t.validate(module, dm)
    (written,) = (tmp_path / "lightning_logs").glob("version_*/generations_val.jsonl")
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert sorted(r["rank"] for r in records) == [0, 0, 1, 1]


def with_fillers(dm: FineTuneDataModule) -> torch.utils.data.DataLoader:
    """The test rows in their order with a filler row (a copy of another row, as a short rank's shard gets under
    FSDP) after every second row: in the middle and at the end of batches, and one batch of fillers only."""
    from lightning_ft.data.samplers import filler_row

    loader = dm.test_dataloader()
    rows = dm.splits["test"].examples
    mixed = []
    for i, row in enumerate(rows):
        mixed += [row, filler_row(rows[-1 - i])] if i % 2 == 0 else [row]
    mixed += [filler_row(r) for r in rows[: loader.batch_size]]
    return torch.utils.data.DataLoader(mixed, batch_size=loader.batch_size, collate_fn=loader.collate_fn)


@pytest.mark.parametrize("kind", ["classification", "choices", "free_text"])
def test_filler_rows_change_no_metric(tmp_path, tokenizer, kind):
    """Evaluation shard fillers (every target -100, generated answers unscored) leave every logged metric as the
    rows alone give it: losses, accuracies, AUROC / ECE, generation metrics and the written answers."""
    if kind == "classification":
        dm, module = classification(tokenizer)
    else:
        rows = instruction_rows(12)[:11] if kind == "choices" else varied_rows(7, longest=4)
        dm = FineTuneDataModule(tokenizer, task="instruction", test=rows, max_length=128, eval_batch_size=3)
        module = SFTModule(model=tiny_llama(len(tokenizer), seed=4), task="causal_lm", max_new_tokens=4)
    dm.setup("test")
    (alone,) = trainer(CSVLogger(tmp_path / "alone"), tmp_path / "alone").test(module, dm)
    module._tokenizer = tokenizer  # no data module below
    mixed_loader = with_fillers(dm)
    assert any("filler" in b for b in mixed_loader)
    (mixed,) = trainer(CSVLogger(tmp_path / "mixed"), tmp_path / "mixed").test(module, dataloaders=mixed_loader)
    assert mixed.keys() == alone.keys()
    for name, value in alone.items():  # other batch shapes: float32 rounding only
        assert mixed[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    if kind == "free_text":
        written = [
            [json.loads(line) for line in (tmp_path / run / "lightning_logs" / "version_0" / "generations_test.jsonl")
             .read_text().splitlines()]
            for run in ("alone", "mixed")
        ]  # fmt: skip
        assert written[0] == written[1]
