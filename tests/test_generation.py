"""Evaluation generation: KV cache equals no cache, left-padded batches equal one-by-one, stopping at EOS / end of
turn, and the prompts a data module batches for it."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tokenizer, tiny_llama

from lightning_ft import FineTuneDataModule
from lightning_ft.data.collate import tensor_to_texts, texts_to_tensor
from lightning_ft.evaluation.generation import cut_at_stop, generate, generate_text, stop_token_ids

NEVER = [10**6]  # a stop id outside every vocabulary: rows run to max_new_tokens


def tiny_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def prompts_of(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (3, 9, 6, 1)]  # unequal lengths


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tokenizer):
    build = tiny_llama if request.param == "llama" else tiny_gpt2
    return build(len(tokenizer), seed=1)


def test_kv_cache_equals_no_cache(model, tokenizer):
    ids, mask = left_padded(prompts_of(len(tokenizer)))
    kw = dict(max_new_tokens=10, stop_ids=NEVER, pad_token_id=0)
    cached = generate(model, ids, mask, use_cache=True, **kw)
    plain = generate(model, ids, mask, use_cache=False, **kw)
    assert cached == plain
    assert all(len(r) == 10 for r in cached)


def test_left_padded_batch_equals_one_by_one(model, tokenizer):
    prompts = prompts_of(len(tokenizer))
    ids, mask = left_padded(prompts)
    kw = dict(max_new_tokens=10, stop_ids=NEVER, pad_token_id=0)
    batched = generate(model, ids, mask, **kw)
    single = [generate(model, *left_padded([p]), **kw)[0] for p in prompts]
    assert batched == single
    assert len({tuple(r) for r in batched}) > 1  # the rows differ: padding mixed up would not go unnoticed


def test_rows_stop_at_their_own_first_stop_token(tokenizer):
    model = tiny_llama(len(tokenizer), seed=2)
    ids, mask = left_padded(prompts_of(len(tokenizer)))
    full = generate(model, ids, mask, max_new_tokens=12, stop_ids=NEVER, pad_token_id=0)
    stop = full[0][3]  # row 0's fourth token: row 0 stops there, other rows wherever they produce it (or never)
    cut = generate(model, ids, mask, max_new_tokens=12, stop_ids=[stop], pad_token_id=0)
    assert cut == [cut_at_stop(r, [stop]) for r in full]
    assert len(cut[0]) == full[0].index(stop) <= 3


def test_stop_tokens_include_end_of_turn():
    tok = make_tokenizer()
    tok.eos_token = "<|endoftext|>"  # EOS differs from the chat template's end of turn
    ids = stop_token_ids(tok)
    vocab = tok.get_vocab()
    assert ids[0] == vocab["<|endoftext|>"] and vocab["<|im_end|>"] in ids


def test_generate_text_decodes_without_special_tokens(tokenizer):
    model = tiny_llama(len(tokenizer), seed=2)
    ids, mask = left_padded(prompts_of(len(tokenizer)))
    texts = generate_text(model, tokenizer, ids, mask, max_new_tokens=6)
    rows = generate(model, ids, mask, max_new_tokens=6, stop_ids=stop_token_ids(tokenizer), pad_token_id=0)
    assert texts == [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]


def test_right_padding_is_refused(tokenizer):
    model = tiny_llama(len(tokenizer))
    ids, mask = left_padded(prompts_of(len(tokenizer)))
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids.flip(1), mask.flip(1), max_new_tokens=2, stop_ids=NEVER, pad_token_id=0)


def test_data_module_batches_prompts_and_references_for_free_text_rows(tokenizer):
    rows = [{"prompt": "repeat after me the", "response": "the movie"}, {"prompt": "hello", "response": "world"}]
    chat = rows + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a great film"}]}]
    dm = FineTuneDataModule(tokenizer, train=rows, val=chat, max_length=64, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert tensor_to_texts(batch["reference_bytes"]) == ["the movie", "world", "a great film"]
    assert all(t.dtype == torch.long for t in batch.values())  # a batch holds tensors only
    assert batch["gen_prompt_mask"][:, -1].eq(1).all()  # left-padded
    for i, ex in enumerate(dm.splits["val"].examples):
        prompt = batch["gen_prompt_ids"][i][batch["gen_prompt_mask"][i].bool()].tolist()
        full = ex["input_ids"]
        assert full[: len(prompt)] == prompt and ex["labels"][len(prompt)] != -100  # the answer starts right after
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert "gen_prompt_ids" not in dm.splits["train"].examples[0]  # training rows carry no generation prompt


def test_reference_texts_round_trip_through_a_tensor():
    texts = ["", "caf\u00e9 \u2013 na\u00efve", "a\nb", "\U0001f600 emoji"]
    encoded = texts_to_tensor(texts)
    assert encoded.dtype == torch.long and encoded.shape[0] == 4
    assert tensor_to_texts(encoded) == texts


def test_generation_syncs_ranks_only_for_sharded_weights(tokenizer, monkeypatch):
    """Under DDP every rank holds the whole model: ``synced_gpus`` would add an all-reduce per new token (and a hang
    when the ranks' generate calls differ); only sharded (DTensor) weights need it."""
    from types import SimpleNamespace

    from lightning_ft import SFTModule
    from lightning_ft.data.collate import texts_to_tensor
    from lightning_ft.modules import base

    seen = []
    monkeypatch.setattr(
        base, "generate_text", lambda *a, generation_kwargs, **k: seen.append(generation_kwargs) or [""]
    )
    module = SFTModule(model=tiny_llama(len(tokenizer)), task="causal_lm")
    module._tokenizer = tokenizer
    module._trainer = SimpleNamespace(world_size=2)  # a DDP run of two processes
    batch = {"gen_prompt_ids": torch.tensor([[5, 6]]), "gen_prompt_mask": torch.ones(1, 2, dtype=torch.long),
             "reference_bytes": texts_to_tensor(["x"])}  # fmt: skip
    module.generate_and_score(batch, "test")
    assert "synced_gpus" not in seen[-1]
    monkeypatch.setattr(base, "is_sharded", lambda model: True)
    module.generate_and_score(batch, "test")
    assert seen[-1]["synced_gpus"] is True
