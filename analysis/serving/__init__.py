"""Online computations for a built run (ModelService) and their transport (in-process or Celery)."""
