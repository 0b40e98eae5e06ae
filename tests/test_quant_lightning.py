"""``QuantizeBase`` and ``LoRAModule(quantize_base=...)`` with a Trainer: training, merge, peft export, adapter-only
checkpoints, exact resume, the base fingerprint, refusals before training, and the CLI option (tiny random Llama)."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import LogitsAtFitEnd, LossRecorder, eval_logits, instruction_rows, lm_data, quick_trainer, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lightning_ft import LoRAModule
from lightning_ft.callbacks import LoRA, QuantizeBase, SparseMask
from lightning_ft.callbacks.quantize import lora_probe
from lightning_ft.lora import lora_layers
from lightning_ft.quant import dequantize_base, is_quantized, quantize_base, quantized_layers
from lightning_ft.resume_checks import base_fingerprint


class UserLM(L.LightningModule):
    """A user's own module (no lightning-ft base class), its model built in ``configure_model``."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size, self.model = vocab_size, None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_llama(self.vocab_size).train()

    def training_step(self, batch, batch_idx):
        return self.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def first_batch(dm):
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(("quant", "dtype"), [("nf4", torch.float32), ("int8", torch.float32), ("nf4", torch.bfloat16)])
def test_fit_merge_and_peft_export_over_a_quantised_base(tmp_path, tokenizer, quant, dtype):
    from peft import PeftModel

    dm = lm_data(tokenizer)
    batch = first_batch(dm)
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    module = LoRAModule(
        model=tiny_llama(len(tokenizer)).to(dtype),
        quantize_base=quant,
        r=4,
        learning_rate=1e-2,
        merged_dir=str(merged_dir),
        adapter_dir=str(adapter_dir),
    )
    rec, before = LossRecorder(), LogitsAtFitEnd(batch)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    t = quick_trainer(tmp_path, max_steps=8, callbacks=[rec, before, ckpt], enable_checkpointing=True)
    t.fit(module, dm)
    assert sum(rec.losses[-2:]) < sum(rec.losses[:2]) - 0.2, rec.losses  # the loss falls

    # checkpoints: adapters only, plus the quantisation settings; never the quantised base
    saved = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=True)
    assert saved["state_dict"] and all(k.endswith(("lora_A", "lora_B")) for k in saved["state_dict"])
    assert saved["lightning_ft_quant"]["config"]["dtype"] == quant
    assert saved["lightning_ft_quant"]["constructor"].startswith("QuantizeBase(")

    # merged: de-quantised, merged in float32, written in the base's own dtype, and no longer quantised
    assert not is_quantized(module) and not lora_layers(module)
    written = load_file(merged_dir / "model.safetensors")
    assert {v.dtype for v in written.values()} == {dtype}
    merged = eval_logits(module.model, batch)
    bound = 1e-4 if dtype == torch.float32 else 0.1  # a bfloat16 base: the merged weight is rounded to bf16
    assert (merged.float() - before.logits.float()).abs().max() < bound

    # peft: the adapter loads on the full-precision base; on the de-quantised base it gives the trained model
    dequantised = dequantize_base(quantize_base(tiny_llama(len(tokenizer)).to(dtype), dtype=quant))
    peft_model = PeftModel.from_pretrained(dequantised, adapter_dir)
    torch.testing.assert_close(eval_logits(peft_model, batch).float(), before.logits.float(), atol=bound, rtol=0)
    full = PeftModel.from_pretrained(tiny_llama(len(tokenizer)).to(dtype), adapter_dir)
    on_full = eval_logits(full, batch).float()
    assert 0 < (on_full - before.logits.float()).abs().max() < 0.5  # the quantisation error, no more

    t.validate(module, dm, verbose=False)  # evaluates the merged model: not quantised again
    assert not is_quantized(module)


class Probe(L.Callback):
    """Records the types of the layers that the LoRA adapters wrap, when training starts."""

    wrapped: list[str] = []

    def on_train_start(self, trainer, pl_module):
        self.wrapped = [type(m.base_layer).__name__ for m in lora_layers(pl_module).values()]


def test_callbacks_on_a_users_module_in_either_order(tmp_path, tokenizer):
    dm = lm_data(tokenizer)
    for order in ("lora_first", "quant_first"):
        module = UserLM(len(tokenizer))
        callbacks = [LoRA(r=4), QuantizeBase(dtype="int8")]
        callbacks = callbacks if order == "lora_first" else callbacks[::-1]
        probe = Probe()
        quick_trainer(tmp_path / order, max_steps=2, callbacks=[*callbacks, probe]).fit(module, dm)
        assert probe.wrapped and set(probe.wrapped) == {"QuantizedLinear"}, order


# ---- exact resume and the base fingerprint --------------------------------------------------------------------------
def _resume_run(root, tokenizer, pretrained, ckpt_path=None, **kw):
    torch.manual_seed(1)
    kw.setdefault("quantize_base", "nf4")
    module = LoRAModule(pretrained, learning_rate=5e-3, r=4, warmup_steps=2, weight_decay=0.01, **kw)
    rec = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    t = quick_trainer(root, max_steps=8, deterministic=True, enable_checkpointing=True, callbacks=[rec, ckpt])
    t.fit(module, lm_data(tokenizer, n=20), ckpt_path=ckpt_path)  # 5 steps per epoch: step 3 is mid-epoch
    return module, rec.losses


@pytest.fixture
def pretrained(tmp_path, tokenizer):
    def save(seed: int) -> str:
        folder = tmp_path / f"pretrained{seed}"
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return str(folder)

    return save


def test_resume_over_an_nf4_base_is_exact_and_checked(tmp_path, tokenizer, pretrained):
    base = pretrained(0)
    straight, losses = _resume_run(tmp_path / "a", tokenizer, base)
    path = tmp_path / "a" / "ckpt" / "step=3.ckpt"
    resumed, resumed_losses = _resume_run(tmp_path / "b", tokenizer, base, ckpt_path=path)
    assert len(losses) == 8 and len(resumed_losses) == 5
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(losses[3:]), atol=1e-6, rtol=0)
    ours, theirs = resumed.state_dict(), straight.state_dict()
    for key in [k for k in ours if "lora_" in k]:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)

    # the fingerprint is the full-precision base's, taken before quantisation
    saved = torch.load(path, weights_only=True)["lightning_ft_lora"]["base"]["samples"]
    plain = LoRAModule(base)
    plain.configure_model()
    full = base_fingerprint(plain)["samples"]
    key = "model.model.layers.0.self_attn.q_proj.weight"
    assert saved[key] == full[key]

    with pytest.raises(RuntimeError, match="on another base model"):
        _resume_run(tmp_path / "c", tokenizer, pretrained(1), ckpt_path=path)
    with pytest.raises(RuntimeError, match=r"other settings .*\n  dtype: 'nf4' -> 'int8'"):
        _resume_run(tmp_path / "d", tokenizer, base, ckpt_path=path, quantize_base="int8")
    with pytest.warns(UserWarning, match="trained over a quantised base"):
        _resume_run(tmp_path / "e", tokenizer, base, ckpt_path=path, quantize_base=None)


# ---- refusals before training ---------------------------------------------------------------------------------------
def fake_trainer(strategy=None, precision="32-true", callbacks=()):
    return SimpleNamespace(
        strategy=strategy or SimpleNamespace(),
        precision_plugin=SimpleNamespace(precision=precision),
        callbacks=list(callbacks),
    )


def test_unsupported_combinations_are_refused_at_setup():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    quant = QuantizeBase()
    for strategy in (ModelParallelStrategy(), FSDPStrategy()):
        with pytest.raises(RuntimeError, match=f"does not support {type(strategy).__name__}"):
            quant.check_trainer(fake_trainer(strategy))
    with pytest.raises(RuntimeError, match="precision='bf16-true'"):
        quant.check_trainer(fake_trainer(precision="bf16-true"))
    with pytest.raises(RuntimeError, match="does not support SparseMask"):
        quant.check_trainer(fake_trainer(callbacks=[quant, SparseMask(density=0.1)]))
    with pytest.raises(RuntimeError, match="more than one QuantizeBase"):
        quant.check_trainer(fake_trainer(callbacks=[quant, QuantizeBase()]))
    with pytest.raises(RuntimeError, match=r"init='pissa'"):
        quant.check_trainer(fake_trainer(callbacks=[quant, LoRA(init="pissa")]))
    int8 = QuantizeBase(dtype="int8")
    if lora_probe("int8", use_dora=True):  # torchao's Int8Tensor.float() stays packed: LoRALinear cannot read it
        with pytest.raises(RuntimeError, match="use_dora=True\\) over a int8 base"):
            int8.check_trainer(fake_trainer(callbacks=[int8, LoRA(use_dora=True)]))
    else:  # a LoRALinear whose base_weight() de-quantises
        int8.check_trainer(fake_trainer(callbacks=[int8, LoRA(use_dora=True)]))
    quant.check_trainer(fake_trainer(callbacks=[quant, LoRA(use_dora=True)]))  # DoRA reads NF4 weights


def test_refusals_come_before_any_training_step(tmp_path, tokenizer, monkeypatch):
    dm = lm_data(tokenizer)
    rec = LossRecorder()
    with pytest.raises(RuntimeError, match="PiSSA"):
        module = LoRAModule(model=tiny_llama(len(tokenizer)), quantize_base="nf4", init="pissa")
        quick_trainer(tmp_path, callbacks=[rec]).fit(module, dm)
    user_quantised = LoRAModule(model=quantize_base(tiny_llama(len(tokenizer)), dtype="int8"), quantize_base="nf4")
    with pytest.raises(RuntimeError, match="already quantised"):
        quick_trainer(tmp_path, callbacks=[rec]).fit(user_quantised, dm)

    from lightning_ft.quant import backend

    real = importlib.import_module
    monkeypatch.setattr(
        backend.importlib,
        "import_module",
        lambda name, *a: (
            (_ for _ in ()).throw(ModuleNotFoundError(name)) if name.startswith("torchao") else real(name, *a)
        ),
    )
    with pytest.raises(ImportError, match=r"pip install 'lightning-ft\[quant\]'"):
        quick_trainer(tmp_path, callbacks=[rec]).fit(
            LoRAModule(model=tiny_llama(len(tokenizer)), quantize_base="nf4"), dm
        )
    assert rec.losses == []


class UnfreezingLoRAModule(LoRAModule):
    """Unfreezes the quantised weights when it builds its optimizer (a module bug QuantizeBase must catch)."""

    def configure_optimizers(self):
        for layer in quantized_layers(self).values():
            layer.weight.requires_grad_(True)
        return super().configure_optimizers()


def test_quantised_weights_that_were_unfrozen_are_refused(tmp_path, tokenizer):
    module = UnfreezingLoRAModule(model=tiny_llama(len(tokenizer)), quantize_base="nf4")
    rec = LossRecorder()
    with pytest.raises(RuntimeError, match="quantised weights cannot train"):
        quick_trainer(tmp_path, callbacks=[rec]).fit(module, lm_data(tokenizer))
    assert rec.losses == []


# ---- the CLI -------------------------------------------------------------------------------------------------------
def test_cli_help_and_fit_with_quantize_base(tmp_path, tokenizer, capsys):
    from lightning_ft.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    lora_help = capsys.readouterr().out.split("LoRAModule (", 1)[1]
    assert "--model.init_args.quantize_base QUANTIZE_BASE" in lora_help
    assert "Optional[Literal['nf4', 'int8']]" in lora_help.split("quantize_base", 1)[1][:200]

    folder = tmp_path / "pretrained"
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(8)))
    args = ["fit", "--model", "lightning_ft.LoRAModule", "--model.init_args.model_name_or_path", str(folder)]
    args += ["--model.init_args.quantize_base", "nf4", "--model.init_args.adapter_dir", str(tmp_path / "adapter")]
    args += ["--data.task", "instruction", "--data.train", str(rows), "--data.batch_size", "4"]
    args += ["--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    args += ["--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path)]
    main(args)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
