"""Where adamerge caches what it builds (suites, zero-shot heads, decoded images)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$ADAMERGE_CACHE`` or ``$XDG_CACHE_HOME/adamerge`` (``~/.cache/adamerge``)."""
    env = os.environ.get("ADAMERGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "adamerge"
