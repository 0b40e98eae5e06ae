"""``MethodConfig``: the base of each method's one typed config (``LoRAConfig``, ``SparseConfig``,
``CompressionConfig``), and ``takes_config``, which gives a callback's or module's ``__init__`` the config's fields as
keyword arguments without repeating them (pure Python).

A config is a dataclass: its fields hold the defaults, its class docstring's ``Args:`` section documents each field,
``__post_init__`` validates, and ``to_dict`` / ``from_dict`` (de)serialise it as plain data (checkpoint entries,
``adapter_config.json`` / ``sparse_config.json`` metadata).

LightningCLI (jsonargparse) and ``inspect.signature`` read an ``__init__``'s signature; ``takes_config`` sets
``__init__.__signature__`` to the function's own parameters plus one keyword-only parameter per config field (type
and default from the dataclass) and appends the config's ``Args:`` section to ``__init__.__doc__``, so
``lightning-ft fit --help`` lists ``--model.init_args.r`` and its documentation. The function itself takes
``config`` (a config object) and the fields through ``**kwargs``; ``config_from_kwargs`` separates them.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

C = TypeVar("C", bound="MethodConfig")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass
class MethodConfig:
    """Base class of the method configs (see the module docstring)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (tuples become lists), in declaration order."""
        return {name: _plain(getattr(self, name)) for name in self.field_names()}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], strict: bool = True) -> C:
        """Build from ``to_dict``'s output; unknown keys are an error (``strict``) or ignored."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown and strict:
            raise ValueError(f"unknown {cls.__name__} settings {unknown}; known: {list(cls.field_names())}")
        return cls(**{k: v for k, v in data.items() if k in cls.field_names()})

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_docs(cls) -> str:
        """The ``Args:`` section of the class docstring (one entry per field), without its heading."""
        doc = inspect.cleandoc(cls.__doc__ or "")
        _, found, args = doc.partition("Args:\n")
        return args if found else ""


def config_from_kwargs(cls: type[C], config: C | Mapping[str, Any] | None, kwargs: dict[str, Any]) -> C:
    """``config`` (an object, a mapping or ``None``: the defaults) with the fields found in ``kwargs`` applied;
    those fields are removed from ``kwargs`` (the rest goes on, e.g. to the module's base class)."""
    fields = {k: kwargs.pop(k) for k in cls.field_names() if k in kwargs}
    if config is None:
        return cls(**fields)
    if isinstance(config, Mapping):
        return cls.from_dict({**config, **fields})
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return config.replace(**fields) if fields else config


def check_type(name: str, value: Any, kind: type | Callable[[Any], bool], config_class: type[MethodConfig]) -> None:
    """Refuse a wrong value for one of a callback's own arguments (``kind``: a type, or ``callable``), naming the likely
    mistake: the config given positionally, where it must be ``config=``."""
    ok = value is None or (kind(value) if kind is callable else isinstance(value, kind))
    if not ok:
        hint = f"; give a {config_class.__name__} as config=..." if isinstance(value, config_class) else ""
        raise TypeError(f"{name} got {type(value).__name__} {value!r}{hint}")


def takes_config(cls: type[MethodConfig], kwargs_name: str = "kwargs") -> Callable[[Callable], Callable]:
    """Decorate an ``__init__(self, ..., config=None, ..., **kwargs)``: its signature (``inspect.signature``,
    LightningCLI) shows every field of ``cls`` as a keyword argument; ``config`` stays callable from Python but is left
    out of the signature. A ``**kwargs`` is kept in the signature only when ``kwargs_name`` also carries other
    arguments on (``kwargs_name=None``: it carries config fields only)."""
    hints = typing.get_type_hints(cls)

    def decorate(init: Callable) -> Callable:
        own = [p for p in inspect.signature(init).parameters.values() if p.name != "config"]
        var_kw = [p for p in own if p.kind is inspect.Parameter.VAR_KEYWORD]
        own = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fields = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=hints[f.name],
                default=f.default if f.default is not dataclasses.MISSING else f.default_factory(),
            )
            for f in dataclasses.fields(cls)
        ]
        if any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in own):
            raise TypeError("takes_config: write the function's own arguments as positional-or-keyword ones")
        keep_kw = [p for p in var_kw if p.name == kwargs_name]
        init.__signature__ = inspect.Signature([*own, *fields, *keep_kw])
        docs = cls.field_docs()
        if docs:
            own_doc = inspect.cleandoc(init.__doc__ or "")
            init.__doc__ = f"{own_doc}\n\nArgs:\n{docs}" if "Args:" not in own_doc else f"{own_doc}\n{docs}"
        init.config_class = cls
        return init

    return decorate
