"""Resuming from a checkpoint taken in the middle of an epoch continues with exactly the batches an unbroken run sees:
20 steps == 7 steps + resume + 13 steps, for full, LoRA and sparse fine-tuning, with gradient accumulation, length
grouping and packing. (2-process runs: ``test_distributed.py``, FSDP2 resumed from a mid-epoch sharded checkpoint.)"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import tiny_llama, varied_rows
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft import FineTuneDataModule, LoRAModule, SFTModule, SparseModule

STEPS, CKPT_STEP = 20, 7


def make_module(method: str, vocab: int) -> L.LightningModule:
    model = tiny_llama(vocab)
    if method == "sft":
        return SFTModule(model=model, learning_rate=1e-3)
    if method == "lora":
        return LoRAModule(model=model, r=4, alpha=8, learning_rate=1e-2)
    return SparseModule(model=model, density=0.1, criterion="magnitude", learning_rate=1e-2)


def fit(tokenizer, root, method, ckpt_path=None, accumulate=1, **data_kw) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    module = make_module(method, len(tokenizer))
    data = FineTuneDataModule(
        tokenizer, task="instruction", train=varied_rows(20, longest=32), max_length=128, batch_size=2, **data_kw
    )
    checkpoints = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=CKPT_STEP, save_top_k=-1, filename="{step}"
    )
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        limit_val_batches=0,
        callbacks=[checkpoints],
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert trainer.global_step == STEPS
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


CASES = [
    ("sft", {}),
    ("lora", {}),
    ("sparse", {}),
    ("lora", {"accumulate": 2}),
    ("lora", {"group_by_length": True}),
    ("lora", {"packing": True}),
]


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{'-'.join(o) or 'plain'}" for m, o in CASES])
def test_mid_epoch_resume_equals_an_unbroken_run(tokenizer, tmp_path, method, options):
    unbroken = fit(tokenizer, tmp_path / "a", method, **options)
    ckpt = tmp_path / "a" / "ckpt" / f"step={CKPT_STEP}.ckpt"
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]
    batches = state["combined_loader"][0]["batches"]
    per_epoch = -(-state["combined_loader"][0]["num_examples"] // 2)  # batches of 2, the last one short
    assert 0 < batches < per_epoch, "the checkpoint must lie inside an epoch"
    resumed = fit(tokenizer, tmp_path / "b", method, ckpt_path=str(ckpt), **options)
    for name, ref in unbroken.items():
        torch.testing.assert_close(resumed[name], ref, atol=1e-6, rtol=0, msg=name)


def test_resume_with_other_training_data_is_refused(tokenizer, tmp_path):
    fit(tokenizer, tmp_path / "a", "lora")
    ckpt = str(tmp_path / "a" / "ckpt" / f"step={CKPT_STEP}.ckpt")
    with pytest.raises(ValueError, match=r"other training data \(num_examples: 20 -> 12\)"):
        fit(tokenizer, tmp_path / "b", "lora", ckpt_path=ckpt, max_train_examples=12)


def test_resume_after_an_epoch_cut_short_by_limit_train_batches(tokenizer, tmp_path):
    """``limit_train_batches=3`` of a 10-batch epoch, checkpoint at the epoch's last batch: the next epoch starts
    afresh (its own order from the beginning), as in the unbroken run."""

    def run(root, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        module = make_module("lora", len(tokenizer))
        data = FineTuneDataModule(
            tokenizer, task="instruction", train=varied_rows(20, longest=32), max_length=128, batch_size=2
        )
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
        trainer = L.Trainer(
            max_steps=7,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            limit_val_batches=0,
            limit_train_batches=3,
            callbacks=[checkpoints],
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    unbroken = run(tmp_path / "a")
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "a" / "ckpt" / "step=3.ckpt"))
    for name, ref in unbroken.items():
        torch.testing.assert_close(resumed[name], ref, atol=1e-6, rtol=0, msg=name)


def test_a_checkpoint_inside_an_accumulation_window_warns(tokenizer, tmp_path):
    """Validation (and its checkpoint) after batch 5 with accumulate_grad_batches=2 lies inside a window: warned."""
    L.seed_everything(0, verbose=False)
    module = make_module("lora", len(tokenizer))
    data = FineTuneDataModule(
        tokenizer,
        task="instruction",
        train=varied_rows(20, longest=32),
        val=varied_rows(4, longest=4),
        max_length=128,
        batch_size=2,
    )
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        val_check_interval=5,
        accumulate_grad_batches=2,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}-{epoch}")],
    )
    with pytest.warns(UserWarning, match="inside a gradient-accumulation window"):
        trainer.fit(module, data)
