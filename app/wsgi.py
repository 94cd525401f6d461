"""WSGI entry point for serving the dashboard with gunicorn (never the Dash dev server):

    gunicorn --bind 127.0.0.1:8050 --worker-class gthread --threads 8 app.wsgi:server

Environment: HEADSCOPE_CACHE (directory of runs), HEADSCOPE_RUN (run shown first),
HEADSCOPE_BROKER_URL (model worker; unset = compute in-process), HEADSCOPE_BASIC_AUTH /
HEADSCOPE_BASIC_AUTH_FILE (optional login, see app/auth.py).

Besides the dashboard, the server answers /healthz and the JSON /api (see app/server.py).
"""
from __future__ import annotations

import os

import torch

from app.server import create_app

# In-process online queries (no broker): one torch thread per request keeps a shared CPU
# responsive, as `python -m app` does; HEADSCOPE_TORCH_THREADS raises it on a dedicated machine.
torch.set_num_threads(max(1, int(os.environ.get("HEADSCOPE_TORCH_THREADS") or 1)))

dash_app = create_app(cache_dir=os.environ.get("HEADSCOPE_CACHE") or None,
                      run=os.environ.get("HEADSCOPE_RUN") or None)
server = dash_app.server  # with the login when HEADSCOPE_BASIC_AUTH* is set (create_app installs it)
