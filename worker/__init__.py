"""HeadScope model worker: the Celery app (celery_app.py) and its tasks (tasks.py)."""
