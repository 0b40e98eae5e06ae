"""The pure-torch quantised base (``lightning_ft.quant``): NF4 / int8 linear layers under LoRA, on tiny random
Llama, Qwen2 and GPT-2 (``Conv1D``) models, without a Trainer."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama, tiny_qwen2
from torch import nn

from lightning_ft.lora import inject_lora, lora_layers, merge_lora
from lightning_ft.quant import (
    QuantizeConfig,
    QuantizedLinear,
    dequantize_base,
    is_quantized,
    quantize_base,
    quantized_layers,
    quantized_weight_bytes,
)
from lightning_ft.resume_checks import base_fingerprint, compare_fingerprints

VOCAB = 300


BUILDERS = {"llama": lambda: tiny_llama(VOCAB), "qwen2": lambda: tiny_qwen2(VOCAB), "gpt2": lambda: tiny_gpt2(VOCAB)}


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_quantised_layers_stay_linear_and_close_to_the_base(arch, dtype):
    model = BUILDERS[arch]()
    x = ids()
    ref = logits(model, x)
    targets = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and "lm_head" not in n]
    quantize_base(model, dtype=dtype)
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(targets)  # every linear layer but the output head
    assert all(isinstance(m, nn.Linear) and not m.weight.requires_grad for m in layers.values())
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantizedLinear)
    out = logits(model, x)
    err = (out - ref).abs().max() / ref.abs().max()
    # 4 bits vs 8 bits per weight: NF4 is coarser, and neither is exact (a no-op would pass a lone upper bound)
    assert 0 < err < (0.15 if dtype == "nf4" else 0.02), err
    dense = sum(m.in_features * m.out_features * 4 for m in layers.values())
    assert quantized_weight_bytes(model) < (0.2 if dtype == "nf4" else 0.3) * dense


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_lora_over_a_quantised_base_trains_only_the_adapters(arch, dtype):
    model = BUILDERS[arch]().train()
    quantize_base(model, dtype=dtype)
    inject_lora(model, r=4, alpha=8)
    quantised = {
        n
        for n, p in model.named_parameters()
        if isinstance(p, type(next(iter(quantized_layers(model).values())).weight))
    }
    assert quantised and all(".base_layer." in n for n in quantised)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = ids()
    losses = []
    for _ in range(12):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.2, losses
    named = dict(model.named_parameters())
    assert all(named[n].grad is None and not named[n].requires_grad for n in quantised)
    in_optimizer = {id(p) for p in opt.state}
    assert in_optimizer == {id(p) for p in trainable} and not any(id(named[n]) in in_optimizer for n in quantised)
    assert {n.rsplit(".", 1)[-1] for n, p in named.items() if p.requires_grad} == {"lora_A", "lora_B"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dequantize_restores_plain_layers_in_the_original_dtype(arch):
    model = BUILDERS[arch]().to(torch.bfloat16)
    kinds = {n: type(m) for n, m in model.named_modules()}
    quantize_base(model, dtype="nf4")
    values = {n: m.dequantized_weight(torch.float32) for n, m in quantized_layers(model).items()}
    x = ids()
    quantised_out = logits(model, x)
    dequantize_base(model)
    assert not is_quantized(model)
    assert {n: type(m) for n, m in model.named_modules()} == kinds  # Conv1D stays Conv1D
    for name, w in values.items():
        layer = model.get_submodule(name)
        assert layer.weight.dtype == torch.bfloat16
        got = layer.weight.T if kinds[name].__name__ == "Conv1D" else layer.weight
        torch.testing.assert_close(got.float(), w, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, x), quantised_out, atol=0, rtol=0)


def test_merge_after_dequantising_in_float32_matches_the_quantised_adapted_model():
    model = tiny_llama(VOCAB)
    quantize_base(model)
    inject_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)
    x = ids()
    adapted = logits(model, x)
    dequantize_base(model, torch.float32)
    merge_lora(model)
    assert not lora_layers(model) and not is_quantized(model)
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=0)


def test_double_quantisation_trades_scale_precision_for_memory():
    w = torch.randn(64, 128) * torch.linspace(0.1, 3, 128)
    layers = {}
    for dq in (True, False):
        lin = nn.Linear(128, 64, bias=False)
        lin.weight.data.copy_(w)
        layers[dq] = QuantizedLinear.from_linear(lin, QuantizeConfig(double_quant=dq))
    # without double quantisation each block scale is exact: the largest |value| of every block comes back exactly
    blocks = w.bfloat16().float().reshape(-1, 64)
    exact = layers[False].dequantized_weight(torch.float32).reshape(-1, 64)
    torch.testing.assert_close(exact.abs().amax(1), blocks.abs().amax(1), atol=0, rtol=1e-2)
    double = layers[True].dequantized_weight(torch.float32).reshape(-1, 64)
    assert not torch.allclose(double.abs().amax(1), blocks.abs().amax(1), atol=0, rtol=1e-3)
    assert layers[True].weight_bytes() < layers[False].weight_bytes()


def test_dora_over_nf4_runs_and_merges():
    model = tiny_llama(VOCAB)
    quantize_base(model)
    inject_lora(model, r=4, use_dora=True)
    x = ids()
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert all(layer.lora_magnitude.grad is not None for layer in lora_layers(model).values())
    adapted = logits(model, x)
    dequantize_base(model, torch.float32)
    merge_lora(model)
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=0)


# ---- errors --------------------------------------------------------------------------------------------------------
def test_quantising_twice_is_an_error():
    model = tiny_llama(VOCAB)
    quantize_base(model)
    with pytest.raises(RuntimeError, match="already quantised"):
        quantize_base(model, dtype="int8")


def test_unsupported_layers_and_shapes_are_refused_before_any_change():
    with pytest.raises(TypeError, match="only nn.Linear and transformers' Conv1D"):
        QuantizedLinear.from_linear(nn.Conv2d(3, 4, 3), QuantizeConfig())
    with pytest.raises(ValueError, match="no linear layers"):
        quantize_base(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)))
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 5))  # 240 values: not a multiple of 64
    with pytest.raises(ValueError, match=r"block_size=64 does not divide .*1 \(5x48\)"):
        quantize_base(model, target_modules=["0", "1"])
    assert not is_quantized(model)  # checked before the first layer changed
    quantize_base(model, target_modules=["0", "1"], block_size=16)
    assert len(quantized_layers(model)) == 2
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.raises(ValueError, match="meta device"):
        quantize_base(meta, target_modules=["0"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        QuantizeConfig(dtype="int4")


def test_missing_backend_names_the_install_command(monkeypatch):
    from lightning_ft.quant import backend

    real = importlib.import_module

    def no_torchao(name, *args):
        if name.startswith("torchao"):
            raise ModuleNotFoundError("No module named 'torchao'")
        return real(name, *args)

    monkeypatch.setattr(backend.importlib, "import_module", no_torchao)
    model = tiny_llama(VOCAB)
    with pytest.raises(ImportError, match=r"pip install 'lightning-ft\[quant\]'"):
        quantize_base(model)
    assert not is_quantized(model)


# ---- fingerprints --------------------------------------------------------------------------------------------------
def test_fingerprint_of_a_quantised_base_reads_its_values():
    a, b = tiny_llama(VOCAB, seed=0), tiny_llama(VOCAB, seed=1)
    quantize_base(a)
    quantize_base(b)
    fa, fb = base_fingerprint(a), base_fingerprint(b)
    assert "model.layers.0.self_attn.q_proj.weight" in fa["samples"]  # sampled, not skipped as exotic storage
    assert compare_fingerprints(fa, base_fingerprint(a)) == []
    assert any("sampled tensors differ" in line for line in compare_fingerprints(fa, fb))


@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_the_autograd_graph_keeps_no_dense_copy_of_a_quantised_weight(dtype):
    """Between forward and backward only the packed weights may be alive: a float copy per layer saved for the
    backward pass would cost more memory than a float32 base (torchao's int8 ``F.linear`` saves one)."""
    model = tiny_llama(VOCAB)
    quantize_base(model, dtype=dtype)
    inject_lora(model, r=4, alpha=8)
    shapes = {tuple(m.weight.shape) for m in quantized_layers(model).values()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    dense = [tuple(t.shape) for t in saved if type(t) is torch.Tensor and tuple(t.shape) in shapes]
    assert dense == []
    loss.backward()
    assert all(layer.lora_B.grad is not None for layer in lora_layers(model).values())


def test_quantising_a_memory_mapped_model_lets_its_file_go(tmp_path):
    """A model loaded from safetensors lives in a memory map of the file; after quantisation the plain tensors are
    copied out, so the map (and the float weights' resident pages) can be released. Tied weights stay tied."""
    import gc

    from transformers import AutoModelForCausalLM

    tiny_llama(VOCAB).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    path = str((tmp_path / "m" / "model.safetensors").resolve())
    if path not in open("/proc/self/maps").read():
        pytest.skip("transformers did not memory-map the weights here")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "proj" not in n}
    quantize_base(model, dtype="nf4", block_size=32)
    gc.collect()
    assert path not in open("/proc/self/maps").read()
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name
