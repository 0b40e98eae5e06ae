"""LoRA fine-tuning of a tiny Llama for ``test_distributed.py``: in-process (the single-process reference) or under
torchrun (``python -m torch.distributed.run ... tests/distributed_worker.py --mode ...``).

Every run trains ``LoRAModule`` on ``rows.jsonl`` from the ``pretrained`` folder (model and tokenizer) with a global
batch of 4 and exports the peft adapter and the merged model to ``<out>/adapter`` and ``<out>/merged``.

Modes under torchrun (2 processes, 2 rows each per step):
- ``ddp``: ``AdapterDDPStrategy`` counting the bytes it all-reduces; rank 0 writes ``<out>/report.json``; then
  sparse fine-tuning (``SparseModule``, magnitude masks) into ``<out>/sparse``; then LoRA again with 1 row per rank
  per micro-batch and ``accumulate_grad_batches=2`` into ``<out>/accumulated`` (checkpoints every 3 steps), resumed
  from its mid-epoch step-3 checkpoint into ``<out>/resumed``. After the first fit it validates on the first 19 rows
  (an odd count: ``report.json``'s ``val_loss_19_rows``).
- ``fsdp2``: ``AdapterFSDP2Strategy`` with activation checkpointing for 10 steps, sharded adapter-only checkpoints
  every 3 steps; validates the fitted (still sharded) module, on all rows and on the first 19; resumes from the
  mid-epoch step-3 checkpoint into ``<out>/resumed``; then tries a copy of that checkpoint that claims another world
  size. ``report.json`` records the checkpoint's files and keys, the validation losses and the error.
- ``fsdp2_meta``: ``AdapterFSDP2Strategy`` for 5 steps without and with ``sharded_loading`` (into ``<out>/plain`` and
  ``<out>/meta``), every rank recording its per-step losses and every tensor it reads from the weight files (through
  a subclass of the loader's ``SafetensorsRows``) into ``<out>/rank<r>.json``; then a module given its model as an
  object, which sharded loading must refuse.
- ``fail``: rank ``--fail_rank`` raises at step 2 (the run must end on every rank). With ``--devices 2`` and no
  torchrun, Lightning's own launcher starts the second process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import lightning as L
import torch
from helpers import quick_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft import FineTuneDataModule, LoRAModule, SparseModule
from lightning_ft.strategies import AdapterDDPStrategy, AdapterFSDP2Strategy, trainable_bytes
from lightning_ft.strategies.common import WORLD_SIZE_KEY
from lightning_ft.strategies.fsdp2 import checkpoint_model_keys

GLOBAL_BATCH = 4
TIMEOUT_S = 60  # collectives fail after this instead of torch's 30 minutes


class FailAt(L.Callback):
    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"planned failure on rank {self.rank} at step {self.step}")


class LossLog(L.Callback):
    """Each training step's loss on this rank (the micro-batch's summed loss, before the token-mean rescaling)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def recording_reader(base: type) -> type:
    """A subclass of ``meta_load.SafetensorsRows`` that logs every read: ``(key, shape read, full shape)``."""

    class RecordingReader(base):
        reads: list[tuple[str, list[int], list[int]]] = []

        def read_rows(self, key, start, stop, out) -> None:
            super().read_rows(key, start, stop, out)
            self.reads.append((key, [stop - start, *self.shape(key)[1:]], self.shape(key)))

    return RecordingReader


class TrainableBytes(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.bytes = trainable_bytes(pl_module)


def fit(
    pretrained: str,
    rows: str,
    out: Path,
    strategy="auto",
    devices: int = 1,
    num_nodes: int = 1,
    max_steps: int = 5,
    ckpt_path: str | None = None,
    checkpoint_every: int | None = None,
    callbacks: list | None = None,
    method: str = "lora",
    accumulate: int = 1,
) -> L.Trainer:
    """Seed, build the module (LoRA or sparse) and data, fit ``max_steps`` and export into ``out``."""
    L.seed_everything(0, verbose=False)
    common = dict(
        learning_rate=5e-3,
        weight_decay=0.01,
        target_modules=["q_proj", "v_proj", "up_proj"],
        adapter_dir=str(out / "adapter"),
        merged_dir=str(out / "merged"),
    )
    if method == "lora":
        module = LoRAModule(pretrained, r=4, alpha=8, **common)
    else:  # magnitude masks: gradient criteria score per-device batches, whose size differs between the runs
        module = SparseModule(pretrained, density=0.05, criterion="magnitude", **common)
    data = FineTuneDataModule(
        pretrained,
        task="instruction",
        train=rows,
        max_length=64,
        batch_size=GLOBAL_BATCH // (devices * num_nodes * accumulate),
    )
    callbacks = list(callbacks or [])
    if checkpoint_every:
        kwargs = dict(every_n_train_steps=checkpoint_every, save_top_k=-1, filename="{step}")
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", **kwargs))
    trainer = quick_trainer(
        out,
        max_steps,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        enable_checkpointing=bool(checkpoint_every),
        callbacks=callbacks,
        deterministic=True,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def validate(
    module: L.LightningModule,
    pretrained: str,
    rows: str,
    strategy="auto",
    devices: int = 1,
    max_rows: int | None = None,
) -> float:
    """The validation loss of a fitted ``module`` on (the first ``max_rows`` of) ``rows`` under a new Trainer."""
    data = FineTuneDataModule(
        pretrained,
        task="instruction",
        train=rows,
        val=rows,
        max_length=64,
        batch_size=GLOBAL_BATCH // devices,
        max_eval_examples=max_rows,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer.validate(module, data, verbose=False)[0]["val/loss"]


def claim_world_size(src: Path, dst: Path, world_size: int, trainer: L.Trainer) -> None:
    """Copy a sharded checkpoint, recording another world size in its metadata (on rank 0; all ranks wait)."""
    if trainer.is_global_zero:
        shutil.copytree(src, dst)
        meta = torch.load(dst / "meta.pt", weights_only=False)
        meta[WORLD_SIZE_KEY] = world_size
        torch.save(meta, dst / "meta.pt")
    trainer.strategy.barrier()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "fsdp2_meta", "fail"], required=True)
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, help="without torchrun: Lightning starts the other processes")
    parser.add_argument("--fail_rank", type=int, default=1)
    args = parser.parse_args(argv)
    devices = args.devices or int(os.environ["LOCAL_WORLD_SIZE"])
    common = dict(pretrained=args.pretrained, rows=args.rows, devices=devices, num_nodes=args.num_nodes)
    report: dict = {}
    if args.mode in ("ddp", "fail"):
        strategy = AdapterDDPStrategy(measure_communication=True, timeout=TIMEOUT_S)
        extra = [FailAt(rank=args.fail_rank, step=2)] if args.mode == "fail" else []
        counted = TrainableBytes()
        trainer = fit(out=args.out, strategy=strategy, callbacks=[counted, *extra], **common)
        report = {"allreduce_bytes": strategy.comm_counter.bytes, "trainable_bytes": counted.bytes}
        # 19 rows on 2 ranks: every row scored once (Lightning's default sampler would score one twice)
        strategy = AdapterDDPStrategy(timeout=TIMEOUT_S)
        report["val_loss_19_rows"] = validate(
            trainer.lightning_module, args.pretrained, args.rows, strategy, devices, 19
        )
        strategy = AdapterDDPStrategy(timeout=TIMEOUT_S)
        fit(out=args.out / "sparse", strategy=strategy, method="sparse", **common)
        fit(
            out=args.out / "accumulated",
            strategy=AdapterDDPStrategy(timeout=TIMEOUT_S),
            accumulate=2,
            checkpoint_every=3,
            **common,
        )
        ckpt = args.out / "accumulated" / "ckpt" / "step=3.ckpt"  # 5 steps (10 micro-batches) an epoch: mid-epoch
        fit(
            out=args.out / "resumed",
            strategy=AdapterDDPStrategy(timeout=TIMEOUT_S),
            accumulate=2,
            ckpt_path=str(ckpt),
            **common,
        )
    elif args.mode == "fsdp2_meta":
        trainer = fsdp2_meta(args.out, common)
    else:
        strategy = AdapterFSDP2Strategy(activation_checkpointing=True, timeout=TIMEOUT_S)
        trainer = fit(out=args.out, strategy=strategy, max_steps=10, checkpoint_every=3, **common)
        ckpt = args.out / "ckpt" / "step=3.ckpt"  # 5 steps an epoch: inside the first epoch
        strategy = AdapterFSDP2Strategy(timeout=TIMEOUT_S)
        report["val_loss"] = validate(trainer.lightning_module, args.pretrained, args.rows, strategy, devices)
        # 19 rows on 2 ranks: equal shards (a sharded forward needs every rank), the short one topped up with a
        # filler row that scores nothing (Lightning's default sampler would score a repeated row)
        strategy = AdapterFSDP2Strategy(timeout=TIMEOUT_S)
        report["val_loss_19_rows"] = validate(
            trainer.lightning_module, args.pretrained, args.rows, strategy, devices, 19
        )
        report["checkpoint_files"] = sorted(p.name for p in ckpt.iterdir())
        report["checkpoint_model_keys"] = sorted(checkpoint_model_keys(ckpt))
        strategy = AdapterFSDP2Strategy(activation_checkpointing=True, timeout=TIMEOUT_S)
        fit(out=args.out / "resumed", strategy=strategy, max_steps=10, ckpt_path=str(ckpt), **common)
        claim_world_size(ckpt, args.out / "ckpt_other_world", 3, trainer)
        try:
            strategy = AdapterFSDP2Strategy(timeout=TIMEOUT_S)
            fit(out=args.out / "refused", strategy=strategy, ckpt_path=str(args.out / "ckpt_other_world"), **common)
        except RuntimeError as err:
            report["resume_error"] = str(err)
    if trainer.is_global_zero:
        (args.out / "report.json").write_text(json.dumps(report))


def fsdp2_meta(out: Path, common: dict) -> L.Trainer:
    """The ``fsdp2_meta`` mode (see the module docstring)."""
    import lightning_ft.strategies.meta_load as meta_load

    rank = int(os.environ.get("RANK", 0))
    record: dict = {}
    for name, sharded in (("plain", False), ("meta", True)):
        log = LossLog()
        original = meta_load.SafetensorsRows
        meta_load.SafetensorsRows = reader = recording_reader(original)
        try:
            strategy = AdapterFSDP2Strategy(activation_checkpointing=True, timeout=TIMEOUT_S, sharded_loading=sharded)
            trainer = fit(out=out / name, strategy=strategy, callbacks=[log], **common)
        finally:
            meta_load.SafetensorsRows = original
        record[name] = {"losses": log.losses, "reads": reader.reads, "load_report": strategy.load_report}
    from lightning_ft.models import load_model

    module = LoRAModule(model=load_model(common["pretrained"]), r=4, alpha=8, target_modules=["q_proj"])
    try:
        L.Trainer(
            accelerator="cpu",
            devices=common["devices"],
            strategy=AdapterFSDP2Strategy(sharded_loading=True, timeout=TIMEOUT_S),
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
        ).fit(module, FineTuneDataModule(common["pretrained"], task="instruction", train=common["rows"]))
    except ValueError as err:
        record["object_error"] = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
