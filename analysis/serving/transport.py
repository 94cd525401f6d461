"""Transport for online work: the app calls these; they run in-process or on the worker.

In-process (default, no Redis): ``analysis.serving.service.ModelService`` in this process; so
are the runs whose model lives in this process's memory (``attach``: a notebook's result).
Worker: set ``HEADSCOPE_BROKER_URL`` (e.g. redis://:PASSWORD@localhost:6379/0) and the calls go to
the Celery worker (``worker/``), which runs the same ModelService code.
This module holds the app process's one result cache, keyed on the run's identity (its manifest
fingerprint), which it also sends to the worker: a run replaced in place is never answered from
an older run's results, here or there.
Every failure is raised as OnlineError with a message fit for the page; a worker that is down
is reported within a few seconds (HEADSCOPE_PING_TIMEOUT, default 2 s) however many queries
wait (they share one liveness ping), a slow query after HEADSCOPE_QUERY_TIMEOUT (default 15 s).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from analysis.errors import HeadScopeError, InputError, OnlineError
from analysis.metrics.patch_maps import check_baseline
from analysis.runs.reader import run_fingerprint
from analysis.serving.celery_client import make_celery
from analysis.serving.service import ModelService, ResultCache, decode_array
from analysis.values import strict_int

WORKER_COMMAND = "celery -A worker.celery_app worker --pool=threads --concurrency=4 -Q online,build"
ALIVE_TTL = 3.0  # s a worker ping answer (yes or no) is trusted by new queries
POLL = 1.0       # s between "is the worker still there?" checks while waiting for a result
WAIT = 0.02      # s between looks at a pending result

results = ResultCache(max_items=256)  # this process's online results (in-process and worker alike)
_local_service: ModelService | None = None


def local_service() -> ModelService:
    """The in-process ModelService (computes only: ``results`` caches)."""
    global _local_service
    if _local_service is None:
        _local_service = ModelService()
    return _local_service


def broker_url() -> str | None:
    """The Redis URL of the model worker's broker, or None for in-process computation."""
    return os.environ.get("HEADSCOPE_BROKER_URL") or None


def _timeout(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def public_url(url: str) -> str:
    """The broker URL with its password as ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    return urlunsplit(parts)


def _hint(url: str) -> str:
    return (f"Start it with `HEADSCOPE_BROKER_URL={public_url(url)} {WORKER_COMMAND}` "
            "(or `headscope worker`, or `docker compose up worker`), or unset HEADSCOPE_BROKER_URL to compute "
            "in-process.")


# ---- the worker transport -------------------------------------------------------------------
_apps: dict = {}
_redis: dict = {}
_lock = threading.Lock()


def _celery(url: str):
    with _lock:
        if url not in _apps:
            _apps[url] = make_celery(url, os.environ.get("HEADSCOPE_RESULT_BACKEND") or None)
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
        raise OnlineError(f"The model worker's broker is not reachable: Redis at {public_url(url)} ({err}). "
                          f"Start redis-server, then the worker. {_hint(url)}") from None


class Liveness:
    """Whether a worker answers a ping, with one ping in flight at a time per broker: every
    thread that asks while it flies gets its answer, so a dead worker is reported after one ping
    timeout to any number of waiting queries (and /healthz) instead of one timeout each."""

    def __init__(self):
        self._cond = threading.Condition()
        self._answers: dict[str, tuple[float, bool]] = {}  # url -> (answered at, alive)
        self._flying: set[str] = set()
        self.pings = 0  # pings sent by this process (tests count them)

    def alive(self, url: str, max_age: float) -> bool:
        """A ping answer at most ``max_age`` s old, or the answer of the ping in flight."""
        with self._cond:
            if url in self._flying:
                self._cond.wait_for(lambda: url not in self._flying)
                return self._answers[url][1]
            at, ok = self._answers.get(url, (-1e18, False))
            if time.monotonic() - at <= max_age:
                return ok
            self._flying.add(url)
            self.pings += 1
        try:
            ok = bool(_celery(url).control.ping(timeout=_timeout("HEADSCOPE_PING_TIMEOUT", 2.0), limit=1))
        except Exception:  # the broker went away between checks
            ok = False
        finally:
            with self._cond:
                self._answers[url] = (time.monotonic(), ok)
                self._flying.discard(url)
                self._cond.notify_all()
        return ok


liveness = Liveness()


def _worker_answers(url: str, fresh: bool = False) -> bool:
    """Does a worker answer a ping? (a new query trusts an answer ALIVE_TTL s old; a waiting one,
    ``fresh``, wants one from the last POLL s)"""
    return liveness.alive(url, POLL if fresh else ALIVE_TTL)


def _not_answering(url: str) -> OnlineError:
    return OnlineError(f"The model worker is not answering ({public_url(url)}): it is down, restarting or "
                       f"blocked. {_hint(url)} Precomputed views keep working.")


def _remote(name: str, args: list) -> dict:
    url = broker_url()
    _check_redis(url)
    if not _worker_answers(url):
        raise _not_answering(url)
    limit = _timeout("HEADSCOPE_QUERY_TIMEOUT", 15.0)
    result = None
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
    except OnlineError:  # a timeout or a worker that stopped answering: Redis is up
        _abandon(result, unsubscribe=True)
        raise
    except Exception as err:  # task killed (time limit, worker lost), broker lost mid-query, ...
        _abandon(result, unsubscribe=False)
        raise OnlineError(f"The {name.replace('_', ' ')} query failed on the model worker: "
                          f"{type(err).__name__}: {err}") from None
    try:
        result.forget()  # read once: free Redis now rather than at expiry
    except Exception:
        pass
    if not payload.get("ok"):
        raise OnlineError(payload.get("error") or f"The {name} query failed on the model worker.")
    return payload["result"]


def _abandon(result, unsubscribe: bool) -> None:
    """Stop waiting for a result nobody will read. Celery unsubscribes from it in the result's
    ``__del__``, which may run much later (at exit, say), when Redis is gone, and then retries
    until it gives up with a traceback: unsubscribe now while Redis is up, or not at all."""
    if result is None:
        return
    if unsubscribe:
        try:
            result.backend.remove_pending_result(result)
        except Exception:
            pass
    result.backend = None


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
    return {"mode": "worker", "ok": True, "message": f"Online queries run on the model worker ({public_url(url)})."}


# ---- the public calls -----------------------------------------------------------------------
def attach(run_dir, vit, images) -> None:
    """Serve the run in ``run_dir`` with this process's in-memory model and preprocessed images
    [n, 3, H, W] (a notebook's result, analysis.notebook.save_result): its queries run in this
    process even with a worker configured, since the worker cannot reach the model."""
    local_service().attach(run_dir, vit, images)


def _compute(name: str, run_dir: Path, fingerprint: str | None, args: list) -> dict:
    if broker_url() and not local_service().attached(run_dir):
        return _remote(name, [str(run_dir), *args, fingerprint])
    try:
        return getattr(local_service(), name)(str(run_dir), *args, fingerprint=fingerprint)
    except HeadScopeError as err:
        raise OnlineError(str(err)) from None
    except Exception as err:  # keep the page alive, say what failed
        raise OnlineError(f"The {name.replace('_', ' ')} query failed: {type(err).__name__}: {err}") from None


def _ints(image_id, layer, head) -> list[int]:
    try:
        return [strict_int(image_id), strict_int(layer), strict_int(head)]
    except ValueError:
        raise OnlineError(f"Image, layer and head must be integers, not {image_id!r}, {layer!r}, {head!r}.") from None


def _call(name: str, run_dir, args: list, decode=None) -> dict:
    """Service method ``name`` with JSON-able ``args`` through this process's cache, keyed on where it
    runs, the run's path and its identity; ``decode(result) -> result`` runs once, before caching."""
    run_dir = Path(run_dir).absolute()
    fingerprint = run_fingerprint(run_dir)

    def compute():
        out = _compute(name, run_dir, fingerprint, args)
        return decode(out) if decode else out

    if fingerprint is None:  # no run there: let the service say so (never cached)
        return compute()
    return results.get((name, broker_url(), str(run_dir), fingerprint, json.dumps(args)), compute)


def partial_pruning(run_dir, image_id: int, layer: int, head: int) -> dict:
    """{"rows": 8 dicts (mode, regions, prob, prob_drop, jsd, cls_dist, patch_dist, emb_dist,
    top5_classes, top5_probs), "label": int | None, ...}"""
    return dict(_call("partial_pruning", run_dir, _ints(image_id, layer, head)))


def _heads(image_id, heads) -> tuple[int, list]:
    try:
        return strict_int(image_id), [[strict_int(h[0]), strict_int(h[1]), *([str(h[2])] if len(h) > 2 else [])]
                                      for h in heads]
    except (TypeError, ValueError, IndexError, KeyError):
        raise OnlineError(f"Give the image as an integer and heads as [layer, head(, regions)] pairs, "
                          f"not {image_id!r}, {heads!r}.") from None


def head_set(run_dir, image_id: int, heads) -> dict:
    """One image with every head of ``heads`` ([(layer, head(, regions)), ...], 1-64) pruned at once:
    {"heads", "prob", "prob_drop", "jsd", "emb_dist", "top5_classes", "top5_probs", "label", ...}"""
    return dict(_call("head_set", run_dir, list(_heads(image_id, heads))))


def pair_interactions(run_dir, image_id: int, heads, metric: str = "prob_drop") -> dict:
    """SPEC pair interactions of 2-16 heads on one image: {"rows": [{a_layer, a_head, b_layer, b_head,
    single_a, single_b, pair, interaction}], "metric", "label", ...}"""
    return dict(_call("pair_interactions", run_dir, [*_heads(image_id, heads), str(metric)]))


def attention(run_dir, image_id: int, layer: int, head: int) -> dict:
    """{"attention": np.ndarray [N, N] float16, "num_prefix_tokens", "grid", "patch_size", "img_size"}"""
    return dict(_call("attention", run_dir, _ints(image_id, layer, head),  # a copy: callers may change it
                      decode=lambda out: {**out, "attention": decode_array(out["attention"])}))


def _image_id(image_id) -> list[int]:
    try:
        return [strict_int(image_id)]
    except ValueError:
        raise OnlineError(f"The image must be an integer id, not {image_id!r}.") from None


def _baseline(baseline) -> str:
    try:
        return check_baseline(baseline)
    except InputError as err:
        raise OnlineError(str(err)) from None


def patch_maps(run_dir, image_id: int, baseline: str = "mean") -> dict:
    """The image's patch maps (SPEC "Patch attribution"; occlusion filled with ``baseline``, one of
    OCCLUSION_BASELINES): {"maps": {name: [[gh x gw]]}, "units", "agreement": {name: {name: Spearman}},
    "alignment": [[L x H]] (with occlusion), "target", "label", "precomputed", "occlusion_precomputed",
    "baseline", "grid", "patch_size", "img_size", "num_prefix_tokens"}; None = NaN."""
    return dict(_call("patch_maps", run_dir, [*_image_id(image_id), _baseline(baseline)]))


def deletion_curves(run_dir, image_id: int, baseline: str = "mean") -> dict:
    """Deletion curves of the image's maps (occlusion's with ``baseline``): {"metric": "prob" |
    "emb_dist", "n": [...], "curves": {map: [value per n]}} (n = 0 is the unpruned output)."""
    return dict(_call("deletion_curves", run_dir, [*_image_id(image_id), _baseline(baseline)]))


# ---- circuits and attention sinks (SPEC "Beyond the paper (v3)") ----------------------------
def circuit(run_dir, image_id: int) -> dict:
    """One image's direct effects and (classifiers) APPROXIMATE edge values by edge attribution
    patching: {"direct_name", "direct": [[L x H]], "direct_stored", "eap": {"q"|"k"|"v": [L][H][L][H]
    (receiver b, sender a)} | None, "label", "classifier"}; None = NaN."""
    return dict(_call("circuit", run_dir, _image_id(image_id)))


def circuit_exact(run_dir, image_id: int, edges, via: str = "qkv") -> dict:
    """Exact path values of the edges [[a_layer, a_head, b_layer, b_head], ...] (1-64) of one image
    with ``via`` in q, k, v, qkv: {"name": "path_logit" | "path_emb", "via", "rows": [[a_l, a_h, b_l, b_h,
    value], ...]}."""
    try:
        edges = sorted({tuple(strict_int(v) for v in e) for e in edges})
        if any(len(e) != 4 for e in edges):
            raise ValueError
    except (TypeError, ValueError):
        raise OnlineError(f"Give edges as [a_layer, a_head, b_layer, b_head] integers, not {edges!r}.") from None
    return dict(_call("circuit_exact", run_dir, [*_image_id(image_id), [list(e) for e in edges], str(via)]))


def sinks(run_dir, image_id: int, factor: float | None = None) -> dict:
    """One image's token norms [L + 1][N] (prefix tokens first) with prefix_share, high_norm_share
    [L][H] and high_norm_count [L] for the high-norm factor ``factor`` (None: the run's)."""
    try:
        factor = None if factor is None else float(factor)
    except (TypeError, ValueError):
        raise OnlineError(f"The high-norm factor must be a number, not {factor!r}.") from None
    return dict(_call("sinks", run_dir, [*_image_id(image_id), factor]))
