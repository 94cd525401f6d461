"""Serve the dashboard: python -m app [--cache-dir cache] [--run RUN] [--host 127.0.0.1] [--port 8050]
(= `headscope serve`; the options are defined in analysis/cli.py)."""
import sys

from analysis.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
