"""Issue 10, items 6 and 7: exports name their base by its public identity; damaged files are named in the error.

- ``adapter_config.json`` records the hub id behind a packaged short name (never the conversion cache), the path the
  user gave for a local folder, and an explicit placeholder for a model built from a config; the recorded name of
  a packaged model reloads through ``load_model`` from another folder, with no hub.
- A cut-short or empty checkpoint (``Trainer.fit(ckpt_path=...)``, the lightning-ft strategies, a sharded folder),
  a cut-short ``*.safetensors`` of a model or adapter folder, and a missing or garbled ``adapter_config.json`` give
  an error that names the file and says what to do.
- A relative path whose first folder exists here is a local path: "not found" at once, no hub lookup.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import lm_data, quick_trainer, require_packaged, tiny_llama

from lightning_ft import SFTModule
from lightning_ft import models as lft_models
from lightning_ft.file_checks import CorruptFileError, check_checkpoint
from lightning_ft.lora import inject_lora, load_peft_adapter, save_peft_adapter
from lightning_ft.models import (
    PACKAGED_MODELS,
    default_cache_dir,
    load_model,
    load_tokenizer,
    public_name,
    resolve_model,
)

SMOLLM2, SMOLLM2_HUB = "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM, MINILM_HUB = "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"


def _cut(path: Path, keep: float = 0.5) -> None:
    """Truncate ``path`` to ``keep`` of its size, as a killed writer or an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _randomize_adapters(model: torch.nn.Module) -> None:
    """Give LoRA B (zero at init) values, so that an adapter changes the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def tiny_dir(tmp_path, tokenizer) -> Path:
    path = tmp_path / "models" / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- item 6: portable exports --------------------------------------------------------------------------------
def test_packaged_model_adapter_records_hub_id_and_reloads_elsewhere(tmp_path, monkeypatch):
    require_packaged(SMOLLM2)
    model = load_model(SMOLLM2)
    assert model.name_or_path == SMOLLM2_HUB
    inject_lora(model, r=2, target_modules=["q_proj", "v_proj"])
    _randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter")

    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == SMOLLM2_HUB  # the public id, not ~/.cache/lightning_ft/gguf/...

    # another folder, another Hugging Face home, no hub: the recorded name still finds its base
    shared = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(tmp_path / "adapter", shared)
    shutil.rmtree(tmp_path / "adapter")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "other_hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path / "elsewhere")
    resolved = resolve_model(recorded)
    assert Path(resolved.gguf_file) == PACKAGED_MODELS[SMOLLM2].path()  # the packaged copy: no hub involved
    base = load_model(json.loads((shared / "adapter_config.json").read_text())["base_model_name_or_path"])
    load_peft_adapter(base, shared)
    expected, reloaded = model.state_dict(), base.state_dict()  # the same base weights, the same adapters
    assert reloaded.keys() == expected.keys()
    ends = ("embed_tokens.weight", "layers.3.self_attn.q_proj.base_layer.weight")
    some_base = [k for k in expected if k.endswith(ends)]
    assert len(some_base) == 2
    assert all(torch.equal(reloaded[k], expected[k]) for k in some_base + [k for k in expected if "lora_" in k])

    # the merged model's config.json (what save_pretrained writes) names no private path either
    base.config.save_pretrained(tmp_path / "merged")
    config_text = (tmp_path / "merged" / "config.json").read_text()
    assert str(default_cache_dir()) not in config_text and "site-packages" not in config_text


def test_public_name_of_packaged_models_and_their_files(tmp_path, monkeypatch):
    require_packaged(MINILM)
    folder = PACKAGED_MODELS[MINILM].path()
    assert public_name(MINILM) == public_name(str(folder)) == public_name(MINILM_HUB.lower()) == MINILM_HUB
    assert resolve_model(MINILM_HUB).path_or_id == str(folder.resolve())  # the hub id loads the packaged copy
    assert public_name("org/some-model") == "org/some-model"
    require_packaged(SMOLLM2)  # its converted cache folder (made here, empty, in a cache of its own) maps back too
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "cache"))
    cache = lft_models.gguf_cache_path(PACKAGED_MODELS[SMOLLM2].path())
    cache.mkdir(parents=True)
    assert public_name(str(cache)) == SMOLLM2_HUB


def test_local_folder_records_the_path_as_given(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = load_model("models/tiny-llama")
    assert model.name_or_path == model.config.name_or_path == "models/tiny-llama"
    assert load_tokenizer("models/tiny-llama").name_or_path == "models/tiny-llama"
    inject_lora(model, r=2)
    _randomize_adapters(model)
    save_peft_adapter(model, "adapter")
    assert json.loads(Path("adapter/adapter_config.json").read_text())["base_model_name_or_path"] == "models/tiny-llama"

    # what peft reads too: AutoPeftModel loads the base from the recorded path
    peft = pytest.importorskip("peft")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained("adapter")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


def test_model_built_from_config_records_a_placeholder_peft_accepts(tmp_path, tokenizer):
    model = inject_lora(tiny_llama(len(tokenizer)), r=2)
    _randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == "<LlamaForCausalLM built from a config>"
    with pytest.raises(ValueError, match="built from a config, which has no name"):
        load_model(recorded)

    peft = pytest.importorskip("peft")
    ids = torch.tensor([[1, 2, 3, 4]])
    loaded = peft.PeftModel.from_pretrained(tiny_llama(len(tokenizer)), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


# ---- item 7: a relative path with a typo is local, not a hub id ----------------------------------------------
def test_relative_path_with_existing_first_folder_is_not_a_hub_id(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError(f"from_pretrained{args} was called: the typo was taken for a hub id")

    monkeypatch.setattr(lft_models.AutoModelForCausalLM, "from_pretrained", no_hub)
    monkeypatch.setattr(lft_models.AutoTokenizer, "from_pretrained", no_hub)
    with pytest.raises(FileNotFoundError, match=r"models/tiny-lama does not exist.*Did you mean 'models/tiny-llama'"):
        load_model("models/tiny-lama")
    with pytest.raises(FileNotFoundError, match="models/tiny-lama"):
        load_tokenizer("models/tiny-lama")


# ---- item 7: damaged files -------------------------------------------------------------------------------------
@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    """An empty file, a cut-short ``torch.save`` file and a file that is no checkpoint at all."""
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "epoch": 0}, whole)
    out = {"empty": tmp_path / "empty.ckpt", "truncated": tmp_path / "truncated.ckpt", "text": tmp_path / "x.ckpt"}
    out["empty"].write_bytes(b"")
    shutil.copy(whole, out["truncated"])
    _cut(out["truncated"])
    out["text"].write_text("model:\n  lr: 0.1\n")
    check_checkpoint(whole)  # a whole checkpoint passes
    return out


@pytest.mark.parametrize(
    "kind, message",
    [("empty", "is empty"), ("truncated", "is cut short or damaged"), ("text", "is not a PyTorch checkpoint")],
)
def test_check_checkpoint_names_the_file_and_a_remedy(checkpoints, kind, message):
    with pytest.raises(CorruptFileError, match=message) as err:
        check_checkpoint(checkpoints[kind])
    assert str(checkpoints[kind]) in str(err.value) and "without ckpt_path" in str(err.value)


class _UserModule(L.LightningModule):
    """A user's own module: no lightning-ft code in it."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.model = tiny_llama(vocab_size)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _ChecksCheckpoints(L.Callback):
    """What a user's own callback or module can do in ``setup``: make the Trainer check what it loads."""

    def setup(self, trainer, pl_module, stage):
        from lightning_ft.strategies import check_checkpoints

        check_checkpoints(trainer)


@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_check_checkpoints_hook_names_a_damaged_checkpoint(tmp_path, tokenizer, checkpoints, kind):
    """Any module, any strategy: the check runs in ``strategy.checkpoint_io`` before ``torch.load``."""
    trainer = quick_trainer(tmp_path, max_steps=2, callbacks=[_ChecksCheckpoints()])
    with pytest.raises(CorruptFileError, match="Resume from another checkpoint") as err:
        trainer.fit(_UserModule(len(tokenizer)), datamodule=lm_data(tokenizer), ckpt_path=checkpoints[kind])
    assert str(checkpoints[kind]) in str(err.value)


@pytest.mark.parametrize("kind", ["empty", "truncated"])
@pytest.mark.parametrize("setup", ["sft_module", "user_module_lora_callback"])
def test_fit_names_a_damaged_checkpoint(tmp_path, tokenizer, checkpoints, kind, setup):
    """The lightning-ft modules and callbacks install the check themselves: a plain Trainer, nothing else."""
    from lightning_ft.callbacks import LoRA

    if setup == "sft_module":
        module, callbacks = SFTModule(model=tiny_llama(len(tokenizer)), task="causal_lm"), []
    else:
        module, callbacks = _UserModule(len(tokenizer)), [LoRA(r=2)]
    trainer = quick_trainer(tmp_path, max_steps=2, callbacks=callbacks)
    with pytest.raises(CorruptFileError, match="Resume from another checkpoint") as err:
        trainer.fit(module, datamodule=lm_data(tokenizer), ckpt_path=checkpoints[kind])
    assert str(checkpoints[kind]) in str(err.value)


def test_lightning_ft_strategies_check_checkpoints(checkpoints):
    from lightning_ft.strategies import AdapterDDPStrategy

    with pytest.raises(CorruptFileError, match="is empty"):
        AdapterDDPStrategy().load_checkpoint(checkpoints["empty"])


def test_sharded_checkpoint_with_a_cut_short_shard(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step=4.ckpt"
    dcp.save({"state_dict": {"w": torch.randn(256)}}, checkpoint_id=folder)
    check_checkpoint(folder)
    shard = next(folder.glob("*.distcp"))
    _cut(shard, 0.1)
    with pytest.raises(CorruptFileError, match=rf"{shard.name} is cut short"):
        check_checkpoint(folder)
    (folder / ".metadata").write_bytes(b"")
    with pytest.raises(CorruptFileError, match=r"\.metadata is empty"):
        check_checkpoint(folder)


def test_cut_short_model_safetensors_is_named(tiny_dir):
    _cut(tiny_dir / "model.safetensors")
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is cut short.*save_pretrained"):
        load_model(str(tiny_dir))


@pytest.fixture
def adapter_dir(tmp_path, tokenizer) -> Path:
    model = inject_lora(tiny_llama(len(tokenizer)), r=2)
    return save_peft_adapter(model, tmp_path / "adapter")


ADAPTER_DAMAGE = {  # what is wrong: (error, message)
    "cut_weights": (CorruptFileError, r"adapter_model\.safetensors is cut short"),
    "empty_weights": (CorruptFileError, r"adapter_model\.safetensors is empty"),
    "no_config": (FileNotFoundError, r"adapter_config\.json \(the peft adapter config\) is missing"),
    "garbled_config": (CorruptFileError, r"adapter_config\.json .*is not valid JSON \(line \d+, column"),
    "config_without_r": (CorruptFileError, r"adapter_config\.json lacks \['r'\]"),
}


@pytest.mark.parametrize("damage", list(ADAPTER_DAMAGE))
def test_damaged_adapter_folder_is_named(adapter_dir, tokenizer, damage):
    error, message = ADAPTER_DAMAGE[damage]
    weights, config = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json"
    if damage == "cut_weights":
        _cut(weights)
    elif damage == "empty_weights":
        weights.write_bytes(b"")
    elif damage == "no_config":
        config.unlink()
    elif damage == "garbled_config":
        config.write_text(config.read_text()[:40])
    else:
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "r"}))
    model = tiny_llama(len(tokenizer))
    with pytest.raises(error, match=message) as err:
        load_peft_adapter(model, adapter_dir)
    assert "Export the adapter again" in str(err.value)
    assert not any("lora" in n for n, _ in model.named_parameters())  # the model is left untouched
