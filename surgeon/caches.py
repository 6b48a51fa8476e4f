"""Where surgeon keeps what it can reuse across processes: ``$SURGEON_CACHE_DIR`` (default
``$XDG_CACHE_HOME/surgeon``, else ``~/.cache/surgeon``), one folder per kind; ``SURGEON_CACHE_DIR=off``
turns every on-disk cache off. Nothing here is an input: a cache entry is only ever a shortcut to what
surgeon would compute anyway, checked before use."""

from __future__ import annotations

import os
from pathlib import Path

OFF = ("off", "0", "none", "false")


def cache_dir(kind: str) -> Path | None:
    """The folder for ``kind`` (not created), or None when caching is off."""
    root = os.environ.get("SURGEON_CACHE_DIR")
    if root is not None and root.strip().lower() in OFF:
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "surgeon")
    return Path(root) / kind
