"""The SparseMask callback, MergeAdapters on sparse deltas, and SparseModule, on tiny random models with a Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import (
    LogitsAtFitEnd,
    LossRecorder,
    eval_logits,
    lm_data,
    quick_trainer,
    sentiment_rows,
    tiny_bert,
    tiny_llama,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft import FineTuneDataModule, SparseModule
from lightning_ft._compat import get_strict_loading
from lightning_ft.callbacks import LoRA, SparseMask
from lightning_ft.sparse import load_sparse_delta, sparse_counts, sparse_layers, sparse_state_keys

LABELS = ["negative", "positive"]


def pretrained_state(tokenizer) -> dict:
    return {f"model.{k}": v for k, v in tiny_llama(len(tokenizer)).state_dict().items()}


def dense_weights(module) -> dict:
    """The module's weights with sparse wrappers removed from the names (``q_proj.base_layer.weight`` -> "
    "``q_proj.weight``)."""
    return {
        k.replace(".base_layer", ""): v
        for k, v in module.state_dict().items()
        if not k.endswith((".indices", ".values"))
    }


class UserLM(L.LightningModule):
    """A user's own module: the model is built in ``__init__``; no lightning-ft base class."""

    def __init__(self, vocab_size: int, lr: float = 1e-2):
        super().__init__()
        self.lr = lr
        self.model = tiny_llama(vocab_size).train()

    def training_step(self, batch, batch_idx):
        loss = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        self.log("train_loss", loss)  # switched off during calibration
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def test_callback_on_a_users_module_trains_only_selected_entries(tmp_path, tokenizer):
    module = UserLM(len(tokenizer), lr=3e-2)
    rec = LossRecorder()
    cb = SparseMask(density=0.05, criterion="fisher", calibration_batches=2, exclude_modules=["o_proj"])
    t = quick_trainer(tmp_path, max_steps=8, callbacks=[cb, rec])
    t.fit(module, lm_data(tokenizer, n=4))
    layers = sparse_layers(module)
    assert len(layers) == 12 and not any(n.endswith("o_proj") for n in layers)
    nnz, numel = sparse_counts(module)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == nnz == sum(round(0.05 * layer.numel) for layer in layers.values())
    state = t.optimizers[0].state
    assert sum(s["exp_avg"].numel() for s in state.values()) == nnz  # optimizer state for selected entries only
    reference, now = pretrained_state(tokenizer), dense_weights(module)
    assert all(torch.equal(now[k], reference[k]) for k in reference)  # the base is bitwise unchanged
    assert rec.losses[-1] < 0.95 * rec.losses[0]
    assert "configure_model" not in module.__dict__ and get_strict_loading(module) is None  # left as found


def test_mask_mode_through_lightning_keeps_unselected_entries_bitwise(tmp_path, tokenizer):
    module = SparseModule(
        model=tiny_llama(len(tokenizer)),
        mode="mask",
        criterion="gradient",
        density=0.1,
        calibration_batches=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        scheduler="constant",
    )
    t = quick_trainer(tmp_path, max_steps=20, gradient_clip_val=1.0)
    t.fit(module, lm_data(tokenizer, n=8))
    reference = pretrained_state(tokenizer)
    changed = 0
    for name, layer in sparse_layers(module).items():
        w = layer.base_layer.weight.detach()
        before = reference[f"{name}.weight"]
        inside = torch.zeros(w.numel(), dtype=torch.bool)
        inside[layer.indices] = True
        assert torch.equal(w.view(-1)[~inside], before.view(-1)[~inside]), name  # bitwise, with weight decay on
        changed += int((w.view(-1)[inside] != before.view(-1)[inside]).sum())
    assert changed > 0.9 * sparse_counts(module)[0]
    assert t.optimizers[0].param_groups[0]["weight_decay"] == 0.1  # handed back at teardown


def _resume_run(tmp_path, tokenizer, pretrained, mode, ckpt_path=None):
    torch.manual_seed(1)
    module = SparseModule(
        pretrained,
        learning_rate=5e-3,
        density=0.05,
        criterion="fisher",
        calibration_batches=2,
        mode=mode,
        warmup_steps=2,
        weight_decay=0.01,
        reselect_every=3,
        grow_window=2,
        allocation="global",
    )
    rec = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    t = quick_trainer(tmp_path, max_steps=10, deterministic=True, enable_checkpointing=True, callbacks=[rec, ckpt])
    # 20 rows of batch 4: step 5 ends an epoch; the length-grouped sampler's order depends only on seed and epoch
    t.fit(module, lm_data(tokenizer, n=20, group_by_length=True), ckpt_path=ckpt_path)
    return module, rec.losses, t


@pytest.mark.parametrize("mode", ["delta", "mask"])
def test_sparse_checkpoint_resumes_exactly_with_reselection(tmp_path, tokenizer, mode):
    pretrained = str(tmp_path / "pretrained")
    tiny_llama(len(tokenizer)).save_pretrained(pretrained)
    straight, losses, t = _resume_run(tmp_path / "a", tokenizer, pretrained, mode)
    cb = next(c for c in t.callbacks if isinstance(c, SparseMask))
    assert [h["step"] for h in cb.history] == [3, 6, 9]
    assert all(h["density"] == pytest.approx(0.05, rel=0.05) and h["mask_overlap"] < 1 for h in cb.history)
    path = tmp_path / "a" / "ckpt" / "step=5.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["state_dict"]) == set(sparse_state_keys(straight))
    assert all(k.endswith((".indices", ".values")) for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"] and ckpt["lightning_ft_sparse"]["config"]["mode"] == mode
    assert ckpt["callbacks"]["SparseMask"]["accumulators"]  # step 5 lies in the window before the step-6 re-selection
    adapter_mb, full_mb = cb.checkpoint_megabytes
    assert adapter_mb < 0.1 * full_mb

    resumed, resumed_losses, _ = _resume_run(tmp_path / "b", tokenizer, pretrained, mode, ckpt_path=path)
    assert len(losses) == 10 and len(resumed_losses) == 5
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(losses[5:]), atol=1e-6, rtol=0)
    final, again = resumed.state_dict(), straight.state_dict()
    for k in sparse_state_keys(straight):
        torch.testing.assert_close(final[k], again[k], atol=1e-6, rtol=0, msg=k)

    evaluated = SparseModule(pretrained, density=0.05, mode=mode, allocation="global")  # evaluate a sparse checkpoint
    quick_trainer(tmp_path / "d", limit_val_batches=1).validate(
        evaluated, lm_data(tokenizer), ckpt_path=path, verbose=False
    )
    assert all(torch.equal(evaluated.state_dict()[k], v) for k, v in ckpt["state_dict"].items())

    with pytest.raises(RuntimeError, match="mode="):
        other = "mask" if mode == "delta" else "delta"
        _resume_run(tmp_path / "c", tokenizer, pretrained, other, ckpt_path=path)


def test_delta_and_mask_modes_train_alike_with_gradient_accumulation(tmp_path, tokenizer):
    runs = {}
    for mode in ("delta", "mask"):
        module = SparseModule(
            model=tiny_llama(len(tokenizer)),
            mode=mode,
            density=0.05,
            calibration_batches=2,
            learning_rate=1e-2,
            reselect_every=2,
            grow_window=1,
        )
        rec = LossRecorder()
        t = quick_trainer(tmp_path, max_steps=5, accumulate_grad_batches=2, callbacks=[rec])
        t.fit(module, lm_data(tokenizer, n=8))
        history = next(c for c in t.callbacks if isinstance(c, SparseMask)).history
        runs[mode] = rec.losses, history, {n: layer.indices for n, layer in sparse_layers(module).items()}
    (losses, history, masks), (mask_losses, mask_history, mask_masks) = runs["delta"], runs["mask"]
    torch.testing.assert_close(torch.tensor(mask_losses), torch.tensor(losses), atol=1e-5, rtol=0)
    assert [h["step"] for h in history] == [2, 4] and len(mask_history) == 2
    for h, m in zip(history, mask_history):  # the same accumulated gradients: the same re-selection
        assert h == pytest.approx(m, rel=1e-4)
    assert all(torch.equal(masks[n], mask_masks[n]) for n in masks)


def test_merge_adapters_folds_and_exports_sparse_deltas(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    dm = lm_data(tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "delta"
    module = SparseModule(
        model=tiny_llama(len(tokenizer)),
        learning_rate=1e-2,
        criterion="random",
        lora_equivalent_rank=2,
        merged_dir=str(merged_dir),
        adapter_dir=str(adapter_dir),
    )
    before = LogitsAtFitEnd(batch)
    t = quick_trainer(tmp_path, max_steps=4, callbacks=[before], limit_val_batches=1)
    t.fit(module, dm)
    assert before.adapted and before.logits is not None  # recorded before the merge
    assert not sparse_layers(module)  # merged in memory
    merged = eval_logits(module.model, batch)
    torch.testing.assert_close(merged, before.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        eval_logits(AutoModelForCausalLM.from_pretrained(merged_dir), batch), merged, atol=1e-5, rtol=0
    )

    assert {p.name for p in adapter_dir.iterdir()} == {"sparse_config.json", "sparse_delta.safetensors"}
    reloaded = load_sparse_delta(tiny_llama(len(tokenizer)), adapter_dir)
    assert sparse_counts(reloaded)[0] == sum(2 * sum(layer.weight.shape) for layer in _linears(reloaded))
    torch.testing.assert_close(eval_logits(reloaded, batch), before.logits, atol=1e-5, rtol=0)
    assert set(t.validate(module, dm, verbose=False)[0]) >= {"val/loss"}  # the merged module keeps working
    assert not sparse_layers(module)


def _linears(model):
    return [layer.base_layer for layer in sparse_layers(model).values()]


def test_sparse_module_classification_with_bitfit_and_fisher(tmp_path, tokenizer):
    rows = sentiment_rows(16)
    dm = FineTuneDataModule(tokenizer, task="classification", train=rows, val=rows[:8], labels=LABELS, batch_size=8)
    module = SparseModule(
        model=tiny_bert(len(tokenizer)), task="classification", labels=LABELS, criterion="bitfit", learning_rate=1e-2
    )
    quick_trainer(tmp_path, max_steps=3).fit(module, dm)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("bias") or n.startswith("model.classifier.") for n in trainable)
    assert (
        "model.classifier.weight" in trainable and "model.bert.encoder.layer.0.attention.self.query.bias" in trainable
    )
    assert not sparse_layers(module)

    torch.manual_seed(0)
    module = SparseModule(
        model=tiny_bert(len(tokenizer)),
        task="classification",
        labels=LABELS,
        density=0.1,
        calibration_batches=2,
        learning_rate=3e-2,
    )
    rec = LossRecorder()
    quick_trainer(tmp_path, max_steps=10, callbacks=[rec]).fit(module, dm)
    assert sparse_layers(module) and module.model.classifier.weight.requires_grad
    assert rec.losses[-1] < rec.losses[0]


def test_bad_settings_fail_early(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        SparseMask(density=0)
    with pytest.raises(ValueError, match="unknown sparse criterion 'l1'"):
        SparseModule(model_name_or_path="x", criterion="l1")
    with pytest.raises(ValueError, match="calibration batches"):
        SparseMask(criterion="fisher", calibration_batches=0)
    with pytest.raises(ValueError, match="unknown sparse mode"):
        SparseMask(mode="dense")
    with pytest.raises(ValueError, match="bitfit"):
        SparseMask(criterion="bitfit", reselect_every=10)
    with pytest.raises(ValueError, match="no linear layer named 'query'"):
        quick_trainer(tmp_path, max_steps=1, callbacks=[SparseMask(target_modules=["query"])]).fit(
            UserLM(len(tokenizer)), lm_data(tokenizer)
        )
    with pytest.raises(RuntimeError, match="SparseMask and LoRA cannot adapt the same module"):
        quick_trainer(tmp_path, callbacks=[SparseMask(), LoRA()]).fit(UserLM(len(tokenizer)), lm_data(tokenizer))
    with pytest.raises(RuntimeError, match="more than one"):  # Lightning's own stateful-callback check comes first
        quick_trainer(tmp_path, callbacks=[SparseMask(), SparseMask()]).fit(UserLM(len(tokenizer)), lm_data(tokenizer))
