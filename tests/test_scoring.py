"""Multiple-choice scoring with one prompt pass equals scoring each prompt + choice sequence on its own."""

from __future__ import annotations

import pytest
import torch
from helpers import require_packaged, tiny_llama

from lightning_ft.data.collate import Collator
from lightning_ft.scoring import score_choices


def reference_scores(model, prompts: list[list[int]], choices: list[list[list[int]]]) -> torch.Tensor:
    """(B, K) log P(choice | prompt), one unpadded forward pass per prompt + choice."""
    out = torch.zeros(len(prompts), len(choices[0]))
    for b, prompt in enumerate(prompts):
        for k, choice in enumerate(choices[b]):
            ids = torch.tensor([prompt + choice])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(choice) - 1)
            out[b, k] = logp[positions, torch.tensor(choice)].sum()
    return out


def batch_of(prompts, choices, pad_id=0):
    examples = [{"input_ids": p, "prompt_ids": p, "choice_ids": c, "choice_label": 0} for p, c in zip(prompts, choices)]
    return Collator(pad_id)(examples)


@pytest.mark.parametrize("choice_lengths", [(1, 1), (2, 2), (1, 3)])
def test_one_prompt_pass_equals_full_sequences(choice_lengths) -> None:
    torch.manual_seed(0)
    model = tiny_llama(64).eval()
    prompts = [[5, 9, 11, 3, 7, 2], [4, 4], [8, 1, 6, 30, 31]]  # different lengths: left padding is exercised
    choices = [[list(range(10 + b, 10 + b + n)) for n in choice_lengths] for b in range(len(prompts))]
    batch = batch_of(prompts, choices)
    with torch.no_grad():
        got = score_choices(
            model, batch["choice_prompt_ids"], batch["choice_prompt_mask"], batch["choice_ids"], batch["choice_mask"]
        )
        expected = reference_scores(model, prompts, choices)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_right_padded_prompts_are_refused() -> None:
    model = tiny_llama(64).eval()
    with pytest.raises(ValueError, match="left-padded"):
        score_choices(model, torch.tensor([[3, 0]]), torch.tensor([[1, 0]]), torch.tensor([[4], [5]]), torch.ones(2, 1))


def test_smollm2_scores_equal_full_sequences() -> None:
    require_packaged("smollm2-135m-instruct")
    from lightning_ft.data.instruction import InstructionFormat
    from lightning_ft.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct").eval()
    rows = [
        {"prompt": "Is this review positive or negative?\n\nReview: A warm, funny film.", "response": "positive"},
        {"prompt": "Positive or negative?\n\nReview: Dull.", "response": "negative"},
    ]
    fmt = InstructionFormat(system_prompt="")
    examples = [fmt.encode_choices({**r, "choices": ["negative", "positive"]}, tok, 256, "row") for r in rows]
    batch = Collator(tok.pad_token_id)([{**e, "input_ids": e["prompt_ids"]} for e in examples])
    with torch.no_grad():
        got = score_choices(
            model, batch["choice_prompt_ids"], batch["choice_prompt_mask"], batch["choice_ids"], batch["choice_mask"]
        )
        expected = reference_scores(model, [e["prompt_ids"] for e in examples], [e["choice_ids"] for e in examples])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
