"""Serve the dashboard: python -m app [--cache-dir cache] [--run RUN] [--host 127.0.0.1] [--port 8050]"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve the HeadScope dashboard: the four linked views of Li et al. (2023) over the "
                    "runs built with scripts/build_cache.py.",
        epilog="Online views (partial pruning, attention details) run in this process unless "
               "HEADSCOPE_BROKER_URL points at a Celery worker. For production use gunicorn app.wsgi:server.")
    ap.add_argument("--cache-dir", default=None,
                    help="directory holding the runs (default: $HEADSCOPE_CACHE or <repo>/cache)")
    ap.add_argument("--run", default=None,
                    help="run to open first: a name under the cache directory or a run directory "
                         "(default: 'default' if it exists, else the first run that opens)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="interface to listen on (default 127.0.0.1; use 0.0.0.0 to serve your network)")
    ap.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050)")
    ap.add_argument("--torch-threads", type=int, default=int(os.environ.get("HEADSCOPE_TORCH_THREADS") or 1),
                    help="CPU threads per in-process online query (default 1, or $HEADSCOPE_TORCH_THREADS): "
                         "one thread per request keeps a shared CPU responsive; raise it on a dedicated machine")
    ap.add_argument("--debug", action="store_true", help="Dash debug mode: reload on code changes, dev tools")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.torch_threads))

    from analysis.runs import store
    from app import config, create_app

    app = create_app(args.cache_dir, args.run)
    runs = store.list_runs(config.cache_dir())
    if not runs:
        print(f"Note: no runs under {config.cache_dir()}. Build one with "
              "`python scripts/build_cache.py --out cache/default`; the dashboard will say so too.", file=sys.stderr)
    print(f"HeadScope: http://{args.host}:{args.port}/  (runs in {config.cache_dir()}, "
          f"opening {config.default_run() or 'none'})", file=sys.stderr)
    app.run(host=args.host, port=args.port, debug=args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
