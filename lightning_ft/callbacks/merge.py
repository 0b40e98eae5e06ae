"""``MergeAdapters``: at the end of ``fit``, export the LoRA adapter (peft format) or the sparse deltas
(``lightning_ft.sparse.export``: indices and values) and / or the merged model.

The merged folder is a plain Hugging Face model (``save_pretrained``, plus the tokenizer when there is one):
``AutoModelFor*.from_pretrained(merged_dir)`` loads it without lightning-ft. Merging happens in place on every rank
(in float32, cast back to the base dtype), so after ``fit`` the in-memory module holds the merged model with no
adapters and keeps working: ``trainer.validate`` / ``test`` / ``predict`` evaluate the merged model, and the
``LoRA`` callback does not inject again for them. Only global rank 0 writes; every write is atomic.

Safe outputs (``lightning_ft.io.check_output``), checked in ``setup`` (before training) and again before writing:
``~`` is expanded; neither folder may be a file, the current folder (or contain it), inside the other or the same,
or equal to / contain the Trainer's ``default_root_dir``, log folder or checkpoint folder; the parent must be
writable. An existing folder is replaced only when it is empty or holds exactly what lightning-ft wrote there before
(a merged / compressed model for ``merged_dir``, an adapter or sparse delta for ``adapter_dir``), unless
``overwrite=True``, which replaces it whole (once the new folder is completely written).

A quantised base (``QuantizeBase``) is de-quantised to float32 first, the adapters are folded in in float32, and each
merged layer is cast back to the dtype its weight had before quantisation: the merged folder is a full-precision
model, whose logits differ from the quantised model with adapters only by that final cast (see the README).

A sharded model (FSDP2, ``DTensor`` parameters) is gathered instead: every rank takes part in gathering the full
state dict, global rank 0 alone receives it (on the CPU), folds the adapters into it and writes both folders. The
sharded module keeps its adapters, unmerged, so evaluation after ``fit`` runs on the adapters (the same function).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_ft.callbacks.surgery import ModelSurgery
from lightning_ft.io import (
    MODEL_KIND,
    OutputPathError,
    atomic_path,
    check_output,
    is_own_adapter_folder,
    is_own_model_folder,
    mark_output,
    trainer_folders,
    user_path,
)
from lightning_ft.lora import lora_layers, merge_lora, merged_state_dict
from lightning_ft.lora.peft_format import save_peft_adapter
from lightning_ft.modeling import find_hf_model
from lightning_ft.quant import dequantize_base, is_quantized, quantized_layers
from lightning_ft.sparse import merge_sparse, save_sparse_delta, sparse_layers
from lightning_ft.sparse.inject import has_sparse_state
from lightning_ft.strategies.sharding import full_state_dict, is_sharded


def check_export_dirs(
    merged_dir: str | os.PathLike | None,
    adapter_dir: str | os.PathLike | None,
    overwrite: bool = False,
    protected: list[tuple[str, str]] = (),
) -> tuple[Path | None, Path | None]:
    """Check both output folders (``lightning_ft.io.check_output``; ``protected``: the run's own folders) and
    return them with ``~`` expanded. Raises ``OutputPathError`` naming the folder and what to do."""
    merged = adapter = None
    if merged_dir is not None:
        merged = check_output(
            merged_dir,
            "merged_dir",
            is_own=is_own_model_folder,
            overwrite=overwrite,
            others=[("adapter_dir", adapter_dir)],
            protected=protected,
        )
    if adapter_dir is not None:
        adapter = check_output(
            adapter_dir,
            "adapter_dir",
            is_own=is_own_adapter_folder,
            overwrite=overwrite,
            others=[("merged_dir", merged_dir)],
            protected=protected,
        )
    return merged, adapter


@dataclass
class ExportRequest:
    """Where and what ``export_adapters`` writes: folders already checked, ``write=False`` on non-writing ranks."""

    merged_dir: Path | None = None
    adapter_dir: Path | None = None
    base_model_name_or_path: str | None = None
    write: bool = True
    overwrite: bool = False
    metadata: dict[str, Any] | None = None  # what the method's callback records in the adapter folder


def export_adapters(
    module: nn.Module,
    merged_dir: str | os.PathLike | None = None,
    adapter_dir: str | os.PathLike | None = None,
    base_model_name_or_path: str | None = None,
    tokenizer: Any = None,
    write: bool = True,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``module``'s Hugging Face model's adapter to ``adapter_dir`` (peft format; sparse deltas in
    ``lightning_ft.sparse.export``'s format), then merge the adapters / deltas of ``module`` into their base weights
    (in place) and write the merged model to ``merged_dir``.

    ``write=False`` merges without writing (the other ranks of a distributed run). A sharded ``module`` is not
    changed: every rank must call this (it gathers the shards), and the writing rank must be rank 0, the one that
    receives the full tensors. Before writing anything, both folders are checked (``check_export_dirs``;
    ``overwrite`` as in ``MergeAdapters``). ``metadata``: what the method's callback records in the adapter folder
    (``SparseMask``: its selection settings, in ``sparse_config.json``). LoRA: ``export_lora``; sparse deltas:
    ``export_sparse``.
    """
    try:
        prefix, hf_model = find_hf_model(module)
    except ValueError as err:
        raise ValueError(f"{err}; MergeAdapters writes Hugging Face folders") from None
    if not lora_layers(module) and not has_sparse_state(module):
        raise RuntimeError(
            f"{type(module).__name__} has no LoRA adapters or sparse deltas to export (add the LoRA or SparseMask "
            "callback)"
        )
    if write:
        merged_dir, adapter_dir = check_export_dirs(merged_dir, adapter_dir, overwrite)
    outside = [n for n in [*lora_layers(module), *sparse_layers(module)] if prefix and not n.startswith(prefix + ".")]
    if outside:
        rank_zero_warn(f"MergeAdapters: adapters outside the Hugging Face model are merged, not saved: {outside[:3]}")
    request = ExportRequest(merged_dir, adapter_dir, base_model_name_or_path, write, overwrite, metadata)
    export = export_lora if lora_layers(module) else export_sparse
    merged_state = export(module, hf_model, request)
    if merged_dir is not None and write:
        write_merged(hf_model, merged_dir, tokenizer, merged_state)


def export_lora(module: nn.Module, hf_model: nn.Module, request: ExportRequest) -> dict | None:
    """LoRA: write the peft adapter, then merge in place. A sharded model is gathered on rank 0 and left unmerged:
    the merged state dict is returned for ``write_merged``. Sparse layers in the same module are merged too."""
    sharded = is_sharded(module)
    state = full_state_dict(hf_model) if sharded else None
    if sharded and request.write and not state:
        raise RuntimeError("only rank 0 receives the tensors gathered from a sharded model; write from rank 0")
    if request.adapter_dir is not None and request.write:
        save_peft_adapter(
            hf_model,
            request.adapter_dir,
            base_model_name_or_path=request.base_model_name_or_path,
            state_dict=state,
            overwrite=request.overwrite,
        )
        rank_zero_info(f"MergeAdapters: wrote the peft adapter to {request.adapter_dir}")
    if request.merged_dir is None:
        return None
    if sharded:
        # in place: the gathered base weights go as their merged ones come, so rank 0 holds one full copy, not two
        return merged_state_dict(hf_model, state, in_place=True) if request.write else None
    merge_lora_dequantized(module)
    if sparse_layers(module):
        merge_sparse(module)
    return None


def merge_lora_dequantized(module: nn.Module) -> None:
    """``merge_lora(module)``; a quantised base is first de-quantised to float32 and each of its layers cast back to
    its original dtype after the merge (merging into the quantised weights would round the merged weight to 4 / 8
    bits again)."""
    if not is_quantized(module):
        merge_lora(module)
        return
    layers = quantized_layers(module)
    dtypes = {name.removesuffix(".base_layer"): layer.original_dtype for name, layer in layers.items()}
    dequantize_base(module, torch.float32)
    merge_lora(module)
    for name, dtype in dtypes.items():
        module.get_submodule(name).to(dtype)


def export_sparse(module: nn.Module, hf_model: nn.Module, request: ExportRequest) -> None:
    """Sparse deltas (or BitFit's biases): write them (with ``request.metadata``, e.g. the ``SparseMask`` settings),
    then merge in place."""
    if is_sharded(module):
        raise NotImplementedError("exporting sparse deltas of a sharded (FSDP2) model is not supported")
    if request.adapter_dir is not None and request.write:
        save_sparse_delta(
            hf_model,
            request.adapter_dir,
            request.base_model_name_or_path,
            metadata=request.metadata,
            overwrite=request.overwrite,
        )
        rank_zero_info(f"MergeAdapters: wrote the sparse deltas to {request.adapter_dir}")
    if request.merged_dir is not None and sparse_layers(module):
        merge_sparse(module)


def write_merged(hf_model: nn.Module, merged_dir: Path, tokenizer: Any, state_dict: dict | None = None) -> None:
    """``save_pretrained`` (of ``state_dict`` when given) plus the tokenizer into ``merged_dir``, atomically."""
    with atomic_path(merged_dir) as tmp:
        hf_model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        mark_output(tmp, MODEL_KIND)
    what = "model and tokenizer" if tokenizer is not None else "model (no tokenizer found)"
    rank_zero_info(f"MergeAdapters: wrote the merged {what} to {merged_dir}")


def _tokenizer(trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
    """The data module's tokenizer, else the module's, else None."""
    for owner in (trainer.datamodule, pl_module):
        if owner is None:
            continue
        try:
            tok = getattr(owner, "tokenizer", None)
        except Exception as err:  # e.g. a lazy property that cannot load a tokenizer for a model given as an object
            rank_zero_warn(f"MergeAdapters: no tokenizer from {type(owner).__name__}: {err}")
            continue
        if tok is not None and hasattr(tok, "save_pretrained"):
            return tok
    return None


def export_metadata(trainer: L.Trainer) -> dict[str, Any] | None:
    """What the Trainer's method callbacks (``ModelSurgery.export_metadata``) record in an adapter folder."""
    out: dict[str, Any] = {}
    for cb in trainer.callbacks:
        if isinstance(cb, ModelSurgery):
            out.update(cb.export_metadata() or {})
    return out or None


class MergeAdapters(L.Callback):
    """At ``on_fit_end``: write the adapter in peft format (``SparseMask``'s deltas: indices and values, see
    ``lightning_ft.sparse.export``) to ``adapter_dir`` and / or merge the adapters into the model and write it (with
    the tokenizer) to ``merged_dir`` as a plain Hugging Face model.

    ``base_model_name_or_path`` goes into ``adapter_config.json`` (default: the model's ``name_or_path``). After a
    merge the module holds the merged model without adapters (see the module docstring).

    Both folders (``~`` expanded) are checked in ``setup``, before training (see the module docstring): an existing
    folder that holds anything lightning-ft did not write there is refused unless ``overwrite=True``; re-running
    into lightning-ft's own previous output replaces it. ``overwrite=True`` replaces an existing folder whole
    (everything in it is deleted) once the new one is completely written; it never allows a file, the current
    folder, one output inside the other, or a folder that is or contains the run's log / checkpoint folders.
    """

    needs_original_parameters = True  # read by AdapterFSDP1Strategy: FSDP1 flat parameters cannot be exported

    def __init__(
        self,
        merged_dir: str | os.PathLike | None = None,
        adapter_dir: str | os.PathLike | None = None,
        base_model_name_or_path: str | None = None,
        overwrite: bool = False,
    ) -> None:
        if merged_dir is None and adapter_dir is None:
            raise ValueError("MergeAdapters needs `merged_dir`, `adapter_dir` or both")
        self._given = (merged_dir, adapter_dir)  # as the user wrote them, for messages
        self.merged_dir = user_path(merged_dir) if merged_dir is not None else None
        self.adapter_dir = user_path(adapter_dir) if adapter_dir is not None else None
        self.base_model_name_or_path = base_model_name_or_path
        self.overwrite = overwrite

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse unsafe output folders now, before training (global rank 0 checks, every rank raises)."""
        if stage != "fit":
            return
        protected = trainer_folders(trainer)  # on every rank: trainer.log_dir broadcasts
        problem = None
        if trainer.is_global_zero:
            try:
                current = (self.merged_dir, self.adapter_dir)  # the given spelling, unless changed since
                dirs = [g if g is not None and user_path(g) == c else c for g, c in zip(self._given, current)]
                check_export_dirs(*dirs, overwrite=self.overwrite, protected=protected)
            except OutputPathError as err:
                problem = str(err)
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise OutputPathError(f"MergeAdapters: {problem}")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write = trainer.is_global_zero
        export_adapters(
            pl_module,
            self.merged_dir,
            self.adapter_dir,
            self.base_model_name_or_path,
            tokenizer=_tokenizer(trainer, pl_module) if write and self.merged_dir is not None else None,
            write=write,
            overwrite=self.overwrite,
            metadata=export_metadata(trainer),
        )
        trainer.strategy.barrier("MergeAdapters")
