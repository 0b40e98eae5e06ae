"""LoRA over an NF4-quantised tiny Llama for ``test_quant_distributed.py``: in-process (the single-process reference)
or under torchrun with 2 processes and ``AdapterDDPStrategy`` (``python -m torch.distributed.run ... --ddp``).

Every run trains ``LoRAModule(quantize_base="nf4")`` on ``rows.jsonl`` from the ``pretrained`` folder with a global
batch of 4 for 5 steps and exports the peft adapter and the merged model to ``<out>/adapter`` and ``<out>/merged``;
rank 0 records the quantised layers it trained over in ``<out>/report.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
from helpers import quick_trainer

from lightning_ft import FineTuneDataModule, LoRAModule
from lightning_ft.quant import quantized_layers
from lightning_ft.strategies import AdapterDDPStrategy

GLOBAL_BATCH = 4


class Report(L.Callback):
    """Rank 0 writes which layers were quantised and which parameters trained, at the start of training."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            layers = quantized_layers(pl_module)
            report = {
                "quantized": sorted(layers),
                "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
                "world_size": trainer.world_size,
                # the de-quantised base this rank trains over (DDP must not re-quantise it while syncing)
                "base_sum": sum(float(m.dequantized_weight().double().abs().sum()) for m in layers.values()),
            }
            self.path.write_text(json.dumps(report))


def fit(
    pretrained: str,
    rows: str,
    out: Path,
    strategy="auto",
    devices: int = 1,
    max_steps: int = 5,
    quant: str | None = "nf4",
) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    module = LoRAModule(
        pretrained,
        r=4,
        alpha=8,
        quantize_base=None if quant in (None, "none") else quant,
        learning_rate=5e-3,
        weight_decay=0.01,
        adapter_dir=str(out / "adapter"),
        merged_dir=str(out / "merged"),
    )
    data = FineTuneDataModule(
        pretrained, task="instruction", train=rows, max_length=64, batch_size=GLOBAL_BATCH // devices
    )
    trainer = quick_trainer(
        out,
        max_steps,
        devices=devices,
        strategy=strategy,
        callbacks=[Report(out / "report.json")],
        deterministic=True,
    )
    trainer.fit(module, data)
    return trainer


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--quant", default="nf4")
    args = parser.parse_args(argv)
    if args.ddp:
        fit(args.pretrained, args.rows, args.out, AdapterDDPStrategy(timeout=60), devices=2, quant=args.quant)
    else:
        fit(args.pretrained, args.rows, args.out, quant=args.quant)


if __name__ == "__main__":
    main(sys.argv[1:])
