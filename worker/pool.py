"""Send the per-image stage of a cache build to the model worker pool (``build_cache.py --worker-pool``).

Each batch of image ids becomes one ``headscope.build_slice`` task on the ``build`` queue; the
workers write their part files into the run directory, which they must see at the same path
(a shared volume, as in docker-compose.yml). This process waits with a progress bar, then merges.
Finished batches are kept whatever happens, so a failed or interrupted pool build goes on with
``--resume`` (with or without the pool).
"""
from __future__ import annotations

import time

from analysis.errors import HeadScopeError

from .celery_app import make_app

POLL_S = 0.5          # s between looks at the results
PING_EVERY_S = 5.0    # s between "is any worker still there?" pings while slices run
LOST_AFTER_S = 30.0   # s without any worker answering a ping before the build gives up


class PoolError(HeadScopeError):
    """The worker pool cannot be reached or a slice failed; the message says what to do."""


def check_pool(url: str, app=None, timeout: float = 2.0) -> int:
    """Number of workers answering a ping; PoolError when Redis or every worker is away."""
    import redis

    from analysis.serving.transport import WORKER_COMMAND, public_url

    app = app or make_app(url)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except (redis.RedisError, ValueError) as err:
        raise PoolError(f"Redis at {public_url(url)} is not reachable ({err}): start redis-server, or build "
                        "without --worker-pool.") from None
    answers = app.control.ping(timeout=timeout)
    if not answers:
        raise PoolError(f"No model worker answers on {public_url(url)}. Start one with `HEADSCOPE_BROKER_URL="
                        f"{public_url(url)} {WORKER_COMMAND}` (or `headscope worker`, or `docker compose up worker`), "
                        "or build without --worker-pool.")
    return len(answers)


def build_on_pool(config: dict, batches: list[list[int]], broker_url: str, progress: bool = True,
                  workers: int | None = None) -> dict:
    """Run ``batches`` (lists of image ids) of the run described by ``config`` (BuildConfig.to_dict())
    on the workers at ``broker_url``; ``workers``: the answer of an earlier ``check_pool`` (else it
    is asked here). Returns {"images", "skipped", "seconds", "workers"}."""
    from tqdm.auto import tqdm

    app = make_app(broker_url)
    workers = workers or check_pool(broker_url, app)
    pending = {app.send_task("headscope.build_slice", args=[config, batch]): batch for batch in batches}
    stats = {"images": 0, "skipped": 0, "seconds": 0.0, "workers": workers}
    bar = tqdm(total=sum(map(len, batches)), desc=f"images ({workers} worker(s))", unit="img",
               disable=not progress, dynamic_ncols=True)
    last_seen = time.monotonic()
    try:
        while pending:
            for result in [r for r in pending if r.ready()]:
                batch = pending.pop(result)
                answer = result.get(propagate=False)
                result.forget()
                if not isinstance(answer, dict) or not answer.get("ok"):
                    error = answer.get("error") if isinstance(answer, dict) else f"{type(answer).__name__}: {answer}"
                    raise PoolError(f"A worker failed on images {batch[0]}-{batch[-1]}: {error}. Finished batches "
                                    f"are kept; fix the cause, then rerun with --resume.")
                for key in ("images", "skipped", "seconds"):
                    stats[key] += answer["result"][key]
                bar.update(len(batch))
            if pending:
                time.sleep(POLL_S)
                if time.monotonic() - last_seen < PING_EVERY_S:
                    continue
                if app.control.ping(timeout=1.0, limit=1):
                    last_seen = time.monotonic()
                elif time.monotonic() - last_seen > LOST_AFTER_S:
                    raise PoolError(f"No model worker has answered for {LOST_AFTER_S:g} s; "
                                    f"{sum(map(len, pending.values()))} images are unfinished. Finished batches "
                                    "are kept: restart the workers and rerun with --resume.")
    finally:
        bar.close()
        for result in pending:  # do not leave work queued behind a failed or interrupted build
            result.revoke()
    return stats
