"""Sharded loading for FSDP2 (``lightning_ft.strategies.meta_load``) in one process: the meta-device build, the
replayed adapter init, the row split and the refusals. The two-process runs are in ``test_distributed.py``."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import tiny_llama, varied_rows

from lightning_ft.lora import inject_lora
from lightning_ft.models import load_model
from lightning_ft.strategies import AdapterFSDP2Strategy
from lightning_ft.strategies.meta_load import (
    WEIGHT_SOURCE,
    load_shards,
    materialize_recorded,
    meta_init,
    shard_rows,
)

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer) -> str:
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama(len(tokenizer), seed=3).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def test_rows_follow_torch_chunk():
    for rows in (1, 5, 7, 64, 49152):
        for world in (1, 2, 3, 8):
            chunks = torch.arange(rows).chunk(world)
            for rank in range(world):
                start, stop = shard_rows(rows, rank, world)
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(start, stop)) == expected, (rows, world, rank)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_meta_build_and_replayed_init_equal_the_plain_load(folder, init):
    """Same seed: the base tagged with its file keys, adapters and buffers equal to the plain path, and the random
    state left where the plain path leaves it (dropout draws after it stay the same)."""
    torch.manual_seed(7)
    plain = load_model(folder)
    inject_lora(plain, r=4, target_modules=TARGETS, rank_pattern={"down_proj": 2}, init=init)
    after_plain = torch.get_rng_state()

    torch.manual_seed(7)
    with meta_init() as recorder:
        meta = load_model(folder)
        inject_lora(meta, r=4, target_modules=TARGETS, rank_pattern={"down_proj": 2}, init=init)
    assert all(p.is_meta for p in meta.parameters())
    assert all(not b.is_meta for b in meta.buffers())  # rotary frequencies are computed for real
    sources = materialize_recorded(meta, recorder)
    assert torch.equal(torch.get_rng_state(), after_plain)

    expected = dict(plain.named_parameters())
    adapters = {n for n in expected if ".lora_" in n}
    assert len(adapters) == 16
    for name, p in meta.named_parameters():
        if name in adapters:
            assert not p.is_meta and torch.equal(p, expected[name]), name
            assert p.requires_grad
        else:
            assert p.is_meta and name in sources, name
            assert sources[name][1] == name.replace(".base_layer", "")  # the key in the file
    for name, b in meta.named_buffers():
        assert torch.equal(b, dict(plain.named_buffers())[name]), name

    load_shards(meta, sources, torch.device("cpu"))  # unsharded: every row of every weight
    for name, p in meta.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_tied_embeddings_load_once(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with meta_init() as recorder:
        meta = load_model(str(tmp_path))
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    sources = materialize_recorded(meta, recorder)
    load_shards(meta, sources, torch.device("cpu"))
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    plain = load_model(str(tmp_path))
    assert all(torch.equal(p, dict(plain.named_parameters())[n]) for n, p in meta.named_parameters())


def test_adapters_that_need_the_base_weights_are_refused(folder):
    with meta_init() as recorder:
        meta = load_model(folder)
        inject_lora(meta, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match=r"lora_magnitude.*DoRA's magnitude.*sharded_loading=False"):
        materialize_recorded(meta, recorder)


def test_a_hub_id_cannot_be_loaded_sharded():
    with torch.device("meta"), pytest.raises(ValueError, match="download it first"):
        load_model("some-org/some-model")


@pytest.fixture
def own_process_group():
    """An in-process distributed fit leaves its process group and Lightning's ``LOCAL_RANK`` / ``MASTER_*`` in
    ``os.environ`` behind (a later ``Trainer`` would then take the process as launched by torchrun): undo both."""
    import os

    import torch.distributed as dist

    saved = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_a_model_passed_as_an_object_is_refused_before_training(folder, tmp_path, own_process_group):
    """Single process: the strategy refuses in ``setup``, before any step (the two-process run checks it too)."""
    from lightning_ft import FineTuneDataModule, LoRAModule

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in varied_rows(4)))
    module = LoRAModule(model=load_model(folder), r=4, alpha=8, target_modules=["q_proj"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=AdapterFSDP2Strategy(sharded_loading=True),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(ValueError, match="already built with its weights.*model_name_or_path"):
        trainer.fit(module, FineTuneDataModule(folder, task="instruction", train=str(rows), batch_size=2))


def test_cpu_offload_is_refused_on_a_cpu_run():
    with pytest.raises(ValueError, match="on the CPU already"):
        L.Trainer(accelerator="cpu", devices=1, strategy=AdapterFSDP2Strategy(cpu_offload=True), logger=False)


def test_parameters_keep_their_sources_on_the_meta_device(folder):
    with meta_init():
        meta = load_model(folder)
    file, key = getattr(meta.model.layers[1].mlp.down_proj.weight, WEIGHT_SOURCE)
    assert file.endswith("model.safetensors") and key == "model.layers.1.mlp.down_proj.weight"


def test_frozen_root_weights_are_replicated_by_default():
    from lightning_ft.strategies import AdapterFSDP2Strategy

    assert AdapterFSDP2Strategy().replicate_frozen_root is True
    assert AdapterFSDP2Strategy(sharded_loading=True).replicate_frozen_root is True
    assert AdapterFSDP2Strategy(replicate_frozen_root=False).replicate_frozen_root is False
