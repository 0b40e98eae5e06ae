"""Model-surgery helpers shared by every method (pure torch + transformers, no Lightning import).

LoRA, sparse fine-tuning and compression all replace linear layers by name, read linear shapes (GPT-2's ``Conv1D``
stores its weight transposed), train some modules in full (``modules_to_save``), find the Hugging Face model(s)
inside a LightningModule, and need input gradients when activation checkpointing runs over a frozen base. Each of
those lives here once, so no method imports another.

The adapter protocol is here too: a layer that a method puts into the model (``LoRALinear``, ``SparseLinear``,
``LowRankLinear``) declares the tensors it trains (``adapter_params()``) and the method it belongs to
(``adapter_method``); merge, export, checkpoint trimming and optimizer grouping ask the layers (``adapter_layers``,
``adapter_param_names``) rather than matching parameter names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

#: batch keys that are inputs of a Hugging Face model (labels left out: the modules compute the loss themselves)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


# ---- replacing modules -------------------------------------------------------------------------------------------
def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---- linear layers -----------------------------------------------------------------------------------------------
def is_linear(module: nn.Module | None) -> bool:
    """``nn.Linear`` or the ``Conv1D`` of GPT-2-style transformers models (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)``; GPT-2's ``Conv1D`` stores its weight as (in, out)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if type(layer).__name__ == "Conv1D":
        in_features, out_features = layer.weight.shape
        return in_features, out_features, True
    raise TypeError(f"expected nn.Linear or transformers' Conv1D, not {type(layer).__name__}")


def linear_weight(layer: nn.Module) -> Tensor:
    """The weight as (out_features, in_features) (a transposed view for GPT-2's ``Conv1D``)."""
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.T


# ---- modules trained in full -------------------------------------------------------------------------------------
def resolve_modules_to_save(model: nn.Module, keys: Sequence[str] | None) -> list[str]:
    """Module names matching ``keys`` (names or suffixes); a module inside another chosen one is covered by it.

    Raises ``ValueError`` naming a key that matches no module."""
    all_names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for key in keys or []:
        hits = [n for n in all_names if n == key or n.endswith("." + key)]
        if not hits:
            raise ValueError(f"modules_to_save: no module named {key!r} in {type(model).__name__}")
        found += hits
    return sorted({n for n in found if not any(n.startswith(f + ".") for f in found)})


def train_modules_in_full(model: nn.Module, keys: Sequence[str] | None) -> list[str]:
    """Unfreeze every module ``resolve_modules_to_save`` finds; return their names."""
    names = resolve_modules_to_save(model, keys)
    for name in names:
        model.get_submodule(name).requires_grad_(True)
    return names


#: attribute a method sets on each module it trains in full (``modules_to_save``) or whose bias it trains: the method
TRAINED_IN_FULL, TRAINED_BIAS = "lightning_ft_trained_in_full", "lightning_ft_trained_bias"


def mark_trained(model: nn.Module, names: Sequence[str], method: str, what: str = TRAINED_IN_FULL) -> None:
    """Record on each named module that ``method`` trains it in full (or, ``what=TRAINED_BIAS``, its bias)."""
    for name in names:
        setattr(model.get_submodule(name), what, method)


def marked_modules(model: nn.Module, method: str | None = None, what: str = TRAINED_IN_FULL) -> list[str]:
    """Names of the modules of ``model`` that ``mark_trained`` marked (for ``method``, when given), outermost only."""
    found = [n for n, m in model.named_modules() if getattr(m, what, None) and method in (None, getattr(m, what))]
    return [n for n in found if not any(n.startswith(f"{f}.") or (not f and n) for f in found)]


def unmark(model: nn.Module, method: str) -> None:
    """Remove ``method``'s ``mark_trained`` records from every module of ``model``."""
    for m in model.modules():
        for what in (TRAINED_IN_FULL, TRAINED_BIAS):
            if m.__dict__.get(what) == method:
                delattr(m, what)


# ---- the adapter protocol ----------------------------------------------------------------------------------------
@runtime_checkable
class Adapter(Protocol):
    """A layer a method injected into a model.

    ``adapter_method``: the method's name (``"lora"``, ``"sparse"``, ``"low_rank"``). ``adapter_params()``: the
    tensors the layer trains, by their names relative to the layer (``{"lora_A": ..., "lora_B": ...}``), what an
    adapter-only checkpoint or export keeps of it. ``adapter_groups()``: optimizer group name per entry of
    ``adapter_params()`` where it differs from the default (LoRA+ puts ``lora_B`` in a group of its own).
    ``adapter_config()``: the layer's own settings (plain data).
    """

    adapter_method: str

    def adapter_params(self) -> dict[str, Tensor]: ...

    def adapter_groups(self) -> dict[str, str]: ...

    def adapter_config(self) -> dict: ...


def adapter_layers(model: nn.Module, method: str | None = None) -> dict[str, nn.Module]:
    """Every adapter layer of ``model`` (of ``method`` only, when given) by its module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, Adapter) and (method is None or m.adapter_method == method)
    }


def adapter_param_names(model: nn.Module, method: str | None = None) -> dict[str, str]:
    """``{full parameter / buffer name: optimizer group}`` of the tensors the adapter layers declare
    (group ``"default"`` unless the layer says otherwise)."""
    out: dict[str, str] = {}
    for name, layer in adapter_layers(model, method).items():
        groups = layer.adapter_groups()
        for part in layer.adapter_params():
            out[f"{name}.{part}" if name else part] = groups.get(part, "default")
    return out


# ---- Hugging Face models inside a module -------------------------------------------------------------------------
def is_hf_model(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.PreTrainedModel`` (FSDP2's ``FSDP<Class>`` subclasses included)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def named_hf_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, model)`` of every Hugging Face model inside ``module`` (itself included) that is not inside another."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if is_hf_model(m) and not any(not n or name.startswith(f"{n}.") for n, _ in found):
            found.append((name, m))
    return found


def hf_models(module: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face models inside ``module``, itself included."""
    return [m for _, m in named_hf_models(module)]


def find_hf_model(module: nn.Module) -> tuple[str, nn.Module]:
    """``(name, model)`` of the first Hugging Face model inside ``module``; ``ValueError`` when there is none."""
    found = named_hf_models(module)
    if not found:
        raise ValueError(
            f"{type(module).__name__} holds no Hugging Face model (transformers.PreTrainedModel); keep the model as "
            "a submodule (e.g. self.model = AutoModelFor...)"
        )
    return found[0]


# ---- activation checkpointing ------------------------------------------------------------------------------------
def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether a Hugging Face model checkpoints activations (transformers >= 5 name, else the older one)."""
    prop = getattr(type(model), "is_activation_checkpointing", None)
    if isinstance(prop, property):
        return bool(prop.fget(model))
    return bool(getattr(model, "is_gradient_checkpointing", False))


def enable_activation_checkpointing(model: nn.Module, input_grads: bool = False) -> None:
    """Hugging Face's non-reentrant activation checkpointing (module names stay unchanged, unlike
    ``checkpoint_wrapper``, so state-dict keys and adapter names do not move). ``input_grads``: also make the input
    embeddings require grad. ``ValueError`` for a model without the switch."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} has no activation checkpointing switch (not a Hugging Face model)")
    if input_grads and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def ensure_input_grads_for_checkpointing(module: nn.Module) -> list[nn.Module]:
    """Make input embeddings require grad in every Hugging Face model of ``module`` that checkpoints activations.

    With a frozen base and reentrant activation checkpointing, no input of a checkpointed block requires grad, so
    the adapters inside get no gradient and backward fails with "element 0 of tensors does not require grad".
    Returns the models it changed.
    """
    changed = []
    for model in hf_models(module):
        hooked = getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None)
        if is_activation_checkpointing(model) and not hooked:
            model.enable_input_require_grads()
            changed.append(model)
    return changed
