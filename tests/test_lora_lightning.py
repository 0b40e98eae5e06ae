"""The LoRA and MergeAdapters callbacks and LoRAModule, on tiny random Llama and BERT models with a Trainer."""

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

from lightning_ft import FineTuneDataModule, LoRAModule
from lightning_ft._compat import get_strict_loading
from lightning_ft.callbacks import LoRA, MergeAdapters
from lightning_ft.callbacks.lora import MARKER, adapter_state_keys
from lightning_ft.callbacks.merge import export_adapters
from lightning_ft.lora import inject_lora, load_peft_adapter, lora_layers

LABELS = ["negative", "positive"]


def cls_data(tokenizer):
    rows = sentiment_rows(16)
    return FineTuneDataModule(
        tokenizer, task="classification", train=rows, val=rows[:8], test=rows[:8], labels=LABELS, batch_size=8
    )


def without_adapters(state: dict) -> dict:
    """A state dict with adapter weights dropped and ``.base_layer`` removed from names: the base model's keys."""
    return {
        k.replace(".base_layer", ""): v for k, v in state.items() if k.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")
    }


class UserLM(L.LightningModule):
    """A user's own module: the model is built in ``__init__``; no lightning-ft base class."""

    def __init__(self, vocab_size: int, lr: float = 1e-2):
        super().__init__()
        self.vocab_size, self.lr = vocab_size, lr
        self.model = self.build()

    def build(self):
        return tiny_llama(self.vocab_size).train()

    def training_step(self, batch, batch_idx):
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class LazyUserLM(UserLM):
    """A user's module that builds the model in ``configure_model`` (the callback's setup runs before it)."""

    def build(self):
        return None

    def configure_model(self):
        if self.model is None:
            self.model = tiny_llama(self.vocab_size).train()


@pytest.mark.parametrize("module_cls", [UserLM, LazyUserLM])
def test_callback_on_a_users_module_trains_only_adapters(tmp_path, tokenizer, module_cls):
    module = module_cls(len(tokenizer))
    rec = LossRecorder()
    # one batch of 4 rows, seen every step: the loss must fall
    quick_trainer(tmp_path, callbacks=[LoRA(r=4, exclude_modules=["o_proj"]), rec]).fit(module, lm_data(tokenizer, n=4))
    parts = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    assert set(lora_layers(module)) == {f"model.model.layers.{i}.{p}" for i in (0, 1) for p in parts}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    base = without_adapters(module.state_dict())
    reference = {f"model.{k}": v for k, v in tiny_llama(len(tokenizer)).state_dict().items()}
    assert base.keys() == reference.keys()
    assert all(torch.equal(base[k], reference[k]) for k in reference)  # bitwise unchanged
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora_layers(module).values())
    assert rec.losses[-1] < 0.95 * rec.losses[0] and rec.losses[-1] < min(rec.losses[:-1])
    assert "configure_model" not in module.__dict__ and get_strict_loading(module) is None  # left as found


def test_double_injection_is_an_error(tmp_path, tokenizer):
    module = UserLM(len(tokenizer))
    inject_lora(module.model, r=2)
    with pytest.raises(RuntimeError, match="already has LoRA adapters"):
        quick_trainer(tmp_path, callbacks=[LoRA()]).fit(module, lm_data(tokenizer))
    with pytest.raises(RuntimeError, match="more than one LoRA callback"):
        quick_trainer(tmp_path, callbacks=[LoRA(), LoRA()]).fit(UserLM(len(tokenizer)), lm_data(tokenizer))
    module = UserLM(len(tokenizer))
    quick_trainer(tmp_path, max_steps=1, callbacks=[LoRA(r=4)]).fit(module, lm_data(tokenizer))
    with pytest.raises(RuntimeError, match="already has LoRA adapters"):
        quick_trainer(tmp_path, max_steps=1, callbacks=[LoRA(r=2)]).fit(module, lm_data(tokenizer))
    with pytest.raises(ValueError, match="rank"):
        LoRA(r=0)


def test_lora_module_classification_then_validate_and_test(tmp_path, tokenizer):
    torch.manual_seed(0)
    module = LoRAModule(model=tiny_bert(len(tokenizer)), task="classification", labels=LABELS, learning_rate=1e-2, r=4)
    head_before = tiny_bert(len(tokenizer)).classifier.weight
    t = quick_trainer(tmp_path, max_steps=6, limit_val_batches=1.0)
    dm = cls_data(tokenizer)
    t.fit(module, dm)
    assert module.model.classifier.weight.requires_grad  # modules_to_save defaults to the head
    assert not torch.equal(module.model.classifier.weight, head_before)
    adapters = {n: layer.lora_B.clone() for n, layer in lora_layers(module).items()}
    assert set(t.validate(module, dm, verbose=False)[0]) >= {"val/loss", "val/acc"}
    assert set(t.test(module, dm, verbose=False)[0]) >= {"test/loss", "test/f1"}
    again = quick_trainer(tmp_path, limit_test_batches=1.0).test(module, dm, verbose=False)[
        0
    ]  # a new Trainer, same settings: no re-injection
    assert {n: layer.lora_B for n, layer in lora_layers(module).items()}.keys() == adapters.keys()
    assert all(torch.equal(lora_layers(module)[n].lora_B, b) for n, b in adapters.items())
    assert again["test/loss"] == pytest.approx(t.callback_metrics["test/loss"].item())


def test_merge_adapters_writes_peft_adapter_and_merged_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dm = lm_data(tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    module = LoRAModule(
        model=tiny_llama(len(tokenizer)),
        learning_rate=1e-2,
        r=4,
        use_rslora=True,
        merged_dir=str(merged_dir),
        adapter_dir=str(adapter_dir),
    )
    before = LogitsAtFitEnd(batch)
    t = quick_trainer(tmp_path, max_steps=4, callbacks=[before], limit_val_batches=1, enable_checkpointing=True)
    t.fit(module, dm)
    assert before.adapted and before.logits is not None  # recorded before the merge
    assert not lora_layers(module) and MARKER in module.__dict__  # merged in memory
    merged = eval_logits(module.model, batch)
    loaded = AutoModelForCausalLM.from_pretrained(merged_dir)
    torch.testing.assert_close(eval_logits(loaded, batch), merged, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, before.logits, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(merged_dir).encode("hello world") == tokenizer.encode("hello world")
    assert not list(tmp_path.glob(".merged*"))  # atomic: no temporary folder left

    assert {p.name for p in adapter_dir.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    reloaded = load_peft_adapter(tiny_llama(len(tokenizer)), adapter_dir)
    torch.testing.assert_close(eval_logits(reloaded, batch), before.logits, atol=1e-5, rtol=0)
    assert set(t.validate(module, dm, verbose=False)[0]) >= {"val/loss"}  # the merged module keeps working
    assert not lora_layers(module)
    with pytest.raises(RuntimeError, match="merged into the model"):  # adapter-only checkpoint vs merged model
        t.validate(module, dm, ckpt_path=t.checkpoint_callback.best_model_path, verbose=False)


def test_merge_adapters_needs_a_hugging_face_model_and_a_dir():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject_lora(module, r=2)
    with pytest.raises(ValueError, match="no Hugging Face model"):
        export_adapters(module, merged_dir="unused")
    with pytest.raises(ValueError, match="merged_dir"):
        MergeAdapters()


def _resume_run(tmp_path, tokenizer, pretrained, ckpt_path=None, **lora):
    torch.manual_seed(1)
    module = LoRAModule(
        pretrained,
        learning_rate=5e-3,
        r=4,
        warmup_steps=2,
        weight_decay=0.01,
        use_dora=True,
        bias="lora_only",
        **lora,
    )
    rec = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    t = quick_trainer(tmp_path, max_steps=10, deterministic=True, enable_checkpointing=True, callbacks=[rec, ckpt])
    # 20 rows of batch 4: step 5 ends an epoch; the length-grouped sampler's order depends only on seed and epoch
    t.fit(module, lm_data(tokenizer, n=20, group_by_length=True), ckpt_path=ckpt_path)
    return module, rec.losses, t


def test_adapter_only_checkpoint_resumes_exactly(tmp_path, tokenizer):
    pretrained = str(tmp_path / "pretrained")  # the model is built lazily in configure_model, from this folder
    tiny_llama(len(tokenizer)).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    straight, losses, t = _resume_run(tmp_path / "a", tokenizer, pretrained)
    path = tmp_path / "a" / "ckpt" / "step=5.ckpt"
    ckpt = torch.load(path, weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys == set(adapter_state_keys(straight))
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude", "bias") for k in keys)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["lightning_ft_lora"]["adapter_only"]
    lora_cb = next(cb for cb in t.callbacks if isinstance(cb, LoRA))
    adapter_mb, full_mb = lora_cb.checkpoint_megabytes
    assert adapter_mb < 0.3 * full_mb

    assert "fuse" not in ckpt["lightning_ft_lora"]["config"]  # speed-only settings: a resume may switch them
    # the straight run was fused (the default); the resumed one is not, and still resumes exactly
    resumed, resumed_losses, _ = _resume_run(tmp_path / "b", tokenizer, pretrained, ckpt_path=path, fuse=False)
    assert all(layer._fused is None for layer in lora_layers(resumed).values())
    assert any(layer._fused is not None for layer in lora_layers(straight).values())
    assert len(losses) == 10 and len(resumed_losses) == 5
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(losses[5:]), atol=1e-6, rtol=0)
    final, again = resumed.state_dict(), straight.state_dict()
    for k in keys:
        torch.testing.assert_close(final[k], again[k], atol=1e-6, rtol=0, msg=k)

    evaluated = LoRAModule(pretrained, r=4, use_dora=True, bias="lora_only")  # evaluate an adapter-only checkpoint
    quick_trainer(tmp_path / "d", limit_val_batches=1).validate(
        evaluated, lm_data(tokenizer), ckpt_path=path, verbose=False
    )
    assert all(torch.equal(evaluated.state_dict()[k], v) for k, v in ckpt["state_dict"].items())

    mismatched = LoRAModule(model=tiny_llama(len(tokenizer)), r=4, target_modules=["q_proj"])
    with pytest.raises(RuntimeError, match="does not fit this LoRA model"):
        quick_trainer(tmp_path / "c", max_steps=10).fit(mismatched, lm_data(tokenizer), ckpt_path=path)


def test_gradient_checkpointing_with_a_frozen_base_trains(tmp_path, tokenizer):
    module = LoRAModule(model=tiny_llama(len(tokenizer)), gradient_checkpointing=True, learning_rate=1e-2, r=4)
    rec = LossRecorder()
    quick_trainer(tmp_path, max_steps=3, callbacks=[rec]).fit(module, lm_data(tokenizer))
    assert module.model.is_activation_checkpointing and len(rec.losses) == 3
    assert all(layer.lora_B.abs().sum() > 0 for layer in lora_layers(module).values())

    # a user's module with reentrant checkpointing and no input grads would fail with
    # "element 0 of tensors does not require grad": the callback makes the input embeddings require grad
    user = UserLM(len(tokenizer))
    user.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    user.model.disable_input_require_grads()
    user.model.train()
    quick_trainer(tmp_path, max_steps=2, callbacks=[LoRA(r=4)]).fit(user, lm_data(tokenizer))
    assert all(layer.lora_B.abs().sum() > 0 for layer in lora_layers(user).values())


def test_loraplus_learning_rates(tmp_path, tokenizer):
    module = LoRAModule(
        model=tiny_llama(len(tokenizer)),
        learning_rate=1e-3,
        loraplus_lr_ratio=16,
        weight_decay=0.1,
        use_dora=True,
        scheduler="constant",
        r=4,
    )
    t = quick_trainer(tmp_path, max_steps=1)
    t.fit(module, lm_data(tokenizer))
    groups = {g["name"]: g for g in t.optimizers[0].param_groups}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3) and groups["decay"]["lr"] == pytest.approx(1e-3)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["lora_B"]["weight_decay"] == 0.1
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    for name, layer in lora_layers(module).items():
        assert id(layer.lora_B) in ids["lora_B"] and id(layer.lora_A) in ids["decay"], name
        assert id(layer.lora_magnitude) in ids["no_decay"], name
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        LoRAModule(model_name_or_path="x", loraplus_lr_ratio=0)
