"""lightning-ft's cache folder (converted GGUF models, downloads of the examples), in one place."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LIGHTNING_FT_CACHE"


def default_cache_dir() -> Path:
    """``$LIGHTNING_FT_CACHE``, else ``~/.cache/lightning_ft`` (``~`` expanded in both)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_ft"
