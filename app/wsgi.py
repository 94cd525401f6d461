"""WSGI entry point for serving the dashboard with gunicorn (never the Dash dev server):

    gunicorn --bind 127.0.0.1:8050 --worker-class gthread --threads 8 app.wsgi:server

Environment: HEADSCOPE_CACHE (directory of runs), HEADSCOPE_RUN (run shown first),
HEADSCOPE_BROKER_URL (model worker; unset = compute in-process), HEADSCOPE_BASIC_AUTH /
HEADSCOPE_BASIC_AUTH_FILE (optional login, see app/auth.py).

Besides the dashboard, the server answers
  GET /healthz                                   {"status": "ok", "online": online.status()}
  GET /api/partial_pruning?run=NAME&image=I&layer=L&head=H    the online query as JSON
  GET /api/attention?run=NAME&image=I&layer=L&head=H          (attention as a nested list)
"""
from __future__ import annotations

import os

import torch
from flask import jsonify, request

from app import config, online
from app.server import create_app
from app.auth import install_basic_auth

# In-process online queries (no broker): one torch thread per request keeps a shared CPU
# responsive, as `python -m app` does; HEADSCOPE_TORCH_THREADS raises it on a dedicated machine.
torch.set_num_threads(max(1, int(os.environ.get("HEADSCOPE_TORCH_THREADS") or 1)))

dash_app = create_app(cache_dir=os.environ.get("HEADSCOPE_CACHE") or None,
                      run=os.environ.get("HEADSCOPE_RUN") or None)
server = dash_app.server


@server.get("/healthz")
def healthz():
    """The app is up (precomputed views work); "online" says whether online queries can run."""
    return jsonify(status="ok", online=online.status())


@server.get("/api/<query>")
def api(query: str):
    """One online query as JSON; errors as {"error": message} with status 400."""
    if query not in ("partial_pruning", "attention"):
        return jsonify(error=f"Unknown query {query!r}: use partial_pruning or attention."), 404
    name = request.args.get("run", "")
    if not config.valid_name(name) or not config.run_dir(name).is_dir():
        return jsonify(error=f"Unknown run {name!r}: give ?run=NAME of a run in {config.cache_dir()}."), 400
    try:
        args = [request.args[k] for k in ("image", "layer", "head")]
        out = getattr(online, query)(config.run_dir(name), *args)
    except KeyError as err:
        return jsonify(error=f"Missing parameter {err.args[0]!r}: give image, layer and head."), 400
    except online.OnlineError as err:
        return jsonify(error=str(err)), 400
    if query == "attention":
        out["attention"] = out["attention"].astype(float).tolist()
    return jsonify(out)


install_basic_auth(server)
