"""Resume checks: a checkpoint records the method's settings and a fingerprint of the base model; a resume with other
settings, on another base or without the method's callback is refused with one message (issue 10, item 2)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import lm_data, quick_trainer, tiny_llama

from lightning_ft.callbacks import LoRA, LowRankCompression, SparseMask
from lightning_ft.resume_checks import base_fingerprint, check_before_load, compare_fingerprints

TARGETS = ["q_proj", "v_proj"]


class LM(L.LightningModule):
    """A user's own module (no lightning-ft base class); ``seed`` / ``vocab_size`` pick its random base model."""

    def __init__(self, vocab_size: int, seed: int = 0):
        super().__init__()
        self.model = tiny_llama(vocab_size, seed=seed).train()

    def loss(self, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        return self.model(**inputs).loss

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class CheckingLM(LM):
    """A module without a lightning-ft callback that runs the checks itself (what ``FineTuneModule`` does)."""

    def on_load_checkpoint(self, checkpoint):
        check_before_load(self, checkpoint)


def fit(tmp_path, tokenizer, callbacks, module=None, ckpt_path=None, max_steps=2):
    module = module if module is not None else LM(len(tokenizer))
    trainer = quick_trainer(tmp_path, max_steps=max_steps, callbacks=callbacks)
    trainer.fit(module, lm_data(tokenizer, n=8), ckpt_path=ckpt_path)
    return module, trainer


def saved_with(tmp_path, tokenizer, callbacks) -> str:
    _, trainer = fit(tmp_path, tokenizer, callbacks)
    path = str(tmp_path / "saved.ckpt")
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory, tokenizer):
    return saved_with(tmp_path_factory.mktemp("lora"), tokenizer, [LoRA(r=4, alpha=16, target_modules=TARGETS)])


@pytest.fixture(scope="module")
def sparse_ckpt(tmp_path_factory, tokenizer):
    cb = SparseMask(density=0.05, criterion="random", target_modules=TARGETS)
    return saved_with(tmp_path_factory.mktemp("sparse"), tokenizer, [cb])


def refused(tmp_path, tokenizer, path, callbacks, module=None) -> str:
    with pytest.raises(RuntimeError) as err:
        fit(tmp_path, tokenizer, callbacks, module=module, ckpt_path=path, max_steps=3)
    message = str(err.value)
    assert "size mismatch" not in message and "Missing key" not in message
    return message


def test_checkpoint_records_settings_and_base_fingerprint(lora_ckpt):
    entry = torch.load(lora_ckpt, weights_only=True)["lightning_ft_lora"]
    assert entry["callback"] == "LoRA" and entry["adapter_only"]
    assert entry["config"]["alpha"] == 16 and entry["config"]["r"] == 4
    assert entry["constructor"] == "LoRA(r=4, target_modules=['q_proj', 'v_proj'])"
    base = entry["base"]
    assert base["class"] == "LlamaForCausalLM" and "model.model.embed_tokens.weight" in base["parameters"]
    assert not any("lora_" in n or "base_layer" in n for n in base["parameters"])  # the base, not the adapters
    assert base["samples"]


def test_alpha_change_is_refused_with_the_difference(tmp_path, tokenizer, lora_ckpt):
    message = refused(tmp_path, tokenizer, lora_ckpt, [LoRA(r=4, alpha=32, target_modules=TARGETS)])
    assert "alpha: 16 -> 32" in message
    assert "r: " not in message and "base model" not in message.split("Resume")[0]  # only what differs
    assert "allow_config_change=True" in message and "LoRA(r=4, alpha=16" in message


def test_rank_change_is_refused_clearly(tmp_path, tokenizer, lora_ckpt):
    message = refused(tmp_path, tokenizer, lora_ckpt, [LoRA(r=8, alpha=16, target_modules=TARGETS)])
    assert "r: 4 -> 8" in message and "lora_A (4, 32) -> (8, 32)" in message and message.count("\n") < 6
    assert "not even with allow_config_change=True" in message  # no escape hatch for other shapes


@pytest.mark.parametrize("other", ["weights", "shapes"])
def test_another_base_model_is_refused(tmp_path, tokenizer, lora_ckpt, other):
    module = LM(len(tokenizer), seed=1) if other == "weights" else LM(len(tokenizer) + 16)
    message = refused(tmp_path, tokenizer, lora_ckpt, [LoRA(r=4, alpha=16, target_modules=TARGETS)], module=module)
    assert "written on another base model" in message and "allow_config_change=True" in message
    if other == "weights":
        assert "base model weights:" in message and "sampled tensors differ" in message
    else:
        n = len(tokenizer)
        assert f"model.model.embed_tokens.weight ({n}, 32) -> ({n + 16}, 32)" in message


def test_allow_config_change_is_the_escape_hatch(tmp_path, tokenizer, lora_ckpt):
    cb = LoRA(r=4, alpha=32, target_modules=TARGETS, allow_config_change=True)
    with pytest.warns(UserWarning, match="alpha: 16 -> 32"):
        module, trainer = fit(tmp_path / "a", tokenizer, [cb], ckpt_path=lora_ckpt, max_steps=3)
    assert trainer.global_step == 3 and module.model.model.layers[0].self_attn.q_proj.scaling == 8
    with pytest.warns(UserWarning, match="sampled tensors differ"):  # another base, on purpose
        fit(tmp_path / "b", tokenizer, [cb], module=LM(len(tokenizer), seed=1), ckpt_path=lora_ckpt, max_steps=3)
    # other shapes cannot load whatever the flag says, and still no size-mismatch dump
    cb = LoRA(r=8, target_modules=TARGETS, allow_config_change=True)
    message = refused(tmp_path / "c", tokenizer, lora_ckpt, [cb])
    assert "r: 4 -> 8" in message and "lora_A (4, 32) -> (8, 32)" in message and "start a new run" in message


def test_adapter_only_checkpoint_without_its_callback_names_it(tmp_path, tokenizer, lora_ckpt):
    needed = "Add LoRA(r=4, target_modules=['q_proj', 'v_proj']) to Trainer(callbacks=[...])"
    # another method's callback in the Trainer
    message = refused(tmp_path / "a", tokenizer, lora_ckpt, [SparseMask(density=0.05, criterion="random")])
    assert "written with the LoRA callback (lightning_ft.callbacks.LoRA)" in message and needed in message
    # no callback at all: the module's on_load_checkpoint runs the check (lightning-ft's modules do)
    message = refused(tmp_path / "b", tokenizer, lora_ckpt, [], module=CheckingLM(len(tokenizer)))
    assert "This run has no LoRA callback" in message and needed in message


def test_sft_module_names_the_missing_callback(tmp_path, tokenizer, lora_ckpt):
    from lightning_ft import SFTModule

    module = SFTModule(model=tiny_llama(len(tokenizer)).train(), learning_rate=1e-3)
    message = refused(tmp_path, tokenizer, lora_ckpt, [], module=module)
    assert "Add LoRA(r=4, target_modules=['q_proj', 'v_proj']) to Trainer(callbacks=[...])" in message


@pytest.mark.parametrize(
    ("setting", "value", "line"),
    [
        ("density", 0.1, "density: 0.05 -> 0.1"),
        ("criterion", "magnitude", "criterion: 'random' -> 'magnitude'"),
    ],
)
def test_sparse_setting_change_is_refused(tmp_path, tokenizer, sparse_ckpt, setting, value, line):
    kwargs = {"density": 0.05, "criterion": "random", "target_modules": TARGETS, setting: value}
    message = refused(tmp_path, tokenizer, sparse_ckpt, [SparseMask(**kwargs)])
    assert line in message and "SparseMask(" in message and "allow_config_change=True" in message
    # evaluation takes its masks from the checkpoint: selection settings do not matter there
    module = LM(len(tokenizer))
    quick_trainer(tmp_path, limit_val_batches=1, callbacks=[SparseMask(**kwargs)]).validate(
        module, lm_data(tokenizer, n=8), ckpt_path=sparse_ckpt, verbose=False
    )
    saved = torch.load(sparse_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in saved.items())


def test_checkpoint_of_an_earlier_version_loads_with_a_warning(tmp_path, tokenizer, lora_ckpt):
    ckpt = torch.load(lora_ckpt, weights_only=True)
    cb = LoRA(r=4, alpha=16, target_modules=TARGETS)
    # what earlier versions wrote (they had no speed-only settings)
    earlier = {k: v for k, v in cb.lora_kwargs.items() if k not in ("fuse", "compile")}
    ckpt["lightning_ft_lora"] = {"adapter_only": True, "config": repr(earlier)}
    old = str(tmp_path / "old.ckpt")
    torch.save(ckpt, old)
    with pytest.warns(UserWarning, match="earlier lightning-ft and records no base model"):
        _, trainer = fit(tmp_path / "a", tokenizer, [cb], ckpt_path=old, max_steps=3)
    assert trainer.global_step == 3
    # its settings are still compared
    message = refused(tmp_path / "b", tokenizer, old, [LoRA(r=4, alpha=32, target_modules=TARGETS)])
    assert "alpha: 16 -> 32" in message


def test_compressed_checkpoint_names_its_callback_and_settings(tmp_path, tokenizer):
    def callbacks(ratio):
        return [LowRankCompression(rank_ratio=ratio, target_modules=TARGETS), LoRA(r=2, target_modules=TARGETS)]

    path = saved_with(tmp_path, tokenizer, callbacks(0.5))
    message = refused(tmp_path / "a", tokenizer, path, callbacks(0.5)[1:])
    assert "LowRankCompression callback" in message and "LowRankCompression(rank_ratio=0.5" in message
    message = refused(tmp_path / "b", tokenizer, path, callbacks(0.25))
    assert "rank_ratio: 0.5 -> 0.25" in message and "ranks:" in message


def test_fingerprint_tolerates_dtype_and_tells_models_apart(tokenizer):
    model = tiny_llama(len(tokenizer))
    fp = base_fingerprint(model)
    assert fp == base_fingerprint(model)  # deterministic
    assert compare_fingerprints(fp, base_fingerprint(tiny_llama(len(tokenizer)).to(torch.bfloat16))) == []
    lines = compare_fingerprints(fp, base_fingerprint(tiny_llama(len(tokenizer), seed=1)))
    assert len(lines) == 1 and lines[0].startswith("base model weights:")


def test_fingerprint_of_a_sharded_model_uses_global_shapes_only(tokenizer):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_llama(len(tokenizer))
        plain_fp = base_fingerprint(model)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        sharded_fp = base_fingerprint(model)
    finally:
        dist.destroy_process_group()
    assert sharded_fp["parameters"] == plain_fp["parameters"] and not sharded_fp["samples"]
    assert compare_fingerprints(plain_fp, sharded_fp) == [] == compare_fingerprints(sharded_fp, plain_fp)
