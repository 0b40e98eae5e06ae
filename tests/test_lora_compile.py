"""The compiled path: ``LoRALinear`` (plain, DoRA, fused siblings) traces without graph breaks, and
``inject_lora(compile=True)`` compiles the blocks in place with the same numbers as eager."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama

from lightning_ft.lora import inject_lora, lora_layers
from lightning_ft.lora.compile import compile_blocks, transformer_blocks

VOCAB = 64
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def perturb(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"rank_pattern": {"k_proj": 3}}], ids=["lora", "dora", "mixed"])
def test_a_block_with_lora_layers_has_no_graph_breaks(kw):
    model = inject_lora(tiny_llama(VOCAB), r=2, alpha=4, **kw)
    perturb(model)
    block = model.model.layers[0]
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(9)[None])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(hidden, position_embeddings=position_embeddings, attention_mask=None)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compile_option_compiles_the_blocks_and_keeps_the_numbers():
    eager = inject_lora(tiny_llama(VOCAB), r=2, alpha=4, rank_pattern={"v_proj": 3}, use_dora=True)
    perturb(eager)
    compiled = inject_lora(tiny_llama(VOCAB), r=2, alpha=4, rank_pattern={"v_proj": 3}, use_dora=True, compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert all(b._compiled_call_impl is not None for b in transformer_blocks(compiled))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged: export and checkpoints work
    torch._dynamo.reset()
    outs = []
    for model in (eager, compiled):
        out = model(input_ids=IDS).logits
        out.pow(2).mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(lora_layers(eager).values(), lora_layers(compiled).values()):
        torch.testing.assert_close(b.lora_A.grad, a.lora_A.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.lora_magnitude.grad, a.lora_magnitude.grad, atol=1e-5, rtol=1e-5)
    assert copy.deepcopy(eager) is not None


def test_compile_without_hugging_face_blocks_is_refused_clearly():
    with pytest.raises(ValueError, match="no transformer blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
