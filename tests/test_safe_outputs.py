"""Outputs never destroy user files, and output mistakes are caught at set-up, before training (issue 10, items 1, 5).

Every writer (merged model, peft adapter, sparse delta, compressed model, predictions, reports) refuses an existing
destination holding anything lightning-ft did not write unless ``overwrite=True``, replaces its own earlier output,
expands ``~``, and cleans the temporary folders a killed write left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import lm_data, quick_trainer, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_ft import LoRAModule
from lightning_ft.callbacks import LoRA, MergeAdapters, PredictionWriter
from lightning_ft.callbacks.merge import check_export_dirs, export_adapters
from lightning_ft.compress import compress_low_rank, save_compressed
from lightning_ft.io import MARKER, OutputPathError, atomic_path
from lightning_ft.lora import inject_lora, save_peft_adapter
from lightning_ft.report import plot_loss_curve
from lightning_ft.sparse import inject_sparse, save_sparse_delta, select_sparse

VOCAB = 64


# ---- helpers -------------------------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_folder(folder: Path) -> dict[str, bytes]:
    """A previous run's folder: logs, a checkpoint and config.yaml."""
    (folder / "logs" / "version_0").mkdir(parents=True)
    (folder / "logs" / "version_0" / "metrics.csv").write_text("step,train/loss\n0,2.5\n")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "epoch=0-step=90.ckpt").write_bytes(os.urandom(256))
    (folder / "config.yaml").write_text("model:\n  class_path: lightning_ft.LoRAModule\n")
    return snapshot(folder)


class StepCounter(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1


def fit_refused(trainer_dir: Path, tokenizer, merge=None, module=None, extra=(), **trainer_kw) -> str:
    """Fit a tiny LoRA model with ``merge``; assert it is refused before any training step; the message."""
    counter = StepCounter()
    callbacks = [counter, *extra] + ([LoRA(r=2), merge] if merge is not None else [])
    trainer_kw.setdefault("logger", False)
    trainer_kw.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=trainer_dir,
        callbacks=callbacks,
        **trainer_kw,
    )
    module = module or LoRALM(len(tokenizer))
    with pytest.raises(OutputPathError) as info:
        trainer.fit(module, lm_data(tokenizer, n=4))
    assert counter.batches == 0 and trainer.global_step == 0
    return str(info.value)


class LoRALM(L.LightningModule):
    """A user's own module (the model built in ``__init__``)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.model = tiny_llama(vocab_size).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def lora_model():
    model = tiny_llama(VOCAB)
    inject_lora(model, r=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


# ---- item 1: a run folder survives ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case", ["foreign files", "is default_root_dir", "contains the log folder", "is the checkpoint folder"]
)
def test_existing_run_folder_survives_a_fit_into_it(tmp_path, tokenizer, case):
    run = tmp_path / "runs" / "exp1"
    before = run_folder(run)
    if case == "foreign files":  # LoRAModule(merged_dir=runs/exp1): refused at set-up, files intact
        module = LoRAModule(model=tiny_llama(len(tokenizer)), r=2, merged_dir=str(run))
        message = fit_refused(tmp_path / "elsewhere", tokenizer, module=module)
        assert "holds files lightning-ft did not write" in message and "overwrite=True" in message
    elif case == "is default_root_dir":  # even overwrite=True never replaces the run's own folder
        message = fit_refused(run, tokenizer, MergeAdapters(merged_dir=run, overwrite=True))
        assert "default_root_dir" in message
    elif case == "contains the log folder":
        logger = CSVLogger(save_dir=run / "logs", name="")
        message = fit_refused(tmp_path, tokenizer, MergeAdapters(merged_dir=run, overwrite=True), logger=logger)
        assert "log folder" in message or "CSVLogger" in message
    else:
        merge = MergeAdapters(merged_dir=run / "checkpoints", overwrite=True)
        ckpt = ModelCheckpoint(dirpath=run / "checkpoints")
        message = fit_refused(tmp_path, tokenizer, merge, enable_checkpointing=True, extra=[ckpt])
        assert "checkpoint folder" in message
    assert str(run) in message
    assert snapshot(run) == before


def test_outputs_never_contain_each_other(tmp_path, tokenizer):
    merged = tmp_path / "m"
    message = fit_refused(tmp_path, tokenizer, MergeAdapters(merged_dir=merged, adapter_dir=merged / "adapter"))
    assert "adapter_dir" in message and "inside merged_dir" in message and str(merged / "adapter") in message
    for merged_dir, adapter_dir, words in [
        (merged, merged, "same path"),
        (merged / "inner", merged, "merged_dir"),
        (tmp_path / "a/../m", merged, "same path"),
    ]:
        with pytest.raises(OutputPathError, match=words):
            check_export_dirs(merged_dir, adapter_dir, overwrite=True)
    assert not merged.exists()


# ---- item 5: mistakes caught at set-up ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["file", "dot", "parent is a file", "parent not writable"])
def test_bad_merged_dir_is_refused_at_setup(tmp_path, tokenizer, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    given, words = {
        "file": ("notes.txt", "is a file, not a folder"),
        "dot": (".", "is the current folder"),
        "parent is a file": ("notes.txt/merged", "is a file, not a folder"),
        "parent not writable": ("locked/merged", "not writable"),
    }[case]
    if case == "parent not writable":
        locked = tmp_path / "locked"
        locked.mkdir()
        real_access = os.access

        # as root a chmod'ed folder stays writable (os.access says so), so deny it as a read-only mount would
        def access(p, mode, **kw):
            return False if Path(p) == locked and mode & os.W_OK else real_access(p, mode, **kw)

        monkeypatch.setattr(os, "access", access)
    message = fit_refused(tmp_path / "run", tokenizer, MergeAdapters(merged_dir=given))
    assert repr(given) in message and words in message
    assert ".tmp" not in message  # names the user's path, never a temporary one
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_read_only_parent_with_real_permissions(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a chmod 555 folder is still writable (os.access), nothing to refuse")
        with pytest.raises(OutputPathError, match="not writable"):
            check_export_dirs(locked / "merged", None)
    finally:
        locked.chmod(0o755)


def test_tilde_expands_in_every_writer(tmp_path, tokenizer, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # a folder literally named "~" would appear here
    quick_trainer(tmp_path / "run", max_steps=1, callbacks=[LoRA(r=2), MergeAdapters(adapter_dir="~/x")]).fit(
        LoRALM(len(tokenizer)), lm_data(tokenizer, n=4)
    )
    assert (home / "x" / "adapter_config.json").is_file()
    save_peft_adapter(lora_model(), "~/peft")
    model = tiny_llama(VOCAB)
    inject_sparse(model, select_sparse(model, density=0.05, criterion="random"))
    save_sparse_delta(model, "~/sparse")
    model = tiny_llama(VOCAB)
    compress_low_rank(model, rank_ratio=0.25)
    save_compressed(model, "~/compressed")
    PredictionWriter("~/preds.jsonl").write_on_epoch_end(None, None, [["a"]], None)
    assert {p.name for p in home.iterdir()} == {"x", "peft", "sparse", "compressed", "preds.jsonl"}
    assert not (tmp_path / "~").exists()


def test_stale_temporary_folder_of_a_killed_write_is_cleaned(tmp_path):
    merged = tmp_path / "merged"
    kill = (
        "import os, sys; from lightning_ft.io import atomic_path\n"
        "cm = atomic_path(sys.argv[1]); tmp = cm.__enter__(); tmp.mkdir()\n"
        "(tmp / 'model.safetensors').write_bytes(os.urandom(1 << 16)); os._exit(9)  # killed mid-write\n"
    )
    subprocess.run([sys.executable, "-c", kill, str(merged)], check=False, cwd=Path(__file__).parents[1])
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert len(stale) == 1 and stale[0].name.endswith(".tmp") and not merged.exists()
    lookalikes = [tmp_path / ".merged.mine.tmp", tmp_path / ".merged.abcdefgh.tmp", tmp_path / ".merged2.abcdefgh.tmp"]
    for p in lookalikes:  # not the library's: another pattern, foreign contents, another destination
        p.mkdir()
        (p / "notes.txt").write_text("mine")
    export_adapters(lora_model(), merged_dir=merged)
    assert not stale[0].exists() and all((p / "notes.txt").exists() for p in lookalikes)
    assert (merged / MARKER).is_file() and (merged / "model.safetensors").is_file()


def test_write_errors_name_the_users_path_not_the_temporary_one(tmp_path):
    with pytest.raises(OSError) as info, atomic_path(tmp_path / "out") as tmp:
        open(tmp / "missing" / "file.bin", "wb")
    assert str(tmp_path / "out") in str(info.value) and ".tmp" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == []


# ---- the same rules for every writer; what overwrite=True does ------------------------------------------------------
def _merged(path, overwrite):
    export_adapters(lora_model(), merged_dir=path, overwrite=overwrite)


def _peft(path, overwrite):
    save_peft_adapter(lora_model(), path, overwrite=overwrite)


def _sparse(path, overwrite):
    model = tiny_llama(VOCAB)
    inject_sparse(model, select_sparse(model, density=0.05, criterion="random"))
    save_sparse_delta(model, path, overwrite=overwrite)


def _compressed(path, overwrite):
    model = tiny_llama(VOCAB)
    compress_low_rank(model, rank_ratio=0.25)
    save_compressed(model, path, overwrite=overwrite)


def _predictions(path, overwrite):
    PredictionWriter(path, overwrite=overwrite).write_on_epoch_end(None, None, [["positive", "negative"]], None)


def _report(path, overwrite):
    csv = path.parent / "metrics.csv"
    if not csv.exists():
        csv.write_text("step,train/loss,val/loss\n0,2.0,\n1,1.5,1.7\n")
    plot_loss_curve(csv, path, overwrite=overwrite)


WRITERS = {"merged": _merged, "peft": _peft, "sparse": _sparse, "compressed": _compressed}
FILE_WRITERS = {"predictions.jsonl": _predictions, "loss.png": _report}


@pytest.mark.parametrize("name", list(WRITERS))
def test_folder_writers_refuse_foreign_files_and_replace_their_own(tmp_path, name):
    write, out = WRITERS[name], tmp_path / name
    write(out, False)
    first = snapshot(out)
    write(out, False)  # re-running into its own previous output replaces it
    assert snapshot(out).keys() == first.keys()
    (out / "notes.txt").write_text("mine")  # the folder now holds a user's file
    with pytest.raises(OutputPathError, match="notes.txt"):
        write(out, False)
    assert (out / "notes.txt").read_text() == "mine"
    write(out, True)  # overwrite=True replaces the folder whole
    assert snapshot(out).keys() == first.keys()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "data.bin").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="did not write"):
        write(tmp_path / "user", False)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", list(FILE_WRITERS))
def test_file_writers_refuse_foreign_files_and_replace_their_own(tmp_path, name):
    write, out = FILE_WRITERS[name], tmp_path / name
    write(out, False)
    write(out, False)  # its own earlier output
    out.write_text("a user's file\n")
    with pytest.raises(OutputPathError, match="exists; lightning-ft did not write it"):
        write(out, False)
    assert out.read_text() == "a user's file\n"
    write(out, True)
    assert out.read_bytes() != b"a user's file\n"
    with pytest.raises(OutputPathError, match="is a folder"):
        write(tmp_path, True)


def test_overwrite_replaces_a_foreign_folder_after_a_fit_and_reruns_replace_own_output(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    merged, adapter = tmp_path / "out" / "merged", tmp_path / "out" / "adapter"
    merged.mkdir(parents=True)
    (merged / "old.txt").write_text("old")
    fit_refused(tmp_path / "run", tokenizer, MergeAdapters(merged_dir=merged, adapter_dir=adapter))
    for _ in range(2):  # overwrite=True, then a re-run into lightning-ft's own output without it
        overwrite = not (merged / MARKER).exists()
        merge = MergeAdapters(merged, adapter, overwrite=overwrite)
        trainer = quick_trainer(tmp_path / "run", max_steps=1, callbacks=[LoRA(r=2), merge])
        trainer.fit(LoRALM(len(tokenizer)), lm_data(tokenizer, n=4))
        assert not (merged / "old.txt").exists() and (merged / MARKER).is_file()
        assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        AutoModelForCausalLM.from_pretrained(merged)
    info = json.loads((merged / MARKER).read_text())
    assert info["kind"] == "model" and "model.safetensors" in info["files"] and "config.json" in info["files"]


def test_a_write_killed_between_its_two_renames_gives_the_old_output_back(tmp_path):
    """Killed after the old folder was parked in the temporary folder and before the new one took its place: the
    next write to the same path moves the old folder back before it cleans the temporary folder."""
    import tempfile

    from lightning_ft.io import remove_stale_temporaries

    out = tmp_path / "merged"
    tmp = Path(tempfile.mkdtemp(prefix=".merged.", suffix=".tmp", dir=tmp_path))
    (tmp / "merged.old").mkdir()
    (tmp / "merged.old" / "model.safetensors").write_text("previous output")
    (tmp / "merged").mkdir()  # the new output, complete or not
    assert remove_stale_temporaries(out) == [tmp]
    assert (out / "model.safetensors").read_text() == "previous output"
    assert not tmp.exists()
