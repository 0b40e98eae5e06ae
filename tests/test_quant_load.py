"""Quantise while loading (``lightning_ft.quant.load``): equal to quantising the loaded model, one float weight at a
time, and what ``QuantizeBase`` does with it (same losses, same resume fingerprint as the in-memory path)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import LossRecorder, lm_data, quick_trainer, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft import LoRAModule
from lightning_ft.callbacks import QuantizeBase
from lightning_ft.models import load_model
from lightning_ft.quant import QuantizeConfig, QuantizedLinear, quantize_base, quantized_layers
from lightning_ft.quant.load import load_quantized

pytest.importorskip("torchao")

MODELS = {  # (builder, load_model task): Conv1D (GPT-2), tied embeddings (Qwen2), a fresh classification head (BERT)
    "llama": (tiny_llama, "causal_lm"),
    "qwen2": (lambda v: tiny_qwen2(v), "causal_lm"),
    "gpt2": (lambda v: tiny_gpt2(v), "causal_lm"),
    "bert": (lambda v: tiny_bert(v).bert, "classification"),
}


def saved(tmp_path, tokenizer, kind: str) -> tuple[str, str]:
    build, task = MODELS[kind]
    folder = tmp_path / kind
    build(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), task


def load(folder: str, task: str):
    return load_model(folder, task=task, labels=["no", "yes"] if task == "classification" else None)


def loaded_on_meta(folder: str, task: str):
    with torch.device("meta"):
        return load(folder, task)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_loading_quantised_equals_quantising_the_loaded_model(tmp_path, tokenizer, kind, dtype):
    folder, task = saved(tmp_path, tokenizer, kind)
    config = QuantizeConfig(dtype=dtype, block_size=32, scaler_block_size=4)
    torch.manual_seed(0)
    expected = quantize_base(load(folder, task), config=config)
    torch.manual_seed(0)
    model = loaded_on_meta(folder, task)
    report = load_quantized(model, config)

    layers, expected_layers = quantized_layers(model), quantized_layers(expected)
    assert set(layers) == set(expected_layers) and report["quantized"] == len(layers) > 0
    ours, theirs = dict(model.named_parameters()), dict(expected.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        q = theirs[name]
        if name.removesuffix(".weight") in layers:  # the same packed values and scales
            assert type(p.data) is type(q.data), name
            ours_q, theirs_q = layers[name[:-7]], expected_layers[name[:-7]]
            assert ours_q.weight_bytes() == theirs_q.weight_bytes()
            torch.testing.assert_close(ours_q.dequantized_weight(), theirs_q.dequantized_weight(), atol=0, rtol=0)
        else:
            torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
        assert p.requires_grad == q.requires_grad, name
    for (name, b), (_, c) in zip(model.named_buffers(), expected.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, atol=0, rtol=0, msg=name)
    if kind == "gpt2":  # tied input and output embeddings stay one parameter
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, len(tokenizer), (2, 7))
    torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits, atol=0, rtol=0)


def float_weights_alive(model, targets: list[str], earlier: list) -> int:
    """Float weights of targeted layers alive now: those still in the model plus any quantised layer's old weight
    that something still references (``earlier``: weak references to them)."""
    gc.collect()
    layers = [model.get_submodule(n) for n in targets]
    in_model = {id(m.weight) for m in layers if not isinstance(m, QuantizedLinear) and not m.weight.is_meta}
    return len(in_model | {id(ref()) for ref in earlier if ref() is not None})


def test_one_float_weight_at_a_time(tmp_path, tokenizer, monkeypatch):
    """When each layer is quantised, its weight is the only float weight of a targeted layer alive: the float model
    never exists in full (quantising the loaded model, by contrast, starts with all of them)."""
    folder, task = saved(tmp_path, tokenizer, "llama")
    config = QuantizeConfig(block_size=32, scaler_block_size=4)
    current = {"model": loaded_on_meta(folder, task)}
    targets = [n for n, _ in current["model"].named_modules() if n.endswith("_proj")]
    seen: list[int] = []
    earlier: list[weakref.ref] = []
    original = QuantizedLinear.from_linear.__func__

    def counting(cls, layer, config):
        seen.append(float_weights_alive(current["model"], targets, earlier))
        earlier.append(weakref.ref(layer.weight))
        return original(cls, layer, config)

    monkeypatch.setattr(QuantizedLinear, "from_linear", classmethod(counting))
    load_quantized(current["model"], config)
    assert seen == [1] * len(targets)

    seen.clear()
    earlier.clear()
    current["model"] = load(folder, task)
    quantize_base(current["model"], config=config)
    assert seen[0] == len(targets)  # the in-memory path: every float weight at the first quantisation


def test_a_meta_parameter_without_a_file_is_named(tmp_path, tokenizer):
    folder, task = saved(tmp_path, tokenizer, "llama")
    model = loaded_on_meta(folder, task)
    model.extra = torch.nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match="extra.weight is on the meta device and records no weight file"):
        load_quantized(model, QuantizeConfig(target_modules=["q_proj"], block_size=32, scaler_block_size=4))


def run(tmp_path, tokenizer, folder: str, model=None) -> tuple[list[float], dict, dict]:
    torch.manual_seed(1)
    module = LoRAModule(folder if model is None else None, model=model, quantize_base="nf4", r=4, learning_rate=1e-2)
    rec = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    t = quick_trainer(tmp_path, max_steps=3, deterministic=True, enable_checkpointing=True, callbacks=[rec, ckpt])
    t.fit(module, lm_data(tokenizer, n=20))
    saved_ckpt = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=True)
    return rec.losses, saved_ckpt["lightning_ft_lora"]["base"], module.state_dict()


def test_quantize_base_loads_quantised_with_the_same_result(tmp_path, tokenizer, monkeypatch):
    folder, _ = saved(tmp_path, tokenizer, "llama")
    calls = []
    monkeypatch.setattr(
        "lightning_ft.callbacks.quantize.load_quantized", lambda *a, **k: calls.append(1) or load_quantized(*a, **k)
    )
    streamed, streamed_base, streamed_state = run(tmp_path / "a", tokenizer, folder)
    assert calls, "QuantizeBase did not load the model quantised"
    calls.clear()
    in_memory, in_memory_base, in_memory_state = run(tmp_path / "b", tokenizer, folder, model=load_model(folder))
    assert not calls  # a model passed in is quantised in memory
    assert streamed == in_memory and len(streamed) == 3
    assert streamed_base == in_memory_base  # the fingerprint: full-precision samples, taken before rounding
    assert streamed_base["samples"] and streamed_base["samples"].keys() == in_memory_base["samples"].keys()
    for key in [k for k in streamed_state if "lora_" in k]:
        torch.testing.assert_close(streamed_state[key], in_memory_state[key], atol=0, rtol=0, msg=key)


def test_only_modules_that_build_their_model_from_safetensors_load_quantised(tmp_path, tokenizer):
    folder, _ = saved(tmp_path, tokenizer, "llama")
    assert QuantizeBase.loads_quantized(LoRAModule(folder))
    assert not QuantizeBase.loads_quantized(LoRAModule(model=tiny_llama(len(tokenizer))))
    assert not QuantizeBase.loads_quantized(LoRAModule("someone/not-downloaded"))
