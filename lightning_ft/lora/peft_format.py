"""Read and write LoRA adapters in Hugging Face ``peft``'s folder format (pure torch + safetensors).

A peft LoRA adapter (checked against peft 0.21) is a folder with two files:

- ``adapter_config.json``: ``peft_type: "LORA"``, ``task_type``, ``r``, ``lora_alpha``, ``target_modules``,
  ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``, ``use_dora``, ``fan_in_fan_out`` (GPT-2's ``Conv1D``),
  ``bias``, ``modules_to_save``, ``lora_dropout``, ``init_lora_weights``.
- ``adapter_model.safetensors``, keys prefixed ``base_model.model.``: ``<layer>.lora_A.weight`` (r, in),
  ``<layer>.lora_B.weight`` (out, r), ``<layer>.lora_magnitude_vector`` (out,) for DoRA (older peft added
  ``.weight``), ``<module>.<param>`` for each of ``modules_to_save``, and trained biases (``<layer>.base_layer.bias``
  for adapted layers, ``<module>.bias`` elsewhere).

peft selects layers with its own rules: ``target_modules`` as a list matches a full name or a ``.suffix``, as a
string ``re.fullmatch``; ``rank_pattern`` / ``alpha_pattern`` keys match ``re.match(r"(.*\\.)?(key)$")``;
``modules_to_save`` match ``str.endswith`` and are never adapted. ``_peft_layers`` reproduces these rules, so an
export is checked to select exactly our layers with exactly our ranks, and an import selects exactly peft's.

PiSSA: ``init="pissa"`` moves the top singular triplets out of the base weights, so an exported PiSSA adapter is
only correct on top of that residual base (save the base too); on the original base it adds the top singular part
twice. The config says ``init_lora_weights: true`` so that peft never re-runs an initialisation on load.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_ft.file_checks import CorruptFileError, check_safetensors, read_json_file
from lightning_ft.io import SIGNATURE, atomic_path, check_output, is_own_adapter_folder
from lightning_ft.lora.inject import METHOD, inject_lora, lora_bias, lora_layers, lora_modules_to_save
from lightning_ft.lora.layer import LoRALinear
from lightning_ft.modeling import is_linear, set_submodule, unmark
from lightning_ft.targets import select_modules

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
TASK_TYPES = {  # class-name suffix -> peft task_type
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
}
HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}
UNSUPPORTED = (
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "lora_bias",
    "use_qalora",
    "use_bdlora",
)


# ---- peft's matching rules -------------------------------------------------------------------------------------
def _in_list(name: str, keys: list[str]) -> bool:
    return name in keys or any(name.endswith(f".{k}") for k in keys)


def _pattern(patterns: dict | None, name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_layers(config: dict, names: list[str]) -> dict[str, tuple[int, float]]:
    """``{module name: (r, alpha)}`` of the modules peft adapts under ``config``, among ``names``."""
    targets, exclude, saved = config["target_modules"], config.get("exclude_modules"), config.get("modules_to_save")

    def adapted(n: str) -> bool:
        if exclude and (re.fullmatch(exclude, n) if isinstance(exclude, str) else _in_list(n, exclude)):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in saved or []):
            return False
        return bool(re.fullmatch(targets, n)) if isinstance(targets, str) else _in_list(n, targets)

    r, alpha = config["r"], config["lora_alpha"]
    return {
        n: (_pattern(config.get("rank_pattern"), n, r), _pattern(config.get("alpha_pattern"), n, alpha))
        for n in names
        if adapted(n)
    }


def _peft_modules_to_save(names: list[str], keys: list[str] | None) -> list[str]:
    found = [n for n in names if any(n.endswith(k) for k in keys or [])]
    return [n for n in found if not any(n.startswith(f + ".") for f in found)]


def _exact_key(name: str, others: list[str]) -> str:
    """``name`` as a pattern key, anchored where it would also match another layer's name."""
    clash = any(re.match(rf"(.*\.)?({name})$", o) for o in others if o != name)
    return "^" + re.escape(name) if clash else name


def _exact_regex(names) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


# ---- which tensors go where ------------------------------------------------------------------------------------
def _adapter_tensors(model: nn.Module, layers: dict[str, LoRALinear], saved: list[str], bias: str) -> dict[str, Tensor]:
    """``{file key: live tensor of model}`` for everything an adapter file holds."""
    out: dict[str, Tensor] = {}
    for name, layer in layers.items():
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if layer.use_dora:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude
    for name in saved:
        for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
            out[f"{PREFIX}{name}.{key}"] = t
    lora_biases = {f"{n}.base_layer.bias" for n in layers}
    inside_saved = tuple(f"{n}." for n in saved)
    for pname, p in model.named_parameters():
        if pname.split(".")[-1] == "bias" and not pname.startswith(inside_saved):
            if bias == "all" or (bias == "lora_only" and pname in lora_biases):
                out[PREFIX + pname] = p
    return out


def _infer_bias(model: nn.Module, layers: dict[str, LoRALinear], saved: list[str]) -> str:
    lora_biases = {f"{n}.base_layer.bias" for n in layers}
    inside_saved = tuple(f"{n}." for n in saved)
    trained = {
        n
        for n, p in model.named_parameters()
        if n.split(".")[-1] == "bias" and p.requires_grad and not n.startswith(inside_saved)
    }
    return "all" if trained - lora_biases else "lora_only" if trained else "none"


def base_model_name(model: nn.Module) -> str:
    """What ``adapter_config.json`` records as ``base_model_name_or_path`` when the caller names no base.

    The model's ``name_or_path``: ``lightning_ft.models.load_model`` sets it to the model's public name (the hub id
    behind a packaged model, else the path or id the user gave; never a cache path). A model built from a config
    has none; it gets ``"<ClassName built from a config>"``: honest, never a hub id (``<`` cannot be in one, so
    nothing looks it up on the hub) and refused with an explanation by ``lightning_ft.models.load_model``.
    """
    name = getattr(model, "name_or_path", None)
    return str(name) if name else f"<{type(model).__name__} built from a config>"


# ---- save ------------------------------------------------------------------------------------------------------
def save_peft_adapter(
    model: nn.Module,
    path: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    bias: str | None = None,
    state_dict: dict[str, Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of ``model`` (after ``inject_lora``) as a peft adapter folder, atomically.

    ``PeftModel.from_pretrained(base, path)`` on the same base weights reproduces the model's outputs.
    ``base_model_name_or_path`` defaults to :func:`base_model_name` (the public name, never a cache path).
    ``task_type`` defaults from the class name (``...ForCausalLM`` -> ``"CAUSAL_LM"``, ...); for classification and
    question answering peft always loads the head (``classifier`` / ``score`` / ``qa_outputs``), so its current
    weights are written as a module to save even when it was not trained. ``bias`` defaults to the mode
    ``inject_lora`` recorded (``lightning_ft.lora.inject.lora_bias``), else to what the model trains (``"all"``,
    ``"lora_only"`` or ``"none"``, read from ``requires_grad``). ``state_dict``: the tensors to write, under
    ``model.state_dict()``'s keys, instead of the model's own (full tensors gathered from a sharded model).

    ``path`` (``~`` expanded) is checked by ``lightning_ft.io.check_output``: an existing folder is replaced only
    when it is empty or an adapter lightning-ft wrote (peft or sparse delta), or with ``overwrite=True``.
    """
    path = check_output(path, "adapter_dir", is_own=is_own_adapter_folder, overwrite=overwrite)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save (inject_lora first)")
    names = [n for n, _ in model.named_modules() if n and n.rpartition(".")[0] not in layers]  # without wrappers
    task_type = task_type or next((t for s, t in TASK_TYPES.items() if type(model).__name__.endswith(s)), None)
    saved = lora_modules_to_save(model)
    heads = _peft_modules_to_save(names, HEADS.get(task_type))  # peft wraps these anyway and needs their weights
    saved += [h for h in heads if not any(h == s or h.startswith(s + ".") for s in saved)]
    recorded = lora_bias(model)  # what inject_lora marked; a model changed by hand: what it trains
    bias = bias or (recorded if recorded != "none" else _infer_bias(model, layers, saved))
    first = next(iter(layers.values()))
    settings = {n: layer.adapter_config() for n, layer in layers.items()}  # each layer's own (adapter protocol)
    wanted = {n: (c["r"], c["alpha"]) for n, c in settings.items()}
    r = Counter(v[0] for v in wanted.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in wanted.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or base_model_name(model),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": getattr(first.dropout, "p", 0.0),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "rank_pattern": {_exact_key(n, list(layers)): v[0] for n, v in wanted.items() if v[0] != r},
        "alpha_pattern": {_exact_key(n, list(layers)): v[1] for n, v in wanted.items() if v[1] != alpha},
        "use_rslora": settings[next(iter(layers))]["use_rslora"],
        "use_dora": settings[next(iter(layers))]["use_dora"],
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": bias,
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if _peft_layers(config, names).keys() != wanted.keys():  # suffixes select more: name the layers exactly
        config["target_modules"] = _exact_regex(layers)
    if _peft_layers(config, names) != wanted:
        raise RuntimeError(f"cannot express these adapters as a peft config: {config}")
    live = _adapter_tensors(model, layers, saved, bias)
    if state_dict is not None:
        key_of = {id(t): key for key, t in model.state_dict(keep_vars=True).items()}
        live = {k: state_dict[key_of[id(t)]] for k, t in live.items()}
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in live.items()}
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", SIGNATURE: "peft_adapter"})
    return Path(path)


# ---- load ------------------------------------------------------------------------------------------------------
def load_peft_adapter(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Inject LoRA into a plain ``model`` as ``path``'s ``adapter_config.json`` says and load its weights.

    Reads folders written by ``save_peft_adapter`` and by ``PeftModel.save_pretrained``. With ``trainable=False``
    (peft's default) everything is frozen; with ``True`` the adapters (and ``modules_to_save``, trained biases) train.
    Raises ``ValueError`` naming the tensor and both shapes when the adapter was made for another base model, and
    ``FileNotFoundError`` / ``lightning_ft.file_checks.CorruptFileError`` naming the file when a file of the folder is
    missing, cut short or garbled.
    """
    path = Path(path).expanduser()
    config = _read_adapter_config(path)
    if unsupported := [k for k in UNSUPPORTED if config.get(k)]:
        raise NotImplementedError(f"{path}: peft options {unsupported} are not supported")
    if lora_layers(model):
        raise RuntimeError("the model already has LoRA adapters; load an adapter into a plain model")
    names = [n for n, _ in model.named_modules() if n]
    config["modules_to_save"] = (config.get("modules_to_save") or []) + HEADS.get(config.get("task_type"), [])
    if config["target_modules"] == "all-linear":
        config["target_modules"] = select_modules(model, "all-linear")
    wanted = _peft_layers(config, names)
    if not wanted:
        raise ValueError(
            f"adapter target_modules {config['target_modules']!r} match no module of {type(model).__name__}"
        )
    if not_linear := [n for n in wanted if not is_linear(model.get_submodule(n))]:
        raise NotImplementedError(f"LoRA of non-linear modules is not supported: {not_linear[:5]}")
    saved = _peft_modules_to_save(names, config.get("modules_to_save"))
    bias = config.get("bias", "none")
    state = {
        re.sub(r"\.lora_magnitude_vector\.weight$", ".lora_magnitude_vector", k): v
        for k, v in _read_adapter_weights(path).items()
    }
    wrapper_keys = tuple(f"{PREFIX}{n}.{part}." for n in saved for part in ("original_module", "modules_to_save"))
    state = {k: v for k, v in state.items() if not k.startswith(wrapper_keys)}  # peft's bias="all" copies
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inject_lora(
        model,
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout") or 0.0,
        target_modules=_exact_regex(wanted),
        rank_pattern={f"^{re.escape(n)}$": v[0] for n, v in wanted.items()},
        alpha_pattern={f"^{re.escape(n)}$": v[1] for n, v in wanted.items()},
        modules_to_save=saved,
        bias=bias,
        use_rslora=config.get("use_rslora", False),
        use_dora=config.get("use_dora", False),
    )
    try:
        _copy_into(_adapter_tensors(model, lora_layers(model), saved, bias), state, path)
    except Exception:
        _remove_adapters(model, flags)
        raise
    if not trainable:
        model.requires_grad_(False)
    return model


_REEXPORT = (
    "Export the adapter again (save_peft_adapter, PeftModel.save_pretrained, MergeAdapters(adapter_dir=...)) or "
    "copy the whole folder again."
)


def _read_adapter_config(path: Path) -> dict:
    """``adapter_config.json`` of the adapter folder ``path``, checked: errors name the file and what to do."""
    if not path.exists():
        raise FileNotFoundError(f"adapter folder not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; pass the adapter folder (with {CONFIG_NAME}, {WEIGHTS_NAME})")
    if not (path / WEIGHTS_NAME).is_file():
        old = (path / "adapter_model.bin").is_file()
        hint = " It holds adapter_model.bin: save it with safe_serialization=True." if old else ""
        what = f"no {WEIGHTS_NAME} in {path} (only peft's safetensors format is read)."
        raise FileNotFoundError(f"{what}{hint} {_REEXPORT}")
    config = read_json_file(path / CONFIG_NAME, "peft adapter config", _REEXPORT)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} holds a {config.get('peft_type')!r} adapter; only LORA is supported")
    if missing := [k for k in ("r", "lora_alpha", "target_modules") if config.get(k) is None]:
        raise CorruptFileError(f"{path / CONFIG_NAME} lacks {missing}, which a LoRA adapter config needs. {_REEXPORT}")
    return config


def _read_adapter_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of ``path``'s ``adapter_model.safetensors``; a damaged file is named, with what to do."""
    file = path / WEIGHTS_NAME
    check_safetensors(file, _REEXPORT)
    try:
        return load_file(file)
    except Exception as err:  # safetensors' own error for what the header check cannot see
        raise CorruptFileError(f"{file} cannot be read ({err}). {_REEXPORT}") from err


def _copy_into(targets: dict[str, Tensor], state: dict[str, Tensor], path: Path) -> None:
    missing, unexpected = sorted(targets.keys() - state.keys()), sorted(state.keys() - targets.keys())
    if missing or unexpected:
        raise ValueError(
            f"the adapter in {path} does not fit this model: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}"
        )
    for key, t in targets.items():
        if state[key].shape != t.shape:
            raise ValueError(
                f"layer {key.removeprefix(PREFIX)}: shape {tuple(state[key].shape)} in the adapter but "
                f"{tuple(t.shape)} in the model; was the adapter made for another base model?"
            )
    with torch.no_grad():
        for key, t in targets.items():
            t.copy_(state[key])


def _remove_adapters(model: nn.Module, flags: dict[str, bool]) -> None:
    """Undo a failed load: put the plain layers back and restore ``requires_grad``."""
    for name, layer in lora_layers(model).items():
        set_submodule(model, name, layer.base_layer)
    unmark(model, METHOD)
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
