"""Structured compression: low-rank (SVD / ASVD) factorisation, LoRA on top, the callback, save / load."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import instruction_rows, tiny_bert, tiny_llama
from torch import nn

from lightning_ft import FineTuneDataModule
from lightning_ft.callbacks import LoRA, LowRankCompression, MergeAdapters
from lightning_ft.compress import (
    LowRankLinear,
    compress_low_rank,
    densify_low_rank,
    load_compressed,
    low_rank_layers,
    low_rank_spec,
    parameter_counts,
    save_compressed,
)
from lightning_ft.lora import inject_lora, lora_layers, merge_lora, unmerge_lora


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every linear weight as (out, in) float64, by layer name (GPT-2 ``Conv1D`` transposed)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = m.weight.detach().double().clone()
        elif type(m).__name__ == "Conv1D":
            out[name] = m.weight.detach().double().T.clone()
    return out


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


# ---- the core ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_svd_truncation_error_is_the_eckart_young_bound(tokenizer, build):
    model = build(len(tokenizer))
    weights = dense_weights(model)
    report = compress_low_rank(model, rank_ratio=0.25)
    layers = low_rank_layers(model)
    assert report.factorized and {r.name for r in report.factorized} == set(layers)
    for name, layer in layers.items():
        w = weights[name]
        sigma = torch.linalg.svdvals(w)
        r = layer.rank
        assert r == math.floor(0.25 * min(w.shape))
        bound = sigma[r:].square().sum().sqrt()
        error = torch.linalg.norm(w - layer.dense_weight().double())
        assert error.item() == pytest.approx(bound.item(), rel=1e-4)
        assert layer.first.weight.shape == (r, w.shape[1]) and layer.second.weight.shape == (w.shape[0], r)
    assert "lm_head" not in layers  # all-linear leaves the output head dense


def test_parameter_count_is_as_computed(tokenizer):
    model = tiny_llama(len(tokenizer))
    before = sum(p.numel() for p in model.parameters())
    shapes = {n: w.shape for n, w in dense_weights(model).items()}
    report = compress_low_rank(model, param_ratio=0.5)
    saved = 0
    for name, layer in low_rank_layers(model).items():
        out_f, in_f = shapes[name]
        r = layer.rank
        assert r == math.floor(0.5 * out_f * in_f / (out_f + in_f))
        saved += out_f * in_f - r * (out_f + in_f)
    after = sum(p.numel() for p in model.parameters())
    assert report.params_before == before and after == before - saved == report.params_after
    assert report.targeted_after <= 0.5 * report.targeted_before
    counts = parameter_counts(model)
    assert counts.total == after and counts.low_rank == report.targeted_after
    assert counts.dense_linear == model.lm_head.weight.numel()  # the head, left dense
    assert "| model total |" in report.table() and "factorised" in report.summary()


def test_energy_picks_the_smallest_rank_that_keeps_it():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 24))
    v, _ = torch.linalg.qr(torch.randn(24, 24))
    sigma = torch.tensor([4.0, 2.0, 1.0] + [0.01] * 21)  # squares 16, 4, 1: 76%, 95.2%, 99.95% of the energy
    layer = nn.Linear(24, 24, bias=False)
    layer.weight.data = u @ torch.diag(sigma) @ v.T
    for energy, rank in [(0.7, 1), (0.9, 2), (0.95, 2), (0.953, 3), (0.999, 3)]:
        model = nn.Sequential(nn.Linear(24, 24, bias=False))
        model[0].weight.data = layer.weight.data.clone()
        report = compress_low_rank(model, energy=energy)
        assert report.layers[0].rank == rank, energy
        assert report.layers[0].energy >= energy
    model = nn.Sequential(nn.Linear(24, 24))
    model[0].weight.data = layer.weight.data.clone()
    assert compress_low_rank(model, energy=1.0).layers[0].reason.endswith("saves nothing")  # full rank: dense
    assert isinstance(model[0], nn.Linear)


def test_layers_that_would_not_shrink_or_are_tied_stay_dense(tokenizer):
    model = tiny_llama(len(tokenizer))
    reference = logits(model, IDS)
    report = compress_low_rank(model, rank_ratio=1.0)
    assert not report.factorized and all("saves nothing" in r.reason for r in report.layers)
    assert report.params_after == report.params_before and not low_rank_layers(model)
    torch.testing.assert_close(logits(model, IDS), reference, rtol=0, atol=0)
    tied = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    tied[1].weight = tied[0].weight
    report = compress_low_rank(tied, rank_ratio=0.25)
    assert [r.reason for r in report.layers] == ["weight shared with another module"] * 2


def test_asvd_beats_svd_on_the_output_for_anisotropic_inputs():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    channel_size = torch.logspace(-2, 1, 64)[torch.randperm(64)]  # input features span three decades
    x = torch.randn(512, 64) * channel_size
    batches = list(x.split(128))
    errors = {}
    for method in ("svd", "asvd"):
        model = nn.Sequential(nn.Linear(64, 48))
        model.load_state_dict({"0." + k: v for k, v in base.state_dict().items()})
        compress_low_rank(model, rank_ratio=0.25, method=method, calibration=batches if method == "asvd" else None)
        with torch.no_grad():
            errors[method] = torch.linalg.norm(base(x) - model(x)).item()
    assert errors["asvd"] < 0.7 * errors["svd"], errors


def test_asvd_on_a_language_model_with_dict_batches_and_a_callable(tokenizer):
    ids = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    a, b = tiny_llama(len(tokenizer)), tiny_llama(len(tokenizer))
    report = compress_low_rank(a, param_ratio=0.6, method="asvd", calibration=batches)
    compress_low_rank(b, param_ratio=0.6, method="asvd", calibration=lambda m: [m(**batch) for batch in batches])
    assert len(report.factorized) == 14
    torch.testing.assert_close(logits(a, ids), logits(b, ids))


def test_bad_inputs_give_clear_errors(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="leaves rank 0"):
        compress_low_rank(model, rank_ratio=0.01)  # k_proj is 16 x 32: floor(0.16) = 0
    with pytest.raises(ValueError, match="needs calibration"):
        compress_low_rank(model, rank_ratio=0.5, method="asvd")
    with pytest.raises(ValueError, match="no batches"):
        compress_low_rank(model, rank_ratio=0.5, method="asvd", calibration=[])
    with pytest.raises(ValueError, match="no linear layer named 'nope'"):
        compress_low_rank(model, rank_ratio=0.5, target_modules=["nope"])
    with pytest.raises(ValueError, match="matches none"):
        compress_low_rank(model, rank_ratio=0.5, target_modules=r".*\.nope")
    with pytest.raises(ValueError, match="exactly one"):
        compress_low_rank(model, rank_ratio=0.5, energy=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        compress_low_rank(model)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        compress_low_rank(model, energy=1.5)
    with pytest.raises(ValueError, match="unknown compression method"):
        compress_low_rank(model, rank_ratio=0.5, method="qr")
    assert not low_rank_layers(model)  # nothing changed by the failed calls
    compress_low_rank(model, rank_ratio=0.25, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already factorised"):
        compress_low_rank(model, rank_ratio=0.25, target_modules=["q_proj"])
    inject_lora(model, r=2)
    with pytest.raises(RuntimeError, match="compress first"):
        compress_low_rank(model, rank_ratio=0.25, target_modules=["k_proj"])
    with pytest.raises(RuntimeError, match="merge them before saving"):
        save_compressed(model, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    with pytest.raises(ValueError, match="exactly one"):
        LowRankCompression()
    with pytest.raises(ValueError, match="calibration_batches"):
        LowRankCompression(rank_ratio=0.5, method="asvd", calibration_batches=0)


# ---- LoRA on top -----------------------------------------------------------------------------------------------------
def test_lora_on_a_compressed_model_trains_and_merges_into_the_factors(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer))
    compress_low_rank(model, param_ratio=0.5)
    ranks = {n: m.rank for n, m in low_rank_layers(model).items()}
    assert set(lora_layers(inject_lora(tiny_copy(model), r=2, target_modules=["q_proj", "v_proj"]))) == {
        f"model.layers.{i}.self_attn.{p}.{f}" for i in (0, 1) for p in ("q_proj", "v_proj") for f in ("first", "second")
    }  # names of the original layers select both factors
    inject_lora(model, r=2)
    assert set(lora_layers(model)) == {f"{n}.{f}" for n in ranks for f in ("first", "second")}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    unmerged = logits(model, IDS)
    merge_lora(model, unload=False)
    torch.testing.assert_close(logits(model, IDS), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    merge_lora(model)
    assert not lora_layers(model)
    assert {n: m.rank for n, m in low_rank_layers(model).items()} == ranks  # the factorised shape is kept
    assert all(type(m.first) is nn.Linear and type(m.second) is nn.Linear for m in low_rank_layers(model).values())
    torch.testing.assert_close(logits(model, IDS), unmerged, atol=1e-5, rtol=0)


def tiny_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# ---- saving --------------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    compress_low_rank(model, rank_ratio=0.25, exclude_modules=["down_proj"])
    reference = logits(model, IDS)
    save_compressed(model, tmp_path / "compressed", tokenizer=tokenizer)
    loaded = load_compressed(tmp_path / "compressed")
    assert low_rank_spec(loaded) == low_rank_spec(model)
    torch.testing.assert_close(logits(loaded, IDS), reference, atol=1e-6, rtol=0)
    # a plain save_pretrained folder carries the ranks in config.json too
    model.save_pretrained(tmp_path / "plain")
    torch.testing.assert_close(logits(load_compressed(tmp_path / "plain"), IDS), reference, atol=1e-6, rtol=0)
    # densified: a standard Hugging Face model with the same function
    from transformers import AutoModelForCausalLM

    densify_low_rank(model)
    assert not low_rank_layers(model) and not hasattr(model.config, "low_rank_compression")
    model.save_pretrained(tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(logits(dense, IDS), reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a compressed model"):
        load_compressed(tmp_path / "dense")


def test_save_and_load_a_plain_module_and_a_bert(tmp_path, tokenizer):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    compress_low_rank(net, rank_ratio=0.25)
    x = torch.randn(5, 16)
    save_compressed(net, tmp_path / "net")
    with pytest.raises(ValueError, match="pass the uncompressed model"):
        load_compressed(tmp_path / "net")
    skeleton = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    torch.testing.assert_close(load_compressed(tmp_path / "net", model=skeleton)(x), net(x), rtol=0, atol=0)

    bert = tiny_bert(len(tokenizer))
    report = compress_low_rank(bert, param_ratio=0.5)
    assert "classifier" not in report.ranks and len(report.factorized) == 13  # 6 per layer + pooler; head left dense
    bert.save_pretrained(tmp_path / "bert")
    with torch.no_grad():
        a = bert(input_ids=IDS).logits
        b = load_compressed(tmp_path / "bert")(input_ids=IDS).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---- the callback ----------------------------------------------------------------------------------------------------
class UserLM(L.LightningModule):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.model = tiny_llama(vocab_size).train()

    def training_step(self, batch, batch_idx):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        return self.model(**inputs).loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class LazyUserLM(UserLM):
    """Builds its model in ``configure_model``."""

    def __init__(self, vocab_size: int):
        L.LightningModule.__init__(self)
        self.vocab_size, self.model = vocab_size, None

    def configure_model(self):
        if self.model is None:
            self.model = tiny_llama(self.vocab_size).train()


class Snapshot(L.Callback):
    """Parameters at the start of training (after compression and injection)."""

    def on_train_start(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}


def fit(tmp_path, tokenizer, module, callbacks, steps=2):
    dm = FineTuneDataModule(
        tokenizer, task="instruction", train=instruction_rows(8), val=instruction_rows(4), max_length=64, batch_size=4
    )
    t = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    t.fit(module, dm)
    return t, dm


def test_callback_compresses_at_fit_start_and_the_factors_train(tmp_path, tokenizer):
    module = UserLM(len(tokenizer))
    cb = LowRankCompression(param_ratio=0.5)
    snap = Snapshot()
    fit(tmp_path, tokenizer, module, [cb, snap])
    assert len(low_rank_layers(module)) == 14 and cb.report is not None
    assert cb.report.params_after == sum(p.numel() for p in module.parameters()) < cb.report.params_before
    assert all(p.requires_grad for p in module.parameters())
    layer = module.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(layer.first.weight, snap.params["model.model.layers.0.self_attn.q_proj.first.weight"])
    assert "configure_model" not in module.__dict__


@pytest.mark.parametrize("lora_first, lazy", [(False, False), (True, False), (True, True)])
def test_callback_runs_before_lora_and_only_adapters_train(tmp_path, tokenizer, lora_first, lazy):
    module = (LazyUserLM if lazy else UserLM)(len(tokenizer))
    calls = []
    compression = LowRankCompression(
        param_ratio=0.5,
        method="asvd",
        calibration_batches=2,
        calibration_forward=lambda m, batch: calls.append(m.model(input_ids=batch["input_ids"])),
    )
    snap = Snapshot()
    callbacks = [LoRA(r=2), compression, snap] if lora_first else [compression, LoRA(r=2), snap]
    t, dm = fit(tmp_path, tokenizer, module, callbacks)
    assert len(calls) == 2  # two calibration batches from the train loader
    ranks = {n: m.rank for n, m in low_rank_layers(module).items()}
    assert len(ranks) == 14
    assert set(lora_layers(module)) == {f"{n}.{f}" for n in ranks for f in ("first", "second")}
    assert snap.trainable and all(n.endswith(("lora_A", "lora_B")) for n in snap.trainable)
    assert all(torch.equal(p, snap.params[n]) for n, p in module.named_parameters() if n not in snap.trainable)
    assert any(not torch.equal(p, snap.params[n]) for n, p in module.named_parameters() if n.endswith("lora_B"))
    assert "configure_model" not in module.__dict__
    t.validate(module, dm, verbose=False)  # a later stage: no second compression, no re-injection
    assert {n: m.rank for n, m in low_rank_layers(module).items()} == ranks and len(calls) == 2


def test_callback_with_lora_and_merge_adapters_writes_a_compressed_model(tmp_path, tokenizer):
    module = UserLM(len(tokenizer))
    merged_dir = tmp_path / "merged"
    callbacks = [LowRankCompression(rank_ratio=0.25), LoRA(r=2), MergeAdapters(merged_dir=merged_dir)]
    fit(tmp_path, tokenizer, module, callbacks)
    assert not lora_layers(module) and len(low_rank_layers(module)) == 14
    assert all(isinstance(m, LowRankLinear) for m in low_rank_layers(load_compressed(merged_dir)).values())
    torch.testing.assert_close(logits(load_compressed(merged_dir), IDS), logits(module.model, IDS), atol=1e-6, rtol=0)


def test_callback_errors_leave_the_module_as_found(tmp_path, tokenizer):
    module, lora = UserLM(len(tokenizer)), LoRA(r=2)
    with pytest.raises(ValueError, match="leaves rank 0"):
        fit(tmp_path, tokenizer, module, [lora, LowRankCompression(rank_ratio=0.01)])
    assert "configure_model" not in module.__dict__ and lora._patched is None
    assert not low_rank_layers(module) and not lora_layers(module)
    with pytest.raises(RuntimeError, match="more than one LowRankCompression"):
        fit(tmp_path, tokenizer, module, [LowRankCompression(rank_ratio=0.5), LowRankCompression(rank_ratio=0.5)])
