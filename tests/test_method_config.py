"""One typed config per method, the adapter protocol and the shared model-surgery helpers (no Trainer)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from lightning_ft import LoRAModule, SparseModule
from lightning_ft.callbacks import LoRA, LowRankCompression, SparseMask
from lightning_ft.compress import CompressionConfig
from lightning_ft.lora import LoRAConfig, inject_lora, lora_state_dict, merge_lora
from lightning_ft.modeling import adapter_layers, adapter_param_names, find_hf_model, hf_models, linear_shape
from lightning_ft.modules.optim import loraplus_groups
from lightning_ft.sparse import SparseConfig, inject_sparse, select_sparse, sparse_extra_params


@pytest.mark.parametrize("cls", [LoRAConfig, SparseConfig])
def test_config_round_trips_as_plain_data(cls):
    config = cls(target_modules=("q_proj", "v_proj"), modules_to_save=["lm_head"])
    data = config.to_dict()
    assert data["target_modules"] == ["q_proj", "v_proj"] and list(data) == list(cls.field_names())
    assert cls.from_dict(data) == cls.from_dict(data) and cls.from_dict(data).to_dict() == data
    with pytest.raises(ValueError, match="unknown"):
        cls.from_dict({**data, "nope": 1})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LoRAConfig(r=0), "rank r must be >= 1"),
        (lambda: LoRAConfig(bias="some"), "bias must be"),
        (lambda: LoRAConfig(init="xavier"), "unknown LoRA init"),
        (lambda: SparseConfig(density=0), "density must be in"),
        (lambda: SparseConfig(mode="dense"), "unknown sparse mode"),
        (lambda: SparseConfig(criterion="bitfit", reselect_every=4), "no mask to re-select"),
        (lambda: SparseConfig(reselect_every=4, drop_schedule="step"), "unknown drop schedule"),
        (lambda: CompressionConfig(), "give exactly one of rank_ratio"),
        (lambda: CompressionConfig(rank_ratio=0.5, method="asvd", calibration_batches=0), "calibration_batches"),
    ],
)
def test_configs_validate_in_post_init(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("target", "cls"),
    [
        (LoRA, LoRAConfig),
        (LoRAModule, LoRAConfig),
        (SparseMask, SparseConfig),
        (SparseModule, SparseConfig),
        (LowRankCompression, CompressionConfig),
        (inject_lora, LoRAConfig),
    ],
)
def test_signatures_list_every_config_field_once_with_its_default(target, cls):
    params = inspect.signature(target).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name in cls.field_names():
        assert params[name].default == defaults[name] and params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert "config" not in params  # a Python argument, kept out of the CLI


def test_fields_as_keywords_and_config_object_agree():
    assert (
        LoRA(r=4, alpha=8).config
        == LoRA(config=LoRAConfig(r=4, alpha=8)).config
        == LoRA(config=LoRAConfig(r=2), r=4, alpha=8).config
    )
    with pytest.raises(TypeError, match="give a LoRAConfig as config="):
        LoRA(LoRAConfig(r=4))  # the config is keyword-only
    with pytest.raises(TypeError, match="unexpected"):
        LoRA(rank=4)
    module = LoRAModule(model_name_or_path="x", r=4, learning_rate=1e-3)
    assert module.config.r == 4 and module.hparams.r == 4 and module.hparams.learning_rate == 1e-3
    assert SparseModule(model_name_or_path="x", config=SparseConfig(density=0.2)).hparams.density == 0.2


def test_adapters_declare_their_tensors_and_groups():
    torch.manual_seed(0)
    model = tiny_llama(64)
    inject_lora(model, r=2, target_modules=["q_proj"], use_dora=True, bias="lora_only", modules_to_save=["lm_head"])
    declared = adapter_param_names(model, "lora")
    assert set(lora_state_dict(model)) >= set(declared)
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude", "bias") for n in declared)
    assert {g for g in declared.values()} == {"default", "lora_B"}
    groups = {g["name"]: g for g in loraplus_groups(model, 0.1, 1e-3, 16)}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert len(groups["lora_B"]["params"]) == len(adapter_layers(model, "lora"))
    merge_lora(model)
    assert not adapter_layers(model) and not any(k.startswith("lightning_ft") for m in model.modules() for k in vars(m))


def test_sparse_extra_params_come_from_the_marked_modules():
    torch.manual_seed(0)
    model = tiny_llama(64)
    inject_sparse(model, select_sparse(model, density=0.05, criterion="random"), modules_to_save=["lm_head"])
    assert sparse_extra_params(model) == [n for n, _ in model.lm_head.named_parameters(prefix="lm_head")]
    assert not hasattr(model, "sparse_extra_params")


def test_shared_helpers():
    class Conv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 5))

    assert linear_shape(nn.Linear(3, 5)) == (3, 5, False) and linear_shape(Conv1D()) == (3, 5, True)
    holder = nn.Module()
    holder.model = tiny_llama(64)
    assert hf_models(holder) == [holder.model] and find_hf_model(holder) == ("model", holder.model)
    with pytest.raises(ValueError, match="no Hugging Face model"):
        find_hf_model(nn.Linear(2, 2))
