"""Integration: the real MiniLM, fine-tuned on a few hundred MR sentences, beats the majority class."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import require_mr, require_packaged

from lightning_ft import FineTuneDataModule, SFTModule
from lightning_ft.report import majority_baseline

LABELS = ["negative", "positive"]


@pytest.mark.integration
def test_minilm_on_mr_beats_majority_class(tmp_path):
    require_packaged("all-minilm-l6-v2")
    mr = require_mr()
    torch.manual_seed(0)
    dm = FineTuneDataModule(
        "all-minilm-l6-v2",
        task="classification",
        train=f"{mr}/classification/train.jsonl",
        test=f"{mr}/classification/test.jsonl",
        labels=LABELS,
        max_length=64,
        batch_size=16,
        eval_batch_size=64,
        max_train_examples=800,
        max_eval_examples=300,
        group_by_length=True,
    )
    module = SFTModule("all-minilm-l6-v2", task="classification", labels=LABELS, learning_rate=1e-4)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, dm)
    acc = trainer.test(module, dm)[0]["test/acc"]
    majority = majority_baseline([e["label"] for e in dm.splits["test"].examples])
    assert acc > majority + 0.1, (acc, majority)
