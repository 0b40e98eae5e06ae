"""The ``lightning-ft`` command: LightningCLI over our modules and ``FineTuneDataModule``.

    lightning-ft fit --config recipes/minilm_mr_sft.yaml [--trainer.max_epochs 3 ...]
    lightning-ft validate|test|predict --config ... --ckpt_path ...
    lightning-ft prepare-mr [--out data/mr]

A recipe states the model once (``model.init_args.model_name_or_path``) and the data task once (``data.task``);
the CLI links them to the data module's tokenizer and the module's task and labels.

Distributed: ``--trainer.strategy adapter_ddp`` (or ``adapter_fsdp2``, ``adapter_fsdp1``; see
``lightning_ft.strategies``) with ``--trainer.devices`` and ``--trainer.num_nodes``; ``recipes/launch_torchrun.sh``
and ``recipes/launch_slurm.sbatch`` start the processes on several nodes.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

import lightning_ft.strategies  # noqa: F401  registers --trainer.strategy adapter_ddp / adapter_fsdp2 / adapter_fsdp1
from lightning_ft.data.datamodule import FineTuneDataModule, model_task_for
from lightning_ft.modules.base import FineTuneModule


class FineTuneCLI(LightningCLI):
    """LightningCLI with the links between the data module and the method module."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")
        parser.link_arguments("data.task", "model.init_args.task", compute_fn=model_task_for)
        parser.link_arguments("data.labels", "model.init_args.labels")


def make_cli(args: list[str] | None = None, run: bool = True) -> FineTuneCLI:
    """Build the CLI; ``args`` replaces ``sys.argv[1:]`` (with ``run=False`` it holds no subcommand)."""
    return FineTuneCLI(
        FineTuneModule,
        FineTuneDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "prepare-mr":
        from lightning_ft.data.mr import main as prepare_mr

        prepare_mr(args[1:])
        return
    make_cli(argv)


if __name__ == "__main__":
    main()
