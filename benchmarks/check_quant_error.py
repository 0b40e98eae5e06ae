"""How far a quantised SmolLM2-135M base is from the float32 one, and how far the merged model is from the unmerged
quantised one with adapters (issue 12).

On ``n`` MR test prompts (chat template, as the MR job scores them) it compares the logits of every prompt token:

* ``base`` rows: the quantised base (NF4 with / without double quantisation, int8) against the float32 base: max and
  mean absolute logit difference (and relative to the float32 logits' standard deviation), mean KL divergence of the
  next-token distribution, top-1 agreement, and the MR zero-shot answer (``positive`` vs ``negative`` first token at
  the answer position): agreement with the float32 base and each one's accuracy.
* ``merge`` rows: LoRA r=8 on every linear layer over the quantised base, with non-zero random adapters, against
  the model ``MergeAdapters`` writes (de-quantised in float32, merged in float32, cast to the base's dtype), for a
  float32 and a bfloat16 base.

Run ``nice -n 10 .venv/bin/python benchmarks/check_quant_error.py`` (27 minutes here, on 2 cores shared with other
jobs); writes ``benchmarks/results/quant_error.json`` / ``.md``. Needs the MR data (``lightning-ft prepare-mr``) and
the packaged SmolLM2 (DESIGN.md section 6).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import MR, machine, write_results

from lightning_ft.callbacks.merge import merge_lora_dequantized
from lightning_ft.lora import inject_lora, lora_layers
from lightning_ft.models import load_model, load_tokenizer
from lightning_ft.quant import quantize_base, quantized_weight_bytes

MODEL = "smollm2-135m-instruct"
BASES = {
    "nf4": {"dtype": "nf4"},
    "nf4, no double quant": {"dtype": "nf4", "double_quant": False},
    "int8": {"dtype": "int8"},
}


def prompts(tokenizer, n: int) -> tuple[dict, list[int]]:
    rows = [json.loads(line) for line in (MR / "instruction" / "test.jsonl").read_text().splitlines()[:n]]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        for r in rows
    ]
    tokenizer.padding_side = "left"  # the answer position is the last one of every row
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return dict(batch), [int(r["response"] == "positive") for r in rows]


def run_logits(model, batch: dict, chunk: int = 16) -> torch.Tensor:
    with torch.no_grad():
        parts = [
            model(
                input_ids=batch["input_ids"][i : i + chunk], attention_mask=batch["attention_mask"][i : i + chunk]
            ).logits.float()
            for i in range(0, len(batch["input_ids"]), chunk)
        ]
    return torch.cat(parts)


def compare(ref: torch.Tensor, got: torch.Tensor, mask: torch.Tensor) -> dict:
    r, g = ref[mask], got[mask]  # (tokens, vocab)
    diff = (g - r).abs()
    kl = F.kl_div(F.log_softmax(g, -1), F.log_softmax(r, -1), log_target=True, reduction="none").sum(-1)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "mean_abs_over_std": float(diff.mean() / r.std()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((g.argmax(-1) == r.argmax(-1)).float().mean()),
    }


def answers(logits: torch.Tensor, ids: tuple[int, int]) -> torch.Tensor:
    last = logits[:, -1]
    return (last[:, ids[1]] > last[:, ids[0]]).long()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    batch, labels = prompts(tokenizer, args.prompts)
    mask = batch["attention_mask"].bool()
    choice_ids = tuple(tokenizer.encode(w, add_special_tokens=False)[0] for w in ("negative", "positive"))
    labels = torch.tensor(labels)
    base = load_model(MODEL, dtype=torch.float32).eval()
    ref = run_logits(base, batch)
    ref_answers = answers(ref, choice_ids)
    rows, merges = [], []
    for name, settings in BASES.items():
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantize_base(model, **settings)
        seconds = time.perf_counter() - start
        got = run_logits(model, batch)
        got_answers = answers(got, choice_ids)
        rows.append(
            {
                "base": name,
                **compare(ref, got, mask),
                "mr_answer_agreement": float((got_answers == ref_answers).float().mean()),
                "mr_accuracy": float((got_answers == labels).float().mean()),
                "quantised_weight_mb": quantized_weight_bytes(model) / 2**20,
                "quantise_s": seconds,
            }
        )
        del model
    fp32_accuracy = float((ref_answers == labels).float().mean())
    for dtype, quant in ((torch.float32, "nf4"), (torch.bfloat16, "nf4"), (torch.bfloat16, None)):
        model = copy.deepcopy(base).to(dtype)
        if quant:
            quantize_base(model, dtype=quant)
        inject_lora(model, r=8, alpha=16)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # adapters as after training: B no longer zero (update norm ~ 1% of the weight's)
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 2e-3)
        unmerged = run_logits(model, batch)
        plain = copy.deepcopy(base).to(dtype)
        moved = compare(run_logits(quantize_base(plain, dtype=quant) if quant else plain, batch), unmerged, mask)
        merge_lora_dequantized(model)
        merged = run_logits(model, batch)
        merges.append(
            {
                "base_dtype": str(dtype).removeprefix("torch."),
                "base": quant or "not quantised (reference)",
                **compare(unmerged, merged, mask),
                "adapter_moved": moved,
            }
        )
        del model
    payload = {
        "model": MODEL,
        "prompts": args.prompts,
        "tokens": int(mask.sum()),
        "fp32_mr_accuracy": fp32_accuracy,
        "bases": rows,
        "merge": merges,
        "machine": machine(),
        "command": "nice -n 10 .venv/bin/python benchmarks/check_quant_error.py",
    }
    md = [
        f"# Quantised base error: {MODEL}, {args.prompts} MR test prompts ({payload['tokens']} tokens)",
        "",
        "Quantised base vs the float32 base (logits of every prompt token; MR answer = positive vs negative at the "
        f"answer position; float32 zero-shot accuracy {fp32_accuracy:.3f}):",
        "",
        "| base | max abs | mean abs | mean abs / std | mean KL | top-1 agree | MR answer agree | MR acc "
        "| weights MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    md += [
        f"| {r['base']} | {r['max_abs']:.3f} | {r['mean_abs']:.4f} | {r['mean_abs_over_std']:.4f} | {r['mean_kl']:.4f} "
        f"| {r['top1_agreement']:.3f} | {r['mr_answer_agreement']:.3f} | {r['mr_accuracy']:.3f} "
        f"| {r['quantised_weight_mb']:.1f} |"
        for r in rows
    ]
    md += [
        "",
        "Merged model (`MergeAdapters`: de-quantise to float32, merge in float32, cast to the base dtype) vs the "
        "unmerged model with LoRA r=8 adapters (random, non-zero; `adapter moved` = how far the adapters move the "
        "logits of their base, for scale; the last row merges into a bfloat16 base that was never quantised):",
        "",
        "| base dtype | base | max abs | mean abs | mean KL | top-1 agree | adapter moved (mean abs) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    md += [
        f"| {m['base_dtype']} | {m['base']} | {m['max_abs']:.2e} | {m['mean_abs']:.2e} | {m['mean_kl']:.2e} "
        f"| {m['top1_agreement']:.4f} "
        f"| {m['adapter_moved']['mean_abs']:.3f} |"
        for m in merges
    ]
    md += [
        "",
        f"Command: `{payload['command']}`; machine: {payload['machine']['cpus']} CPUs, "
        f"torch {payload['machine']['torch']}.",
    ]
    write_results(args.out, "quant_error", payload, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
