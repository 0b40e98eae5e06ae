"""A one-shot ``configure_model`` wrapper that slots in *underneath* a pending ``ModelSurgery`` wrapper.

``LowRankCompression`` and ``QuantizeBase`` change the base model before LoRA / sparse injection, whatever the order
in ``callbacks``. Their ``setup`` calls ``install_under``: when another callback set up earlier and its wrapper is
still pending (its ``_patched = (module, previous configure_model, ...)``), the new wrapper becomes that callback's
``previous`` (so it runs first); otherwise it becomes the module's ``configure_model`` instance attribute. The
wrapper removes itself (``uninstall``) before doing anything, which also hands whoever points at it its own
``previous``. The callback keeps ``_patched = (module, previous, wrapper, trainer)`` while the wrapper is pending.
See ``lightning_ft.callbacks.surgery`` for why the wrapper (and not ``setup``) does the work.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning as L


def patch_owner(callback: Any, module: L.LightningModule) -> bool:
    """True when ``callback`` holds a pending configure_model wrapper for ``module`` (``_patched = (module, prev)``)."""
    patched = getattr(callback, "_patched", None)
    return isinstance(patched, tuple) and len(patched) >= 2 and patched[0] is module


def install_under(
    callback: Any,
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    then: Callable[[], None],
    around: Callable[[], AbstractContextManager] = nullcontext,
) -> None:
    """Install the one-shot wrapper: it uninstalls itself, runs the module's ``configure_model`` inside ``around()``
    (``QuantizeBase``: on the meta device), then ``then()``."""
    uninstall(callback)

    def configure_model() -> None:  # no functools.wraps, as in the LoRA callback
        uninstall(callback)
        with around():
            pl_module.configure_model()
        then()

    hosts = [cb for cb in trainer.callbacks if cb is not callback and patch_owner(cb, pl_module)]
    if hosts:  # e.g. LoRA listed first already wrapped configure_model: go underneath its (innermost) wrapper
        host = hosts[0]
        previous = host._patched[1]
        host._patched = (pl_module, configure_model, *host._patched[2:])
    else:
        previous = pl_module.__dict__.get("configure_model")
        pl_module.configure_model = configure_model
    callback._patched = (pl_module, previous, configure_model, trainer)


def uninstall(callback: Any) -> None:
    """Take the wrapper out of the chain: whoever points at it (the module, another callback) gets its previous."""
    if callback._patched is None:
        return
    module, previous, wrapper, trainer = callback._patched
    callback._patched = None
    if module.__dict__.get("configure_model") is wrapper:
        if previous is None:
            module.__dict__.pop("configure_model", None)
        else:
            module.configure_model = previous
    for cb in trainer.callbacks:
        if cb is not callback and patch_owner(cb, module) and cb._patched[1] is wrapper:
            cb._patched = (module, previous, *cb._patched[2:])
