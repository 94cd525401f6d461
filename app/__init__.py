"""HeadScope's Dash app: ``create_app(cache_dir=None, run=None)`` builds it; ``python -m app`` serves it."""
from .server import create_app

__all__ = ["create_app"]
