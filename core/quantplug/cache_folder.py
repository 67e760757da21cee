"""quantplug's cache folder: the speed figures measured here (``quantplug.speed_store``) and the
plugin descriptor cache (``quantplug.descriptor_cache``) live in it. No torch, no quantplug import."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QUANTPLUG_CACHE_DIR``, else ``$XDG_CACHE_HOME/quantplug``, else ``~/.cache/quantplug``."""
    own = os.environ.get("QUANTPLUG_CACHE_DIR")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "quantplug"
