"""Transport for online work: the app calls these; they run in-process or on the worker.

In-process (default, no Redis): ``analysis.service.ModelService`` in this process.
Worker: set ``HEADSCOPE_BROKER_URL`` (e.g. redis://localhost:6379/0) and the calls go to the
Celery worker (``worker/``), which runs the same ModelService code.
Every failure is raised as OnlineError with a message fit for the page; a worker that is down
is reported within a few seconds (HEADSCOPE_PING_TIMEOUT, default 2 s), a slow query after
HEADSCOPE_QUERY_TIMEOUT (default 15 s).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from analysis.errors import HeadScopeError
from analysis.serving.service import ModelService, decode_array

WORKER_COMMAND = "celery -A worker.celery_app worker --pool=threads --concurrency=4 -Q online,build"
ALIVE_TTL = 3.0  # s a worker ping answer (yes or no) is trusted
POLL = 2.0       # s between "is the worker still there?" checks while waiting for a result
WAIT = 0.02      # s between looks at a pending result


class OnlineError(Exception):
    """An online query that failed; str(err) says why and what to do."""


_local_service: ModelService | None = None


def _service() -> ModelService:
    global _local_service
    if _local_service is None:
        _local_service = ModelService()
    return _local_service


def broker_url() -> str | None:
    """The Redis URL of the model worker's broker, or None for in-process computation."""
    return os.environ.get("HEADSCOPE_BROKER_URL") or None


def _timeout(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def _public(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    return urlunsplit(parts)


def _hint(url: str) -> str:
    return (f"Start it with `HEADSCOPE_BROKER_URL={_public(url)} {WORKER_COMMAND}` "
            "(or `docker compose up worker`), or unset HEADSCOPE_BROKER_URL to compute in-process.")


# ---- the worker transport -------------------------------------------------------------------
_apps: dict = {}
_redis: dict = {}
_alive: dict[str, tuple[float, bool]] = {}  # url -> (checked at, answered)
_lock = threading.Lock()
_ping_lock = threading.Lock()


def _celery(url: str):
    with _lock:
        if url not in _apps:
            from worker.celery_app import make_app

            _apps[url] = make_app(url, os.environ.get("HEADSCOPE_RESULT_BACKEND") or None)
        return _apps[url]


def _check_redis(url: str) -> None:
    """Fail within seconds when Redis itself is away (Celery would retry for long)."""
    import redis

    t = _timeout("HEADSCOPE_PING_TIMEOUT", 2.0)
    try:
        with _lock:
            if url not in _redis:
                _redis[url] = redis.Redis.from_url(url, socket_connect_timeout=t, socket_timeout=t)
            client = _redis[url]
        client.ping()
    except (redis.RedisError, ValueError) as err:
        raise OnlineError(f"The model worker's broker is not reachable: Redis at {_public(url)} ({err}). "
                          f"Start redis-server, then the worker. {_hint(url)}") from None


def _worker_answers(url: str, fresh: bool = False) -> bool:
    """Does a worker answer a ping? (answers are reused for ALIVE_TTL s unless ``fresh``)"""
    with _ping_lock:  # one ping at a time per process; the others reuse its answer
        checked, ok = _alive.get(url, (-1e9, False))
        if fresh or time.monotonic() - checked > ALIVE_TTL:
            try:
                ok = bool(_celery(url).control.ping(timeout=_timeout("HEADSCOPE_PING_TIMEOUT", 2.0), limit=1))
            except Exception:  # the broker went away between checks
                ok = False
            _alive[url] = (time.monotonic(), ok)
        return ok


def _not_answering(url: str) -> OnlineError:
    return OnlineError(f"The model worker is not answering ({_public(url)}): it is down, restarting or "
                       f"blocked. {_hint(url)} Precomputed views keep working.")


def _remote(name: str, args: list) -> dict:
    url = broker_url()
    _check_redis(url)
    if not _worker_answers(url):
        raise _not_answering(url)
    limit = _timeout("HEADSCOPE_QUERY_TIMEOUT", 15.0)
    try:
        result = _celery(url).send_task(f"headscope.{name}", args=args, expires=limit)
        # Poll the result's state (one Redis GET each): result.get(timeout=...) can overrun its timeout.
        start = time.monotonic()
        next_ping = start + POLL
        while not result.ready():
            now = time.monotonic()
            if now - start >= limit:
                raise OnlineError(f"The model worker did not finish the {name.replace('_', ' ')} query "
                                  f"within {limit:g} s: it is busy, loading the model or was restarted. "
                                  "Try again in a moment (the worker keeps the result).")
            if now >= next_ping:
                if not _worker_answers(url, fresh=True):
                    raise _not_answering(url)
                next_ping = now + POLL
            time.sleep(WAIT)
        payload = result.get(timeout=POLL)
    except OnlineError:
        raise
    except Exception as err:  # task killed (time limit, worker lost), broker lost mid-query, ...
        raise OnlineError(f"The {name.replace('_', ' ')} query failed on the model worker: "
                          f"{type(err).__name__}: {err}") from None
    try:
        result.forget()  # read once: free Redis now rather than at expiry
    except Exception:
        pass
    if not payload.get("ok"):
        raise OnlineError(payload.get("error") or f"The {name} query failed on the model worker.")
    return payload["result"]


def status() -> dict:
    """Where online queries run and whether they can run now: {"mode", "ok", "message"}.
    Takes at most a few seconds (answers are reused for ALIVE_TTL s): fine to poll every few seconds."""
    url = broker_url()
    if not url:
        return {"mode": "in-process", "ok": True, "message": "Online queries run in the app's process."}
    try:
        _check_redis(url)
        if not _worker_answers(url):
            raise _not_answering(url)
    except OnlineError as err:
        return {"mode": "worker", "ok": False, "message": str(err)}
    return {"mode": "worker", "ok": True, "message": f"Online queries run on the model worker ({_public(url)})."}


# ---- the public calls -----------------------------------------------------------------------
def _call(name: str, run_dir, image_id: int, layer: int, head: int) -> dict:
    try:
        args = [int(image_id), int(layer), int(head)]
    except (TypeError, ValueError):
        raise OnlineError(f"Image, layer and head must be integers, not {image_id!r}, {layer!r}, {head!r}.") from None
    return _compute(name, run_dir, args)


def _compute(name: str, run_dir, args: list) -> dict:
    """ModelService.<name>(run_dir, *args) on the worker or in this process; OnlineError on failure."""
    if broker_url():
        return _remote(name, [str(Path(run_dir).resolve()), *args])
    try:
        return getattr(_service(), name)(str(run_dir), *args)
    except HeadScopeError as err:
        raise OnlineError(str(err)) from None
    except Exception as err:  # keep the page alive, say what failed
        raise OnlineError(f"The {name.replace('_', ' ')} query failed: {type(err).__name__}: {err}") from None


def partial_pruning(run_dir, image_id: int, layer: int, head: int) -> dict:
    """{"rows": 8 dicts (mode, regions, prob, prob_drop, jsd, cls_dist, patch_dist, emb_dist,
    top5_classes, top5_probs), "label": int | None, ...}"""
    return _call("partial_pruning", run_dir, image_id, layer, head)


def attention(run_dir, image_id: int, layer: int, head: int) -> dict:
    """{"attention": np.ndarray [N, N] float16, "num_prefix_tokens", "grid", "patch_size", "img_size"}"""
    out = dict(_call("attention", run_dir, image_id, layer, head))
    out["attention"] = np.asarray(decode_array(out["attention"]))
    return out


def _image_id(image_id) -> int:
    try:
        return int(image_id)
    except (TypeError, ValueError):
        raise OnlineError(f"The image must be an integer id, not {image_id!r}.") from None


def patch_maps(run_dir, image_id: int) -> dict:
    """The image's patch maps (SPEC "Patch attribution"): {"maps": {name: [[gh x gw]]}, "units",
    "agreement": {name: {name: Spearman}}, "alignment": [[L x H]] (with occlusion), "target",
    "label", "precomputed", "grid", "patch_size", "img_size", "num_prefix_tokens"}; None = NaN."""
    return _compute("patch_maps", run_dir, [_image_id(image_id)])


def deletion_curves(run_dir, image_id: int) -> dict:
    """Deletion curves of the image's maps: {"metric": "prob" | "emb_dist", "n": [...],
    "curves": {map: [value per n]}} (n = 0 is the unpruned output)."""
    return _compute("deletion_curves", run_dir, [_image_id(image_id)])
