"""Free-text evaluation end to end: zero-shot test, LoRA fit, tuned test, and a report of the two side by side.

    lightning-ft prepare-trec                                   # once: data/trec/
    python recipes/smollm2_trec_job.py [--config recipes/smollm2_trec_lora.yaml] [any lightning-ft override ...]

Writes, under the logger's version folder (``runs/smollm2_trec_lora/logs/version_N``): ``metrics_test.json``,
``generations_test.jsonl`` (prompt, reference, generated answer), ``figures/`` (loss curve) for the tuned model; the
same for the base model in ``zero_shot/`` next to it; and ``report.md`` comparing the two (``lightning-ft report``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_ft.cli import make_cli
from lightning_ft.evaluation.run_report import move_test_outputs, write_run_report

DEFAULT_CONFIG = "recipes/smollm2_trec_lora.yaml"


def main(argv: list[str]) -> None:
    if "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    cli = make_cli(argv, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.test(model, data)
    run = Path(trainer.log_dir)  # on every rank (it broadcasts); only global rank 0 touches the files
    zero_shot = run / "zero_shot"
    if trainer.is_global_zero:
        move_test_outputs(run, zero_shot)
    trainer.fit(model, data)
    trainer.test(model, data)
    if trainer.is_global_zero:
        names = ["zero-shot", "tuned"]
        out = write_run_report([zero_shot, run], run / "report.md", names=names, title="TREC question types")
        print(f"report: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
