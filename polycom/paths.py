"""Where polycom caches what it builds (tokenizers, token shards, compiled CPU kernels)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$POLYCOM_CACHE`` if set, else ``$XDG_CACHE_HOME/polycom``, else ``~/.cache/polycom``."""
    if os.environ.get("POLYCOM_CACHE"):
        return Path(os.environ["POLYCOM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polycom"
