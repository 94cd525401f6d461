"""Celery tasks of the model worker: thin wrappers over ``analysis.serving.service.ModelService``.

One ModelService per worker process, with the process's one result cache: each model is loaded
once (GPU when present, else CPU; HEADSCOPE_DEVICE overrides) and recent results stay in memory,
keyed on the run's identity. The worker serves and builds only runs directly inside its own cache
directory (HEADSCOPE_CACHE), whatever path a broker message names: Redis is a trust boundary.
Every task returns a payload ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": msg}``;
the app (analysis/serving/transport.py) turns an error payload into an OnlineError for the page.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from analysis.errors import CacheError, HeadScopeError
from analysis.paths import default_cache_dir
from analysis.runs.reader import valid_run_name
from analysis.serving.service import ModelService, ResultCache

from .celery_app import app

log = logging.getLogger(__name__)
service = ModelService(device=os.environ.get("HEADSCOPE_DEVICE") or None, cache=ResultCache(max_items=512))
_build_lock = threading.Lock()  # one build slice at a time per process: each already uses every core


def run_dir_in_cache(run_dir) -> str:
    """``run_dir`` when it names a run directly inside this worker's cache directory, else
    CacheError: the worker never reads or writes elsewhere on a broker message's word."""
    cache = default_cache_dir().resolve()
    path = Path(os.path.normpath(str(run_dir)))
    if not (path.is_absolute() and valid_run_name(path.name) and path.parent.resolve() == cache):
        raise CacheError(f"The model worker serves only runs inside its cache directory {cache}; it was asked "
                         f"for {run_dir}. Give the app and the worker the same HEADSCOPE_CACHE (the same volume "
                         "at the same path), or start the worker with `headscope worker --cache-dir DIR`.")
    return str(path)


def _payload(what: str, fn, *args) -> dict:
    try:
        return {"ok": True, "result": fn(*args)}
    except HeadScopeError as err:  # bad input: unknown run, image or head, stale cache, ...
        return {"ok": False, "error": str(err), "kind": type(err).__name__}
    except Exception as err:  # a bug or an environment problem: log it, keep the worker alive
        log.exception("%s failed", what)
        return {"ok": False, "error": f"The {what} failed on the worker: {type(err).__name__}: {err}",
                "kind": type(err).__name__}


@app.task(name="headscope.partial_pruning")
def partial_pruning(run_dir: str, image_id: int, layer: int, head: int, fingerprint: str | None = None) -> dict:
    """All 8 pruning modes of one head of one image: metrics and top-5. ``fingerprint``: the run's
    identity as the app sees it (a different run at that path is refused)."""
    return _payload("partial pruning query",
                    lambda: service.partial_pruning(run_dir_in_cache(run_dir), image_id, layer, head, fingerprint))


@app.task(name="headscope.head_set")
def head_set(run_dir: str, image_id: int, heads: list, fingerprint: str | None = None) -> dict:
    """One image with a head set pruned at once: metrics and top-5."""
    return _payload("head set query",
                    lambda: service.head_set(run_dir_in_cache(run_dir), image_id, heads, fingerprint))


@app.task(name="headscope.pair_interactions")
def pair_interactions(run_dir: str, image_id: int, heads: list, metric: str, fingerprint: str | None = None) -> dict:
    """Pair interactions of 2-16 heads on one image."""
    return _payload("pair interactions query",
                    lambda: service.pair_interactions(run_dir_in_cache(run_dir), image_id, heads, metric, fingerprint))


@app.task(name="headscope.attention")
def attention(run_dir: str, image_id: int, layer: int, head: int, fingerprint: str | None = None) -> dict:
    """One head's attention matrix for one image (float16, base64) with the token facts."""
    return _payload("attention query",
                    lambda: service.attention(run_dir_in_cache(run_dir), image_id, layer, head, fingerprint))


@app.task(name="headscope.patch_maps")
def patch_maps(run_dir: str, image_id: int, baseline: str = "mean", fingerprint: str | None = None) -> dict:
    """One image's four patch maps (occlusion with ``baseline``), their agreement and the heads'
    alignment (JSON lists)."""
    return _payload("patch maps query",
                    lambda: service.patch_maps(run_dir_in_cache(run_dir), image_id, baseline, fingerprint))


@app.task(name="headscope.deletion_curves")
def deletion_curves(run_dir: str, image_id: int, baseline: str = "mean", fingerprint: str | None = None) -> dict:
    """Deletion curves of one image's patch maps (occlusion with ``baseline``)."""
    return _payload("deletion curves query",
                    lambda: service.deletion_curves(run_dir_in_cache(run_dir), image_id, baseline, fingerprint))


@app.task(name="headscope.circuit")
def circuit(run_dir: str, image_id: int, fingerprint: str | None = None) -> dict:
    """One image's direct effects and APPROXIMATE (edge attribution patching) edge values."""
    return _payload("circuit query", lambda: service.circuit(run_dir_in_cache(run_dir), image_id, fingerprint))


@app.task(name="headscope.circuit_exact")
def circuit_exact(run_dir: str, image_id: int, edges: list, via: str = "qkv", fingerprint: str | None = None) -> dict:
    """Exact path values (path patching) of some edges of one image."""
    return _payload("exact paths query",
                    lambda: service.circuit_exact(run_dir_in_cache(run_dir), image_id, edges, via, fingerprint))


@app.task(name="headscope.sinks")
def sinks(run_dir: str, image_id: int, factor: float | None = None, fingerprint: str | None = None) -> dict:
    """One image's token norms and attention-sink metrics for the high-norm factor ``factor``."""
    return _payload("token norms query",
                    lambda: service.sinks(run_dir_in_cache(run_dir), image_id, factor, fingerprint))


@app.task(name="headscope.build_slice", time_limit=int(os.environ.get("HEADSCOPE_BUILD_TIME_LIMIT", 21600)),
          soft_time_limit=int(os.environ.get("HEADSCOPE_BUILD_TIME_LIMIT", 21600)) - 30)
def build_slice(config: dict, image_indices: list[int]) -> dict:
    """The per-image stage of a cache build for some images (analysis.runs.build.run_image_stage), on
    this worker's device; the part files go to the run directory named in ``config`` (inside the
    worker's cache directory, a shared volume)."""
    def run():
        from analysis.runs.build import run_image_stage

        out = run_dir_in_cache(config.get("out", ""))
        with _build_lock:
            return run_image_stage({**config, "out": out, "device": service.device, "progress": False},
                                   [int(i) for i in image_indices])

    return _payload("cache-build slice", run)
