"""LightningModules: the shared base and one small file per method.

Imported on first use, so the pure-torch ``lightning_ft.modules.objectives`` loads without the modules (the callbacks
use it, and the modules use the callbacks).
"""

from lightning_ft._lazy import lazy_getattr

_EXPORTS = {
    "FineTuneModule": "lightning_ft.modules.base",
    "LoRAModule": "lightning_ft.modules.lora",
    "SFTModule": "lightning_ft.modules.sft",
    "SparseModule": "lightning_ft.modules.sparse",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
