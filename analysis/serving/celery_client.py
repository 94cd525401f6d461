"""The Celery configuration HeadScope's web app and model worker share.

The web app (``transport``) sends tasks *by name* (``headscope.<task>``) with a plain Celery client
made here; the worker (``worker/celery_app.py``) makes the same app with its tasks included. So the
serving layer never imports the worker.

Configured from the environment:
  HEADSCOPE_BROKER_URL       redis://host:6379/0 (default redis://localhost:6379/0)
  HEADSCOPE_RESULT_BACKEND   where results go (default: the broker URL)
  HEADSCOPE_TASK_TIME_LIMIT  hard limit in s for an online task (default 300)
"""
from __future__ import annotations

import os

from celery import Celery

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
ONLINE_QUEUE, BUILD_QUEUE = "online", "build"


def make_celery(broker_url: str | None = None, result_backend: str | None = None, include=()) -> Celery:
    """A Celery app for HeadScope's tasks (JSON only; unread results expire after 10 minutes);
    ``include``: the task modules a worker loads (none for a client that sends tasks by name)."""
    broker_url = broker_url or os.environ.get("HEADSCOPE_BROKER_URL") or DEFAULT_BROKER_URL
    backend = result_backend or os.environ.get("HEADSCOPE_RESULT_BACKEND") or broker_url
    celery = Celery("headscope", broker=broker_url, backend=backend, include=list(include))
    task_limit = int(os.environ.get("HEADSCOPE_TASK_TIME_LIMIT", 300))
    celery.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_expires=600,
        task_time_limit=task_limit, task_soft_time_limit=max(1, task_limit - 10),
        task_default_queue=ONLINE_QUEUE,
        task_routes={"headscope.build_slice": {"queue": BUILD_QUEUE}},
        task_track_started=True,
        worker_prefetch_multiplier=1,
        # Fail fast instead of hanging when Redis is away; the app reports it on the page.
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"socket_connect_timeout": 2},
        redis_socket_connect_timeout=2,
        # a lost result store: 3 reconnects (about 2 s), not Celery's 20 (about 20 s per pending result)
        result_backend_transport_options={"retry_policy": {"max_retries": 3, "interval_start": 0,
                                                           "interval_step": 0.5, "interval_max": 1}},
        worker_hijack_root_logger=False,
    )
    return celery
