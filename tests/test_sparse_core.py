"""The pure-torch sparse fine-tuning core: selection, delta / mask layers, re-selection, merge and export (no "
"Lightning)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_ft.sparse import (
    DynamicReselection,
    GradientMask,
    SparseLinear,
    budget,
    drop_fraction,
    inject_sparse,
    load_sparse_delta,
    merge_sparse,
    reselect_layer,
    save_sparse_delta,
    select_sparse,
    sparse_counts,
    sparse_layers,
    sparse_state_keys,
)
from lightning_ft.sparse.inject import mark_extra_params

VOCAB = 300


def random_indices(numel: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.sort(torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k]).values


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored as (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def lm_loss(model, x):
    return model(input_ids=x, labels=x).loss


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_delta_forward_and_gradients_equal_the_dense_computation(kind):
    torch.manual_seed(0)
    base = nn.Linear(16, 12) if kind == "linear" else Conv1D(12, 16)
    idx = random_indices(base.weight.numel(), 40)
    layer = SparseLinear(base, idx, mode="delta")
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)

    dense = base.weight.detach().clone().view(-1).index_add(0, idx, layer.values.detach()).view_as(base.weight)
    dense.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_oi = dense if kind == "linear" else dense.T
    y_ref = F.linear(x_ref, w_oi, base.bias)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    # sampled matmul vs dense matmul: the same sums in another order, so within float32 rounding of |grad| ~ 10
    torch.testing.assert_close(layer.values.grad, dense.grad.view(-1)[idx], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=0)
    assert base.weight.grad is None and not base.weight.requires_grad


def test_selection_budgets_and_allocation():
    model = tiny_llama(VOCAB)
    per = select_sparse(model, density=0.05, criterion="magnitude")
    for name, idx in per.items():
        w = model.get_submodule(name).weight
        assert idx.numel() == budget(w.shape, 0.05) == round(0.05 * w.numel())
        assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
        top = w.detach().abs().view(-1)
        assert top[idx].min() >= top.kthvalue(w.numel() - idx.numel()).values  # the largest magnitudes

    ranked = select_sparse(model, lora_equivalent_rank=2, criterion="random", allocation="global")
    sizes = {n: model.get_submodule(n).weight.shape for n in ranked}
    assert sum(i.numel() for i in ranked.values()) == sum(2 * (m + n) for m, n in sizes.values())
    assert len({i.numel() for i in ranked.values()}) > 1  # global: matrices get different shares
    again = select_sparse(model, lora_equivalent_rank=2, criterion="random", allocation="global")
    assert all(torch.equal(ranked[n], again[n]) for n in ranked)  # seeded
    assert select_sparse(model, criterion="bitfit") == {}
    assert budget((4, 4), lora_equivalent_rank=8) == 16 and budget((100, 100), density=1e-6) == 1


def test_gradient_criteria_use_calibration_gradients():
    model = tiny_llama(VOCAB)
    batches = [torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    name = "model.layers.1.mlp.down_proj"
    w = model.get_submodule(name).weight
    grads = []
    for b in batches:
        model.zero_grad()
        lm_loss(model, b).backward()
        grads.append(w.grad.clone())
    model.zero_grad()
    expected = {
        "gradient": sum(grads).abs(),
        "fisher": sum(g * g for g in grads),
        "movement": -w.detach() * sum(grads),
    }
    for criterion, score in expected.items():
        loss_fn = lambda b: lm_loss(model, b)  # noqa: E731
        idx = select_sparse(model, batches, loss_fn, density=0.02, criterion=criterion, target_modules=[name])[name]
        assert torch.equal(idx, torch.sort(torch.topk(score.view(-1), idx.numel()).indices).values), criterion
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())


def test_bad_inputs_give_clear_errors():
    model = tiny_llama(VOCAB)
    for density in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            select_sparse(model, density=density, criterion="random")
    with pytest.raises(
        ValueError, match=r"unknown sparse criterion 'fischer'.*'random', 'magnitude', 'gradient', 'fisher'"
    ):
        select_sparse(model, criterion="fischer")
    with pytest.raises(ValueError, match="needs calibration batches"):
        select_sparse(model, criterion="fisher")
    with pytest.raises(ValueError, match="no calibration batches"):
        select_sparse(model, criterion="gradient", batches=[], loss_fn=lambda b: lm_loss(model, b))
    with pytest.raises(ValueError, match="no linear layer named 'query'"):
        select_sparse(model, criterion="random", target_modules=["query"])
    with pytest.raises(ValueError, match="allocation"):
        select_sparse(model, criterion="random", allocation="uniform")
    with pytest.raises(ValueError, match="lora_equivalent_rank"):
        select_sparse(model, criterion="random", lora_equivalent_rank=0)
    with pytest.raises(ValueError, match="unknown sparse mode"):
        inject_sparse(model, {}, mode="dense")
    with pytest.raises(ValueError, match="no bias"):
        inject_sparse(model, {}, train_biases=["model.layers.0.self_attn.q_proj"])


def test_indices_are_validated_on_load():
    base = nn.Linear(8, 4)
    for bad, message in [
        (torch.tensor([0, 3, 2]), "sorted"),
        (torch.tensor([0, 1, 1]), "sorted"),
        (torch.tensor([1, 40]), r"\[0, 32\)"),
        (torch.tensor([-1, 2]), r"\[0, 32\)"),
        (torch.tensor([0, 1], dtype=torch.int32), "int64"),
        (torch.tensor([[0, 1]]), "1-D"),
    ]:
        with pytest.raises(ValueError, match=message):
            SparseLinear(base, bad)
        layer = SparseLinear(nn.Linear(8, 4), torch.tensor([0, 5]))
        with pytest.raises(ValueError, match=message):
            layer.load_state_dict({"indices": bad, "values": torch.zeros(bad.shape, dtype=torch.float32)}, strict=False)
    layer = SparseLinear(nn.Linear(8, 4), torch.tensor([0, 5]))  # a differently sized (global-allocation) mask
    layer.load_state_dict({"indices": torch.tensor([1, 2, 9]), "values": torch.tensor([1.0, 2.0, 3.0])}, strict=False)
    assert layer.indices.tolist() == [1, 2, 9] and layer.values.tolist() == [1.0, 2.0, 3.0]


def test_delta_mode_optimizer_state_and_merge():
    torch.manual_seed(0)
    model = tiny_llama(VOCAB)
    x = torch.randint(0, VOCAB, (2, 9))
    inject_sparse(model, select_sparse(model, density=0.05, criterion="random"))
    nnz, numel = sparse_counts(model)
    assert 0 < nnz < 0.06 * numel
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == nnz
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        lm_loss(model, x).backward()
        opt.step()
        opt.zero_grad()
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.state.values()) == 2 * nnz
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert set(sparse_state_keys(model)) == {f"{n}.{k}" for n in sparse_layers(model) for k in ("indices", "values")}

    model.eval()
    with torch.no_grad():
        before = model(input_ids=x).logits
        merge_sparse(model)
        after = model(input_ids=x).logits
    assert not sparse_layers(model) and isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),  # coupled decay: restored after each step
        lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adamw", "adam-coupled", "sgd"],
)
def test_mask_mode_keeps_unselected_entries_bitwise_unchanged(make_optimizer):
    torch.manual_seed(0)
    model = tiny_llama(VOCAB)
    x = torch.randint(0, VOCAB, (2, 9))
    inject_sparse(model, select_sparse(model, density=0.1, criterion="magnitude"), mode="mask")
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in sparse_layers(model).items()}
    masker = GradientMask(sparse_layers(model))
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    masker.attach(opt)
    decoupled = isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0 if decoupled else 0.1]  # AdamW: decay taken over
    for _ in range(20):
        lm_loss(model, x).backward()
        opt.step()  # the step pre-hook masks the gradients of a plain loop
        opt.zero_grad()
    for name, layer in sparse_layers(model).items():
        w, frozen = layer.base_layer.weight.detach(), masker.frozen[layer.base_layer.weight]
        assert torch.equal(w[frozen], before[name][frozen]), name  # bitwise
        assert not torch.equal(w[~frozen], before[name][~frozen]), name
    masker.detach()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1]


def test_mask_mode_state_dict_holds_indices_and_values_only():
    def pretrained():
        torch.manual_seed(0)
        return nn.Linear(8, 4)

    layer = SparseLinear(pretrained(), torch.tensor([1, 6, 30]), mode="mask")
    with torch.no_grad():
        layer.base_layer.weight.view(-1)[layer.indices] += 1.0
    torch.testing.assert_close(layer.delta_values(), torch.ones(3))
    state = {k: v for k, v in layer.state_dict().items() if k in ("indices", "values")}
    fresh = SparseLinear(pretrained(), torch.tensor([0]), mode="mask")  # another (placeholder) mask
    fresh.load_state_dict(state, strict=False)
    assert torch.equal(fresh.base_layer.weight, layer.base_layer.weight) and fresh.indices.tolist() == [1, 6, 30]
    torch.testing.assert_close(fresh.delta_values(), torch.ones(3))


def test_reselection_keeps_the_budget_and_zeroes_new_state():
    torch.manual_seed(0)
    base = nn.Linear(10, 8)
    idx = random_indices(80, 20)
    layer = SparseLinear(base, idx)
    opt = torch.optim.AdamW([layer.values], lr=1e-2)
    for _ in range(3):
        layer(torch.randn(4, 10)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    old_values = dict(zip(idx.tolist(), layer.values.detach().tolist()))
    old_state = {k: dict(zip(idx.tolist(), opt.state[layer.values][k].tolist())) for k in ("exp_avg", "exp_avg_sq")}
    grad = torch.randn(8, 10)
    stats = reselect_layer(layer, grad, 0.25, [opt])
    new = layer.indices.tolist()
    assert len(new) == 20 and new == sorted(set(new)) and stats.replaced == 5
    kept, grown = [i for i in new if i in old_values], [i for i in new if i not in old_values]
    assert len(kept) == 15 and len(grown) == 5
    dropped = sorted(set(old_values) - set(kept), key=lambda i: abs(old_values[i]))
    assert max(abs(old_values[i]) for i in dropped) <= min(abs(old_values[i]) for i in kept)
    g = grad.view(-1).abs()
    assert min(g[grown]) >= max(g[[i for i in range(80) if i not in kept and i not in grown]])
    values = dict(zip(new, layer.values.detach().tolist()))
    state = {k: dict(zip(new, opt.state[layer.values][k].tolist())) for k in ("exp_avg", "exp_avg_sq")}
    for i in kept:
        assert values[i] == old_values[i] and all(state[k][i] == old_state[k][i] for k in state)
    for i in grown:
        assert values[i] == 0 and all(state[k][i] == 0 for k in state)
    assert stats.common == 15 and 0 < stats.as_dict()["grad_norm_share"] < 1


def test_mask_mode_reselection_reverts_dropped_entries():
    torch.manual_seed(0)
    base = nn.Linear(10, 8)
    pretrained = base.weight.detach().clone()
    layer = SparseLinear(base, random_indices(80, 20), mode="mask")
    opt = torch.optim.Adam([base.weight], lr=1e-2)
    masker = GradientMask({"l": layer})
    masker.attach(opt)
    for _ in range(3):
        layer(torch.randn(4, 10)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    old = layer.indices.clone()
    reselect_layer(layer, torch.randn(8, 10), 0.5, [opt])
    masker.refresh()
    new = layer.indices
    assert new.numel() == 20
    outside = torch.ones(80, dtype=torch.bool)
    outside[new] = False
    assert torch.equal(base.weight.detach().view(-1)[outside], pretrained.view(-1)[outside])  # dropped: reverted
    grown = new[~torch.isin(new, old)]
    assert torch.equal(layer.base_values[torch.isin(new, grown)], pretrained.view(-1)[grown])
    for t in (opt.state[base.weight]["exp_avg"], opt.state[base.weight]["exp_avg_sq"]):
        assert (t.view(-1)[outside] == 0).all() and (t.view(-1)[grown] == 0).all()


def test_dynamic_reselection_schedule():
    assert drop_fraction(0, 100, 0.3) == pytest.approx(0.3) and drop_fraction(100, 100, 0.3) == 0
    assert drop_fraction(50, 100, 0.3, "cosine") == pytest.approx(0.15)
    assert drop_fraction(25, 100, 0.4, "linear") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="schedule"):
        drop_fraction(0, 1, 0.3, "step")
    r = DynamicReselection({}, every=4, total_steps=10, fraction=0.3, schedule="cosine", window=2)
    assert [s for s in range(1, 11) if r.due(s)] == [4, 8]
    assert [s for s in range(1, 11) if r.in_window(s)] == [3, 4, 7, 8]


def test_export_round_trip_and_atomic_write(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(VOCAB)
    x = torch.randint(0, VOCAB, (2, 9))
    inject_sparse(model, select_sparse(model, density=0.05, criterion="random", allocation="global"))
    with torch.no_grad():
        for layer in sparse_layers(model).values():
            layer.values.normal_(std=0.1)
        model.lm_head.weight.requires_grad_(True)  # one more trained parameter written in full
    mark_extra_params(model, ["lm_head.weight"])  # as inject_sparse marks modules_to_save
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    out = save_sparse_delta(model, tmp_path / "delta", base_model_name_or_path="tiny")
    assert {p.name for p in out.iterdir()} == {"sparse_config.json", "sparse_delta.safetensors"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    config = json.loads((out / "sparse_config.json").read_text())
    assert (
        config["nnz"] == sparse_counts(model)[0]
        and config["mode"] == "delta"
        and config["base_model_name_or_path"] == "tiny"
    )

    reloaded = load_sparse_delta(tiny_llama(VOCAB), out)
    reloaded.lm_head.weight.data.copy_(model.lm_head.weight)  # saved in full, compared below
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=x).logits, expected, atol=1e-6, rtol=0)
        merged = merge_sparse(reloaded)(input_ids=x).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    assert config["extra_params"] == ["lm_head.weight"]

    tensors = load_file(out / "sparse_delta.safetensors")
    name = next(iter(config["layers"]))
    for bad, message in [(tensors[f"{name}.indices"].flip(0), "sorted"), (tensors[f"{name}.indices"].int(), "int64")]:
        save_file({**tensors, f"{name}.indices": bad.contiguous()}, str(out / "sparse_delta.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_sparse_delta(tiny_llama(VOCAB), out)
    with pytest.raises(ValueError, match="another base model"):
        load_sparse_delta(_wider_llama(), out)


def _wider_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)
