"""Packing: several examples in one row must give exactly the logits of each example run alone."""

from __future__ import annotations

import pytest
import torch
from helpers import instruction_rows, tiny_llama

from lightning_ft.data.collate import IGNORE_INDEX, Collator
from lightning_ft.data.instruction import InstructionFormat
from lightning_ft.data.packing import pack_examples
from lightning_ft.modules.objectives import causal_lm_sums


def packed_vs_alone(model, examples, pad_id, max_length, atol):
    rows = pack_examples(examples, max_length=max_length, seed=0)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    assert len(rows) < len(examples)  # something was actually packed
    batch = Collator(pad_id)(rows)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    by_ids = {tuple(e["input_ids"]): e for e in examples}
    checked = 0
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for s, e in zip(starts, starts[1:]):
            ids = row["input_ids"][s:e]
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[r, s:e], alone, atol=atol, rtol=0)
            # labels: the example's own labels, except its first token, which nothing predicts
            assert row["labels"][s] == IGNORE_INDEX
            assert row["labels"][s + 1 : e] == by_ids[tuple(ids)]["labels"][1:]
            checked += 1
    assert checked == len(examples)
    return rows, batch, packed_logits


def test_packing_matches_unpacked_logits_tiny_llama(tokenizer):
    model = tiny_llama(len(tokenizer))
    examples = InstructionFormat().encode(instruction_rows(12), tokenizer, 256, "train").examples
    packed_vs_alone(model, examples, tokenizer.pad_token_id, max_length=200, atol=1e-5)


def test_packed_loss_equals_sum_of_example_losses(tokenizer):
    model = tiny_llama(len(tokenizer))
    examples = InstructionFormat().encode(instruction_rows(8), tokenizer, 256, "train").examples
    rows, batch, logits = packed_vs_alone(model, examples, tokenizer.pad_token_id, max_length=256, atol=1e-5)
    packed_nll, packed_n, _ = causal_lm_sums(logits, batch["labels"])
    alone_nll, alone_n = 0.0, 0
    for e in examples:
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits
        nll, n, _ = causal_lm_sums(lg, torch.tensor([e["labels"]]))
        alone_nll, alone_n = alone_nll + nll, alone_n + n
    assert packed_n == alone_n
    torch.testing.assert_close(packed_nll, alone_nll, atol=1e-3, rtol=1e-5)


def test_pack_respects_max_length_and_is_deterministic(tokenizer):
    examples = InstructionFormat().encode(instruction_rows(20), tokenizer, 256, "train").examples
    a = pack_examples(examples, max_length=120, seed=3)
    b = pack_examples(examples, max_length=120, seed=3)
    c = pack_examples(examples, max_length=120, seed=4)
    assert a == b and a != c
    assert all(len(r["input_ids"]) <= 120 for r in a)


def test_packing_rejects_classification():
    with pytest.raises(ValueError, match="causal-LM"):
        pack_examples([{"input_ids": [1, 2], "label": 0}], 8, 0)


@pytest.mark.integration
def test_packing_matches_unpacked_logits_smollm2():
    from helpers import require_packaged

    require_packaged("smollm2-135m-instruct")
    from lightning_ft.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct").eval()
    examples = InstructionFormat().encode(instruction_rows(4), tok, 256, "train").examples
    packed_vs_alone(model, examples, tok.pad_token_id, max_length=256, atol=1e-4)


# ---- architectures: each packs exactly or is refused ------------------------------------------------------------
def tiny_causal_lm(arch: str, vocab: int):
    import transformers as T

    torch.manual_seed(0)
    blocks = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(blocks, num_key_value_heads=2)),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(blocks, num_key_value_heads=2)),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(blocks, num_key_value_heads=2)),
        "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(blocks, num_key_value_heads=2, head_dim=8)),
        "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
        "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, blocks),
        "phi": (T.PhiConfig, T.PhiForCausalLM, blocks),
        "opt": (
            T.OPTConfig,
            T.OPTForCausalLM,
            dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
        ),
        "bert": (T.BertConfig, T.BertLMHeadModel, dict(blocks, is_decoder=True)),
    }
    config_cls, model_cls, kwargs = configs[arch]
    return model_cls(config_cls(vocab_size=vocab, **kwargs)).eval()


PACKS = ["llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox", "phi"]
LEAKS = ["opt"]  # learned positions offset by the attention mask, which ignore restarting position_ids
# BERT as a causal LM leaks up to transformers 5.24 and packs exactly from 5.25 (its causal mask began to take
# position_ids): the probe's verdict must follow the installed version, checked against a direct measurement
VERSION_DEPENDENT = ["bert"]


@pytest.mark.parametrize("arch", PACKS + LEAKS)
def test_each_architecture_packs_exactly_or_is_refused(tokenizer, arch):
    from lightning_ft.data.packing import PackingError, check_packing

    model = tiny_causal_lm(arch, len(tokenizer))
    examples = InstructionFormat().encode(instruction_rows(8), tokenizer, 256, "train").examples
    if arch in PACKS:
        check_packing(model)
        rows, batch, logits = packed_vs_alone(model, examples, tokenizer.pad_token_id, max_length=256, atol=1e-5)
        packed_nll, _, _ = causal_lm_sums(logits, batch["labels"])
        alone_nll = 0.0
        for e in examples:
            with torch.no_grad():
                lg = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits
            alone_nll = alone_nll + causal_lm_sums(lg, torch.tensor([e["labels"]]))[0]
        torch.testing.assert_close(packed_nll, alone_nll, atol=1e-4, rtol=1e-5)
        return
    with pytest.raises(PackingError, match=f"{type(model).__name__}.*packing=False"):
        check_packing(model)
    with pytest.raises(AssertionError):  # and the refusal is not spurious: packed logits really differ
        packed_vs_alone(model, examples, tokenizer.pad_token_id, max_length=256, atol=1e-5)


@pytest.mark.parametrize("arch", VERSION_DEPENDENT)
def test_the_probe_agrees_with_a_direct_measurement(tokenizer, arch):
    """Whatever the installed transformers does, the probe accepts exactly the models whose packed logits are exact."""
    from lightning_ft.data.packing import PackingError, check_packing

    model = tiny_causal_lm(arch, len(tokenizer))
    examples = InstructionFormat().encode(instruction_rows(8), tokenizer, 256, "train").examples
    try:
        packed_vs_alone(model, examples, tokenizer.pad_token_id, max_length=256, atol=1e-5)
        exact = True
    except AssertionError:
        exact = False
    if exact:
        check_packing(model)
    else:
        with pytest.raises(PackingError, match=f"{type(model).__name__}.*packing=False"):
            check_packing(model)


def test_fit_with_packing_on_a_leaking_model_stops_before_training(tokenizer, tmp_path):
    from helpers import quick_trainer

    from lightning_ft import FineTuneDataModule, SFTModule
    from lightning_ft.data.packing import PackingError

    model = tiny_causal_lm("opt", len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = FineTuneDataModule(tokenizer, task="instruction", train=instruction_rows(8), packing=True, batch_size=2)
    with pytest.raises(PackingError, match="OPTForCausalLM"):
        quick_trainer(tmp_path, max_steps=2).fit(SFTModule(model=model), data)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no step was taken

    # the same data on a model that keeps examples apart trains, and packing_check=False skips the probe
    quick_trainer(tmp_path, max_steps=1).fit(SFTModule(model=tiny_llama(len(tokenizer))), data)
    unchecked = FineTuneDataModule(
        tokenizer, task="instruction", train=instruction_rows(8), packing=True, packing_check=False, batch_size=2
    )
    quick_trainer(tmp_path, max_steps=1).fit(SFTModule(model=tiny_causal_lm("opt", len(tokenizer))), unchecked)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_the_probe_in_bfloat16(tokenizer, arch):
    """In bf16 the probe keeps its verdicts: Llama packs (no false refusal from rounding), OPT is refused."""
    from lightning_ft.data.packing import PackingError, check_packing

    model = tiny_causal_lm(arch, len(tokenizer)).to(torch.bfloat16)
    if arch == "llama":
        check_packing(model)
    else:
        with pytest.raises(PackingError, match="OPTForCausalLM"):
            check_packing(model)
