"""Fused LoRA inputs (``lightning_ft.lora.fused``): same logits and gradients as the unfused layers and as peft, on
four architectures with mixed per-projection ranks; the cache never leaks across calls, modes or in-place changes;
peft round trip, merge / unmerge, deepcopy of a fused model. Plus the cheaper DoRA norm and its cache."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_ft.lora import (
    LoRALinear,
    inject_lora,
    load_peft_adapter,
    lora_layers,
    merge_lora,
    save_peft_adapter,
    unmerge_lora,
)
from lightning_ft.lora.fused import FusedInput

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

VOCAB = 64
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


BASES = {
    "llama": lambda: tiny_llama(VOCAB),
    "qwen2": lambda: tiny_qwen2(VOCAB, intermediate_size=48, max_positions=64),
    "gpt2": lambda: tiny_gpt2(VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0),
    "bert": lambda: tiny_bert(VOCAB),
}
# mixed ranks inside one fused group (q 2, k 5 / key 5, v default 4; gate 3) and alphas that differ per projection
RANKS = {"q_proj": 2, "k_proj": 5, "query": 2, "key": 5, "gate_proj": 3, "c_fc": 6, "attn.c_proj": 2}
ALPHAS = {"v_proj": 3.0, "value": 3.0, "up_proj": 12.0}
FUSED_GROUPS = {"llama": 4, "qwen2": 4, "gpt2": 0, "bert": 2}  # attention + MLP per block; GPT-2's c_attn is one layer


def loss(model) -> torch.Tensor:
    out = model(input_ids=IDS).logits
    return out.pow(2).mean() + out[..., 0].sum() * 0.01  # gradients that weigh positions and logits unequally


@torch.no_grad()
def perturb(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def trio(arch: str, **kw):
    """(fused, unfused, peft) models with the same adapter weights."""
    fused = inject_lora(BASES[arch](), r=4, alpha=8, rank_pattern=RANKS, alpha_pattern=ALPHAS, **kw)
    perturb(fused)
    unfused = inject_lora(BASES[arch](), r=4, alpha=8, rank_pattern=RANKS, alpha_pattern=ALPHAS, fuse=False, **kw)
    unfused.load_state_dict(fused.state_dict())
    names = "|".join(re.escape(n) for n in lora_layers(fused))
    theirs = get_peft_model(
        BASES[arch](),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=f"({names})",
            rank_pattern=RANKS,
            alpha_pattern=ALPHAS,
            fan_in_fan_out=arch == "gpt2",
            use_dora=kw.get("use_dora", False),
        ),
    )
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert peft_layers.keys() == lora_layers(fused).keys()
    with torch.no_grad():
        for name, layer in lora_layers(fused).items():
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
            if layer.use_dora:
                peft_layers[name].lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return fused, unfused, theirs, peft_layers


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", list(BASES))
def test_fused_equals_unfused_and_peft(arch, dora):
    fused, unfused, theirs, peft_layers = trio(arch, use_dora=dora)
    groups = {id(m._fused): m._fused for m in lora_layers(fused).values() if m._fused is not None}
    assert len(groups) == FUSED_GROUPS[arch]
    assert all(m._fused is None for m in lora_layers(unfused).values())
    ranks = {n: m.r for n, m in lora_layers(fused).items()}
    assert len(set(ranks.values())) >= 3  # the mixed ranks really landed in the layers
    losses = [loss(m) for m in (fused, unfused, theirs)]
    for other in losses[1:]:
        torch.testing.assert_close(losses[0], other, atol=1e-5, rtol=1e-5)
    for value in losses:
        value.backward()
    assert all(g.completed and g._x is None for g in groups.values())  # every group fused, and kept nothing
    unfused_layers = lora_layers(unfused)
    for name, layer in lora_layers(fused).items():
        names = ["lora_A", "lora_B"] + (["lora_magnitude"] if dora else [])
        peft_names = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if dora else [])
        for mine, theirs_name in zip(names, peft_names):
            grad = getattr(layer, mine).grad
            assert grad is not None and grad.abs().sum() > 0, f"{name}.{mine} got no gradient"
            torch.testing.assert_close(grad, getattr(unfused_layers[name], mine).grad, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                grad, getattr(peft_layers[name], theirs_name)["default"].weight.grad, atol=1e-5, rtol=1e-5
            )


class CountMM(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_fusion_saves_matmuls_forward_and_backward():
    fused, unfused, _, _ = trio("llama")
    counts = []
    for model in (fused, unfused):
        with CountMM() as c:
            loss(model).backward()
        counts.append(c.calls)
    # per block: q/k/v share one A-product (2 fewer) and gate/up one (1 fewer), forward; backward saves as many again
    # for the A gradients and for the input gradients: 2 blocks x 3 x 3 = 18, less 2 since nothing needs the input
    # gradient of block 0's attention (its input, the embedding, is frozen)
    assert counts[1] - counts[0] == 16, counts


class Siblings(nn.Module):
    """An attention-like parent whose projections can be called with any inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(8, 4)


def siblings_pair():
    fused = inject_lora(Siblings(), r=2, alpha=4, rank_pattern={"k_proj": 3})
    perturb(fused)
    unfused = inject_lora(Siblings(), r=2, alpha=4, rank_pattern={"k_proj": 3}, fuse=False)
    unfused.load_state_dict(fused.state_dict())
    return fused, unfused


def test_the_cache_never_leaks_across_inputs_modes_or_in_place_changes():
    fused, unfused = siblings_pair()
    group = fused.q_proj._fused
    w = torch.randn(3, 8)
    for name in ("q_proj", "k_proj", "v_proj"):  # one full round: the group has seen its members share an input
        torch.testing.assert_close(getattr(fused, name)(w), getattr(unfused, name)(w))
    assert group.completed and group._x is None
    x = torch.randn(3, 8, requires_grad=True)
    # q under no_grad, then k with grad: k must get a differentiable result of its own
    with torch.no_grad():
        fused.q_proj(x)
    out = fused.k_proj(x)
    assert out.requires_grad
    torch.testing.assert_close(out, unfused.k_proj(x))
    # an in-place change of x between siblings is seen
    y = torch.randn(3, 8)
    fused.q_proj(y)
    y.mul_(2)
    torch.testing.assert_close(fused.v_proj(y), unfused.v_proj(y))
    # an optimizer step (in-place change of A) between siblings is seen
    z = torch.randn(3, 8)
    fused.q_proj(z)
    with torch.no_grad():
        fused.k_proj.lora_A.add_(1.0)
        unfused.k_proj.lora_A.add_(1.0)
    torch.testing.assert_close(fused.k_proj(z), unfused.k_proj(z))
    # inference mode (tensors without a version counter), then the same call with grad
    with torch.inference_mode():
        i = torch.randn(3, 8)
        refs = [getattr(unfused, n)(i) for n in ("q_proj", "k_proj", "v_proj")]
        for n, ref in zip(("q_proj", "k_proj", "v_proj"), refs):
            torch.testing.assert_close(getattr(fused, n)(i), ref)
    # a layer called twice with one input gets a correct result both times
    torch.testing.assert_close(fused.q_proj(z), unfused.q_proj(z))
    torch.testing.assert_close(fused.q_proj(z), unfused.q_proj(z))
    assert group.enabled


def test_siblings_that_read_different_inputs_turn_the_group_off():
    fused, unfused = siblings_pair()
    dec, enc = torch.randn(2, 8), torch.randn(5, 8)
    for _ in range(2):  # cross-attention: q reads the decoder, k and v the encoder
        outs = [fused.q_proj(dec), fused.k_proj(enc), fused.v_proj(enc)]
        refs = [unfused.q_proj(dec), unfused.k_proj(enc), unfused.v_proj(enc)]
        for a, b in zip(outs, refs):
            torch.testing.assert_close(a, b)
    assert not fused.q_proj._fused.enabled and fused.q_proj._fused._x is None


def test_dropout_layers_are_not_fused():
    model = inject_lora(tiny_llama(VOCAB), r=2, alpha=4, dropout=0.1)
    assert all(m._fused is None for m in lora_layers(model).values())


def test_fused_model_round_trips_through_peft_files_merge_and_deepcopy(tmp_path):
    fused, unfused, _, _ = trio("llama")
    with torch.no_grad():
        before = fused(input_ids=IDS).logits
    save_peft_adapter(fused, tmp_path / "adapter")
    loaded = load_peft_adapter(tiny_llama(VOCAB), tmp_path / "adapter")
    assert sum(m._fused is not None for m in lora_layers(loaded).values()) == 10  # 2 x (q, k, v, gate, up)
    save_peft_adapter(unfused, tmp_path / "unfused")
    for name in ("adapter_model.safetensors",):
        from safetensors.torch import load_file

        a, b = load_file(tmp_path / "adapter" / name), load_file(tmp_path / "unfused" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # per-projection tensors
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, before, atol=1e-5, rtol=0)
        copied = copy.deepcopy(fused)
        torch.testing.assert_close(copied(input_ids=IDS).logits, before, atol=0, rtol=0)
        group = copied.model.layers[0].self_attn.q_proj._fused
        assert group is not fused.model.layers[0].self_attn.q_proj._fused
        assert any(m is copied.model.layers[0].self_attn.k_proj for m in group.layers)
        pickled = pickle.loads(pickle.dumps(fused))
        torch.testing.assert_close(pickled(input_ids=IDS).logits, before, atol=0, rtol=0)
        merge_lora(fused, unload=False)
        torch.testing.assert_close(fused(input_ids=IDS).logits, before, atol=1e-5, rtol=0)
        unmerge_lora(fused)
        torch.testing.assert_close(fused(input_ids=IDS).logits, before, atol=1e-5, rtol=0)
        merged = merge_lora(fused)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=IDS).logits, before, atol=1e-5, rtol=0)


def test_fused_training_under_activation_checkpointing_matches_unfused():
    from lightning_ft.modeling import enable_activation_checkpointing

    fused, unfused, _, _ = trio("llama")
    for m in (fused, unfused):
        m.train()
        enable_activation_checkpointing(m, input_grads=True)
        loss(m).backward()
    for (name, a), b in zip(lora_layers(fused).items(), lora_layers(unfused).values()):
        torch.testing.assert_close(a.lora_A.grad, b.lora_A.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert isinstance(fused.model.layers[0].self_attn.q_proj._fused, FusedInput)


# ---- DoRA's norm -----------------------------------------------------------------------------------------------
def dense_norm(layer: LoRALinear) -> torch.Tensor:
    return torch.linalg.norm(layer.base_weight().double() + layer.delta_weight().double(), dim=1)


def test_dora_norm_equals_the_dense_norm_and_its_cache_follows_the_base():
    layer = LoRALinear(nn.Linear(16, 12), r=4, alpha=8, use_dora=True)
    perturb(layer)
    torch.testing.assert_close(layer.weight_norm().double(), dense_norm(layer), atol=1e-5, rtol=1e-5)
    # a load of base weights (in place), merge / unmerge, .to(float64): the cached ||W_i||^2 follows
    with torch.no_grad():
        layer.base_layer.weight.mul_(3.0)
    torch.testing.assert_close(layer.weight_norm().double(), dense_norm(layer), atol=1e-5, rtol=1e-5)
    layer.base_layer.load_state_dict({"weight": torch.randn(12, 16), "bias": torch.zeros(12)})
    torch.testing.assert_close(layer.weight_norm().double(), dense_norm(layer), atol=1e-5, rtol=1e-5)
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight_norm().double(), dense_norm(layer), atol=1e-5, rtol=1e-5)
    layer.base_layer.weight.data = torch.randn(12, 16)  # swapped storage, same parameter object
    torch.testing.assert_close(layer.weight_norm().double(), dense_norm(layer), atol=1e-5, rtol=1e-5)
    layer.double()
    assert layer.weight_norm().dtype == torch.float32
    torch.testing.assert_close(layer.weight_norm().double(), dense_norm(layer), atol=1e-5, rtol=1e-5)
    pissa = LoRALinear(nn.Linear(16, 12), r=4, alpha=8, use_dora=True, init="pissa")
    torch.testing.assert_close(pissa.weight_norm().double(), dense_norm(pissa), atol=1e-5, rtol=1e-5)


def test_dora_zero_rows_stay_finite():
    base = nn.Linear(8, 6)
    with torch.no_grad():
        base.weight[2].zero_()
    layer = LoRALinear(base, r=2, alpha=4, use_dora=True)
    x = torch.randn(4, 8, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.adapter_params().values())
    torch.testing.assert_close(out[:, 2], base.bias[2].expand(4))  # magnitude 0: the row gives only its bias
