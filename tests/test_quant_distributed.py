"""LoRA over an NF4 / int8 base with DDP (2 CPU processes, gloo) gives the single-process result (same global
batch).

The quantised weights are frozen tensor subclasses: DDP must neither broadcast nor all-reduce them, and every rank
quantises the same base to the same values. The tiny Llama's rows have unequal answer lengths (1 to 16 words), so
only one mean over every target token of the step on both ranks matches the single-process run.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_torchrun, tiny_llama, varied_rows
from safetensors.torch import load_file

TIMEOUT = 240


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("quant_assets")
    tiny_llama(len(tokenizer)).save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in varied_rows(20, longest=16)))
    return {"pretrained": str(root / "pretrained"), "rows": str(root / "rows.jsonl")}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_ddp_over_a_quantised_base_matches_one_process(tmp_path, assets, quant):
    from quant_worker import fit

    fit(assets["pretrained"], assets["rows"], tmp_path / "single", quant=quant)
    out = tmp_path / "ddp"
    args = [
        "--pretrained",
        assets["pretrained"],
        "--rows",
        assets["rows"],
        "--out",
        str(out),
        "--ddp",
        "--quant",
        quant,
    ]
    proc = run_torchrun("quant_worker.py", *args, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    single, ddp = (
        json.loads((tmp_path / "single" / "report.json").read_text()),
        json.loads((out / "report.json").read_text()),
    )
    assert ddp["world_size"] == 2 and len(ddp["quantized"]) == 14
    assert ddp["quantized"] == single["quantized"] and ddp["trainable"] == single["trainable"]
    assert ddp["base_sum"] == single["base_sum"]  # DDP's start-up broadcast did not re-quantise the base
    assert all(n.endswith(("lora_A", "lora_B")) for n in ddp["trainable"])
    for sub in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        ref, got = load_file(tmp_path / "single" / sub), load_file(out / sub)
        assert got.keys() == ref.keys(), sub
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=0, msg=f"{sub}: {key}")
    # the adapters did train (lora_B starts at zero)
    assert any(
        v.abs().max() > 1e-4 for k, v in load_file(out / "adapter/adapter_model.safetensors").items() if "lora_B" in k
    )
