"""Where the app finds its runs: the cache directory and the run to open first (set by create_app)."""
from __future__ import annotations

import re
from pathlib import Path

from analysis.runs import store

_settings = {"cache_dir": None, "run": None}
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_NAME = 128  # characters in a run name (file systems allow 255 bytes)


def configure(cache_dir=None, run=None) -> None:
    _settings["cache_dir"] = Path(cache_dir) if cache_dir else None
    _settings["run"] = run


def cache_dir() -> Path:
    """--cache-dir, else $HEADSCOPE_CACHE, else <repo>/cache."""
    return _settings["cache_dir"] or store.default_cache_dir()


def valid_name(name) -> bool:
    return name_problem(name) is None


def name_problem(name) -> str | None:
    """Why ``name`` cannot be a run name (None when it can): only letters, digits and ._- , at most
    MAX_NAME characters, not . or .. (so it never leaves the cache directory)."""
    if not isinstance(name, str) or not name:
        return "A run name is required."
    if len(name) > MAX_NAME:
        return f"Run name too long ({len(name)} characters; at most {MAX_NAME})."
    if not _NAME.fullmatch(name) or name in (".", ".."):
        return f"{name!r} is not a run name: use letters, digits, '.', '_' and '-' only."
    return None


def run_dir(name: str) -> Path:
    """The directory of run ``name`` under the cache dir (names with path separators are refused)."""
    if not valid_name(name):
        raise ValueError(f"'{name}' is not a run name")
    return cache_dir() / name


def default_run() -> str | None:
    """--run, else 'default' when it opens, else the first run that opens, else the first run."""
    if _settings["run"]:
        return _settings["run"]
    runs = store.list_runs(cache_dir())
    ok = [r["name"] for r in runs if not r["error"]]
    if "default" in ok:
        return "default"
    if ok:
        return ok[0]
    return runs[0]["name"] if runs else None
