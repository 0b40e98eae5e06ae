"""Our LoRA against Hugging Face ``peft`` (the test-only oracle): same numbers, and adapter files both ways."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_bert, tiny_llama

from lightning_ft.lora import LoRALinear, inject_lora, load_peft_adapter, lora_layers, merge_lora, save_peft_adapter

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

VOCAB = 64
IDS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


BASES = {"llama": lambda: tiny_llama(VOCAB), "bert": lambda: tiny_bert(VOCAB), "gpt2": tiny_gpt2}
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "gpt2": ["c_attn", "c_proj"],
}


def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


@torch.no_grad()
def perturb(model, seed: int = 1) -> None:
    """Move every trainable tensor (B, A, DoRA magnitude, modules_to_save, trained biases) off its init."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def peft_config(arch: str, **kw) -> LoraConfig:
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], "lora_dropout": 0.0, **kw}
    return LoraConfig(fan_in_fan_out=arch == "gpt2", **kw)


def ours(arch: str, **kw):
    kw = {"r": 4, "alpha": 8, "target_modules": TARGETS[arch], **kw}
    return inject_lora(BASES[arch](), **kw)


def peft_layers(model) -> dict[str, LoraLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


VARIANTS = [
    ("llama", {}),
    ("llama", {"use_rslora": True}),
    ("llama", {"use_dora": True}),
    ("gpt2", {}),
    ("gpt2", {"use_dora": True}),
    ("bert", {"use_rslora": True, "use_dora": True}),
]


@pytest.mark.parametrize(("arch", "kw"), VARIANTS)
def test_same_weights_give_peft_logits_and_gradients(arch, kw):
    theirs = get_peft_model(BASES[arch](), peft_config(arch, **kw))
    perturb(theirs)
    mine = ours(arch, **kw)
    their_layers = peft_layers(theirs)
    assert their_layers.keys() == lora_layers(mine).keys()
    with torch.no_grad():
        for name, layer in lora_layers(mine).items():
            layer.lora_A.copy_(their_layers[name].lora_A["default"].weight)
            layer.lora_B.copy_(their_layers[name].lora_B["default"].weight)
            if layer.use_dora:
                layer.lora_magnitude.copy_(their_layers[name].lora_magnitude_vector["default"].weight)
    out_mine, out_theirs = logits(mine), logits(theirs)
    torch.testing.assert_close(out_mine, out_theirs, atol=1e-5, rtol=0)
    out_mine.pow(2).mean().backward()
    out_theirs.pow(2).mean().backward()
    for name, layer in lora_layers(mine).items():
        other = their_layers[name]
        torch.testing.assert_close(layer.lora_A.grad, other.lora_A["default"].weight.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B.grad, other.lora_B["default"].weight.grad, atol=1e-5, rtol=0)
        if layer.use_dora:
            grad = other.lora_magnitude_vector["default"].weight.grad
            torch.testing.assert_close(layer.lora_magnitude.grad, grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "kw"), [("llama", {"use_dora": True}), ("gpt2", {}), ("gpt2", {"use_dora": True})])
def test_merge_matches_and_restores_the_original_classes(arch, kw):
    model = BASES[arch]()
    types = {n: type(m) for n, m in model.named_modules()}
    inject_lora(model, r=4, alpha=8, target_modules=TARGETS[arch], **kw)
    perturb(model)
    with torch.no_grad():
        before = logits(model)
        merge_lora(model)
        torch.testing.assert_close(logits(model), before, atol=1e-4, rtol=0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules()} == types  # GPT-2 keeps its Conv1D


EXPORTS = [
    ("llama", {}),
    ("llama", {"use_rslora": True}),
    ("llama", {"use_dora": True}),
    ("llama", {"rank_pattern": {r"layers\.1\.self_attn\.q_proj": 2, "down_proj": 3}, "alpha_pattern": {"v_proj": 4}}),
    ("gpt2", {"use_dora": True}),
    ("bert", {"modules_to_save": ["classifier"], "bias": "all"}),
    ("bert", {"bias": "lora_only", "use_dora": True}),
]


@pytest.mark.parametrize(("arch", "kw"), EXPORTS)
def test_our_export_loads_in_peft(arch, kw, tmp_path):
    mine = ours(arch, **kw)
    perturb(mine)
    save_peft_adapter(mine, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(BASES[arch](), tmp_path / "adapter").eval()
    their_layers = peft_layers(theirs)
    assert their_layers.keys() == lora_layers(mine).keys()
    for name, layer in lora_layers(mine).items():  # rank_pattern / alpha_pattern reproduced per layer
        assert (their_layers[name].r["default"], their_layers[name].scaling["default"]) == (layer.r, layer.scaling)
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs), logits(mine), atol=1e-4, rtol=0)
    if "rank_pattern" in kw:
        assert {layer.r for layer in lora_layers(mine).values()} == {2, 3, 4}


IMPORTS = [
    ("llama", {"rank_pattern": {"model.layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
    ("llama", {"use_dora": True, "use_rslora": True}),
    ("gpt2", {}),
    ("gpt2", {"use_dora": True}),
    ("bert", {"task_type": "SEQ_CLS", "bias": "lora_only"}),  # peft adds the classifier to modules_to_save
]


@pytest.mark.parametrize(("arch", "kw"), IMPORTS)
def test_peft_saved_adapter_loads_and_reexports(arch, kw, tmp_path):
    theirs = get_peft_model(BASES[arch](), peft_config(arch, **kw))
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = logits(theirs)
        mine = load_peft_adapter(BASES[arch](), tmp_path / "peft")
        torch.testing.assert_close(logits(mine), expected, atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in mine.parameters())  # trainable=False, like peft
    save_peft_adapter(mine, tmp_path / "ours")  # and back: the biases are kept although frozen now
    again = PeftModel.from_pretrained(BASES[arch](), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(again), expected, atol=1e-4, rtol=0)


def test_export_format_and_trainable_load(tmp_path):
    mine = ours("gpt2", rank_pattern={r"h\.0\.attn\.c_attn": 2})
    perturb(mine)
    save_peft_adapter(mine, tmp_path / "a")
    save_peft_adapter(mine, tmp_path / "a")  # atomic overwrite, no temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"]
    assert config["target_modules"] == ["c_attn", "c_proj"]
    assert config["rank_pattern"] == {"transformer.h.0.attn.c_attn": 2}
    loaded = load_peft_adapter(tiny_gpt2(), tmp_path / "a", trainable=True)
    trainable = {n.rsplit(".", 1)[-1] for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded), logits(mine), atol=1e-5, rtol=0)


def test_a_subset_of_same_named_layers_is_exported_exactly(tmp_path):
    mine = ours("llama", target_modules=r"model\.layers\.0\.self_attn\.q_proj")
    save_peft_adapter(mine, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # a suffix list would also pick layer 1
    theirs = PeftModel.from_pretrained(tiny_llama(VOCAB), tmp_path / "a")
    assert list(peft_layers(theirs)) == ["model.layers.0.self_attn.q_proj"]


def test_pissa_keeps_the_output_matches_peft_and_exports_against_the_residual_base(tmp_path):
    base = tiny_llama(VOCAB)
    with torch.no_grad():
        original = logits(base)
    mine = inject_lora(base, r=4, alpha=8, target_modules=TARGETS["llama"], init="pissa")
    with torch.no_grad():
        torch.testing.assert_close(logits(mine), original, atol=1e-5, rtol=0)
    theirs = get_peft_model(tiny_llama(VOCAB), peft_config("llama", init_lora_weights="pissa"))
    for name, layer in lora_layers(mine).items():
        other = peft_layers(theirs)[name]
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.delta_weight(), other.get_delta_weight("default"), atol=1e-5, rtol=0)
    perturb(mine)
    save_peft_adapter(mine, tmp_path / "a")
    residual = tiny_llama(VOCAB)
    base_weights = {k.replace(".base_layer", ""): v for k, v in mine.state_dict().items() if ".lora_" not in k}
    residual.load_state_dict(base_weights)
    with torch.no_grad():
        expected = logits(mine)
        on_residual = logits(PeftModel.from_pretrained(residual, tmp_path / "a"))
        on_original = logits(PeftModel.from_pretrained(tiny_llama(VOCAB), tmp_path / "a"))
    torch.testing.assert_close(on_residual, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(on_original, expected, atol=1e-2)  # the documented caveat


def test_loading_into_another_shape_fails_naming_the_layer_and_leaves_the_model_plain(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    save_peft_adapter(ours("llama"), tmp_path / "a")
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    flags = [p.requires_grad for p in wider.parameters()]
    message = r"layer model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: shape \(4, 32\) in the adapter but \(4, 64\)"
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(wider, tmp_path / "a")
    assert not lora_layers(wider) and [p.requires_grad for p in wider.parameters()] == flags


def test_bad_adapters_are_refused_clearly(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_peft_adapter(tiny_llama(VOCAB), tmp_path / "none")
    path = save_peft_adapter(ours("llama"), tmp_path / "a")
    with pytest.raises(RuntimeError, match="already has LoRA adapters"):
        load_peft_adapter(ours("llama"), path)
    state = load_file(path / "adapter_model.safetensors")
    state.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(state, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing keys .*q_proj\.lora_A\.weight.*1 unexpected keys .*lora_C"):
        load_peft_adapter(tiny_llama(VOCAB), path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query"]}))
    with pytest.raises(ValueError, match=r"\['query'\] match no module of LlamaForCausalLM"):
        load_peft_adapter(tiny_llama(VOCAB), path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'IA3' adapter; only LORA"):
        load_peft_adapter(tiny_llama(VOCAB), path)
