"""Celery tasks of the model worker: thin wrappers over ``analysis.service.ModelService``.

One ModelService per worker process: each run's model is loaded once (GPU when present, else
CPU; HEADSCOPE_DEVICE overrides) and recent results stay in its in-memory LRU cache.
Every task returns a payload ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": msg}``;
the app (app/online.py) turns an error payload into an OnlineError for the page.
"""
from __future__ import annotations

import logging
import os
import threading

from analysis.errors import HeadScopeError
from analysis.serving.service import ModelService

from .celery_app import app

log = logging.getLogger(__name__)
service = ModelService(device=os.environ.get("HEADSCOPE_DEVICE") or None)
_build_lock = threading.Lock()  # one build slice at a time per process: each already uses every core


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
def partial_pruning(run_dir: str, image_id: int, layer: int, head: int) -> dict:
    """All 8 pruning modes of one head of one image: metrics and top-5."""
    return _payload("partial pruning query", service.partial_pruning, run_dir, image_id, layer, head)


@app.task(name="headscope.attention")
def attention(run_dir: str, image_id: int, layer: int, head: int) -> dict:
    """One head's attention matrix for one image (float16, base64) with the token facts."""
    return _payload("attention query", service.attention, run_dir, image_id, layer, head)


@app.task(name="headscope.patch_maps")
def patch_maps(run_dir: str, image_id: int) -> dict:
    """One image's four patch maps, their agreement and the heads' alignment (JSON lists)."""
    return _payload("patch maps query", service.patch_maps, run_dir, image_id)


@app.task(name="headscope.deletion_curves")
def deletion_curves(run_dir: str, image_id: int) -> dict:
    """Deletion curves of one image's patch maps."""
    return _payload("deletion curves query", service.deletion_curves, run_dir, image_id)


@app.task(name="headscope.build_slice", time_limit=int(os.environ.get("HEADSCOPE_BUILD_TIME_LIMIT", 21600)),
          soft_time_limit=int(os.environ.get("HEADSCOPE_BUILD_TIME_LIMIT", 21600)) - 30)
def build_slice(config: dict, image_indices: list[int]) -> dict:
    """The per-image stage of a cache build for some images (analysis.build.run_image_stage), on this
    worker's device; the part files go to the run directory named in ``config`` (a shared volume)."""
    def run():
        from analysis.runs.build import run_image_stage

        with _build_lock:
            return run_image_stage({**config, "device": service.device, "progress": False},
                                   [int(i) for i in image_indices])

    return _payload("cache-build slice", run)
