"""The Celery app shared by the model worker and the web app (which only sends tasks by name).

Configured from the environment:
  HEADSCOPE_BROKER_URL       redis://host:6379/0 (default redis://localhost:6379/0)
  HEADSCOPE_RESULT_BACKEND   where results go (default: the broker URL)
  HEADSCOPE_TASK_TIME_LIMIT  hard limit in s for an online task (default 300)
  HEADSCOPE_BUILD_TIME_LIMIT hard limit in s for a cache-build slice (default 21600)

Start a worker:  celery -A worker.celery_app worker --pool=threads --concurrency=4 -Q online,build
"""
from __future__ import annotations

from celery import Celery

from analysis.serving.celery_client import BUILD_QUEUE, DEFAULT_BROKER_URL, ONLINE_QUEUE, make_celery  # noqa: F401


def make_app(broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """The worker's Celery app: the shared configuration with the tasks of worker/tasks.py."""
    return make_celery(broker_url, result_backend, include=["worker.tasks"])


app = make_app()
