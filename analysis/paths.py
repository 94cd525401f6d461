"""Where HeadScope keeps runs, converted models and data sets on disk."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_cache_dir() -> Path:
    """$HEADSCOPE_CACHE (when set and not empty), else ``<repo>/cache`` in a checkout (editable
    install), else ``~/.cache/headscope``: runs, converted models, data sets."""
    env = os.environ.get("HEADSCOPE_CACHE")
    if env:
        return Path(env)
    if (REPO_ROOT / "cache").is_dir() or (REPO_ROOT / "pyproject.toml").is_file():
        return REPO_ROOT / "cache"
    return Path.home() / ".cache" / "headscope"
