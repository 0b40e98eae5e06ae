"""The pure-torch LoRA core and the shared target-module selection (no Lightning, no peft)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert, tiny_llama
from torch import nn

from lightning_ft.lora import LoRALinear, inject_lora, lora_layers, lora_state_dict, merge_lora, unmerge_lora
from lightning_ft.targets import select_modules

VOCAB = 300


def test_all_linear_skips_output_heads():
    llama = tiny_llama(VOCAB)
    names = select_modules(llama)
    assert "lm_head" not in names and len(names) == 2 * 7  # q k v o gate up down per layer
    bert = tiny_bert(VOCAB)
    names = select_modules(bert)
    assert "classifier" not in names and "bert.pooler.dense" in names


def test_suffix_list_regex_and_exclude():
    model = tiny_llama(VOCAB)
    assert select_modules(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert select_modules(model, r".*\.1\.mlp\..*") == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert "model.layers.0.self_attn.q_proj" not in select_modules(model, exclude_modules=r".*\.0\.self_attn\..*")


def test_unknown_target_lists_candidates():
    with pytest.raises(ValueError, match=r"no linear layer named 'query'.*q_proj"):
        select_modules(tiny_llama(VOCAB), ["query"])


def test_inject_freezes_everything_else_and_zero_b_keeps_output():
    model = tiny_llama(VOCAB)
    x = torch.randint(0, VOCAB, (2, 9))
    ref = model(input_ids=x).logits
    inject_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{m}_proj.lora_{ab}" for i in (0, 1) for m in "qv" for ab in "AB"}
    torch.testing.assert_close(model(input_ids=x).logits, ref, atol=0, rtol=0)
    assert set(lora_state_dict(model)) == trainable


def test_rank_and_alpha_patterns():
    model = inject_lora(tiny_llama(VOCAB), r=4, alpha=8, rank_pattern={r"layers\.1\.": 2}, alpha_pattern={"v_proj": 32})
    layers = lora_layers(model)
    assert layers["model.layers.0.self_attn.q_proj"].r == 4 and layers["model.layers.1.mlp.up_proj"].r == 2
    assert layers["model.layers.0.self_attn.v_proj"].scaling == 32 / 4
    assert layers["model.layers.1.self_attn.v_proj"].scaling == 32 / 2


def test_bias_modes_and_modules_to_save():
    model = inject_lora(tiny_bert(VOCAB), r=2, bias="lora_only", modules_to_save=["classifier"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "bert.embeddings.LayerNorm.bias" not in trainable
    model = inject_lora(tiny_bert(VOCAB), r=2, bias="all")
    assert next(p for n, p in model.named_parameters() if n == "bert.embeddings.LayerNorm.bias").requires_grad


def test_rank_above_layer_size_is_refused():
    with pytest.raises(ValueError, match=r"rank r=40 must be between 1 and min\(in_features, out_features\) = 32"):
        inject_lora(tiny_llama(VOCAB), r=40)


def test_double_injection_and_double_merge_are_refused():
    model = inject_lora(tiny_llama(VOCAB), r=2)
    with pytest.raises(RuntimeError, match="already has LoRA adapters"):
        inject_lora(model, r=2)
    merge_lora(model, unload=False)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="no LoRA adapters"):
        merge_lora(model)


def test_merge_restores_plain_linear_and_matches():
    model = inject_lora(tiny_llama(VOCAB), r=4, use_dora=True)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.2)
    x = torch.randint(0, VOCAB, (2, 9))
    before = model(input_ids=x).logits
    merge_lora(model)
    assert not lora_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(model(input_ids=x).logits, before, atol=1e-4, rtol=0)


def test_merge_of_a_bf16_base_is_done_in_float32():
    """Adding a small update in bf16 would round it away; in float32 then cast, it survives as well as bf16 allows."""
    base = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=4)
    assert layer.lora_A.dtype == torch.float32  # adapters of a half-precision base train in float32
    nn.init.normal_(layer.lora_B, std=1e-3)
    expected = (base.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(base.weight, expected)


def test_pissa_keeps_the_initial_output_and_moves_the_top_singular_values():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    x = torch.randn(5, 32)
    ref = base(x).detach()
    s = torch.linalg.svdvals(base.weight.detach())
    layer = LoRALinear(base, r=4, alpha=8, init="pissa")
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight())[:4], s[:4], atol=1e-4, rtol=0)


def test_a_forward_hook_on_the_base_layer_sees_the_base_output_unchanged():
    """The update goes into the base output in place only when no hook can hold that output; the results agree."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 24), r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 16, requires_grad=True)
    expected = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)

    in_place = layer(x)
    grads = torch.autograd.grad(in_place.square().sum(), [x, layer.lora_A, layer.lora_B])
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda mod, inp, out: seen.append(out))
    hooked = layer(x)
    handle.remove()
    torch.testing.assert_close(seen[0], layer.base_layer(x))  # not the adapted output
    hooked_grads = torch.autograd.grad(hooked.square().sum(), [x, layer.lora_A, layer.lora_B])
    for out in (in_place, hooked):
        torch.testing.assert_close(out, expected)
    for a, b in zip(grads, hooked_grads):
        torch.testing.assert_close(a, b)
