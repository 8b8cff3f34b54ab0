"""Where data, caches and results live; every location can be set by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "DFML_DATA_ROOT"
CACHE_DIR_ENV = "DFML_CACHE_DIR"


def data_root(explicit: Path | str | None = None) -> Path | None:
    """Root folder holding real datasets (`omniglot/`, `tiny-imagenet-200/`, ...), if configured."""
    if explicit is not None:
        return Path(explicit).expanduser()
    from_env = os.environ.get(DATA_ROOT_ENV)
    return Path(from_env).expanduser() if from_env else None


def cache_dir(explicit: Path | str | None = None) -> Path:
    """Folder for decoded datasets and the generated embedded dataset (safe to delete)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dfml-bench"
