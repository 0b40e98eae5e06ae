"""Shared fixtures: a tiny byte-level BPE tokenizer with a ChatML template, a tiny random Llama. The helpers they are
built from, and the ones the test files import, live in ``helpers.py``."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import make_tokenizer, tiny_llama  # noqa: E402  (after the environment settings above)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer():
    return make_tokenizer(chat_template=False)


@pytest.fixture
def llama(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(autouse=True)
def finish_wandb_runs():
    """A W&B run a test leaves open would be reused by the next test's ``WandbLogger`` (wandb keeps one global run)."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
