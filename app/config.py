"""Where the app finds its runs: the cache directory and the run to open first (set by create_app)."""
from __future__ import annotations

from pathlib import Path

from analysis.paths import default_cache_dir
from analysis.runs.reader import MAX_RUN_NAME, list_runs, run_name_problem, valid_run_name

_settings = {"cache_dir": None, "run": None}
MAX_NAME = MAX_RUN_NAME


def configure(cache_dir=None, run=None) -> None:
    _settings["cache_dir"] = Path(cache_dir) if cache_dir else None
    _settings["run"] = run


def cache_dir() -> Path:
    """--cache-dir, else $HEADSCOPE_CACHE, else <repo>/cache."""
    return _settings["cache_dir"] or default_cache_dir()


valid_name = valid_run_name
name_problem = run_name_problem


def run_dir(name: str) -> Path:
    """The directory of run ``name`` under the cache dir (names with path separators are refused)."""
    if not valid_name(name):
        raise ValueError(f"'{name}' is not a run name")
    return cache_dir() / name


def default_run() -> str | None:
    """--run, else 'default' when it opens, else the first run that opens, else the first run."""
    if _settings["run"]:
        return _settings["run"]
    runs = list_runs(cache_dir())
    ok = [r["name"] for r in runs if not r["error"]]
    if "default" in ok:
        return "default"
    if ok:
        return ok[0]
    return runs[0]["name"] if runs else None
