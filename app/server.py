"""The Dash app factory: ``create_app(cache_dir=None, run=None) -> dash.Dash``.

One shell around the pages (app/pages/*.py): a navbar, the shared selection store ``sel``
({"run", "image", "layer", "head"}) and its mirror in the URL query string, so any view can be
shared as a link (``/?run=default&image=12&layer=0&head=4``).
"""
from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import parse_qs

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, State, _callback, dcc, html, no_update
from flask import abort, jsonify, request, send_file

from . import config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEYS = ("run", "image", "layer", "head")
PAGES = (("Explorer", "/"), ("Heads", "/heads"), ("Runs", "/runs"), ("Help", "/help"))


def parse_selection(search: str | None, default_run: str | None) -> dict:
    """URL query string -> selection dict (unknown or malformed values become None)."""
    q = {k: v[-1] for k, v in parse_qs((search or "").lstrip("?")).items()}
    sel = {"run": q.get("run") if config.valid_name(q.get("run")) else default_run}
    for k in ("image", "layer", "head"):
        try:
            sel[k] = int(q[k]) if k in q else None
        except ValueError:
            sel[k] = None
    return sel


def _shell():
    run = config.default_run()
    nav = dbc.Navbar(dbc.Container([
        dbc.NavbarBrand([html.Span("HeadScope", className="fw-bold"),
                         html.Span(" · how attention heads work in a ViT", className="brand-sub")],
                        href=dash.get_relative_path("/")),
        dbc.Nav([dbc.NavItem(dbc.NavLink(name, id=f"nav-{name.lower()}", href=dash.get_relative_path(path),
                                         active="exact"))
                 for name, path in PAGES], navbar=True, className="ms-auto"),
        html.Span(id="nav-run", className="nav-run ms-3"),
    ], fluid=True), color="dark", dark=True, className="py-1")
    return html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Store(id="sel", data={"run": run, "image": None, "layer": None, "head": None}),
        html.Div(id="url-sync", hidden=True),
        nav,
        dbc.Container(dash.page_container, fluid=True, className="pt-2 pb-4"),
    ])


def _register_shell_callbacks(app: dash.Dash) -> None:
    @app.callback(Output("sel", "data"), Input("url", "search"), State("sel", "data"))
    def url_to_selection(search, sel):
        """The URL decides the selection when it changes (first load, links, back button)."""
        new = parse_selection(search, (sel or {}).get("run") or config.default_run())
        return no_update if new == sel else new

    # selection -> URL (replaceState: no page reload, no router round trip) and nav links
    app.clientside_callback(
        """
        function(sel) {
            const p = new URLSearchParams();
            ['run', 'image', 'layer', 'head'].forEach(k => {
                if (sel && sel[k] !== null && sel[k] !== undefined) { p.set(k, sel[k]); }
            });
            const q = p.toString() ? '?' + p.toString() : '';
            if (window.location.search !== q) {
                window.history.replaceState(window.history.state, '', window.location.pathname + q);
            }
            const cfg = document.getElementById('_dash-config');
            const base = (cfg && JSON.parse(cfg.textContent).requests_pathname_prefix) || '/';
            return [base + q, base + 'heads' + q, base + 'runs' + q, base + 'help' + q, q,
                    sel && sel.run ? 'run: ' + sel.run : 'no run'];
        }
        """,
        [Output("nav-explorer", "href"), Output("nav-heads", "href"), Output("nav-runs", "href"),
         Output("nav-help", "href"), Output("url-sync", "children"), Output("nav-run", "children")],
        Input("sel", "data"),
    )


def _register_thumbnails(app: dash.Dash) -> None:
    @app.server.route(app.config.routes_pathname_prefix + "thumbs/<run>/<int:image_id>.png")
    def thumbnail(run, image_id):
        from analysis.errors import HeadScopeError
        from app import data

        if not config.valid_name(run):
            abort(404)
        try:
            path = data.get_index(run).run.thumbnail(image_id)  # through the run reader
        except HeadScopeError:
            abort(404)
        if not path.is_file():
            abort(404)
        return send_file(path, mimetype="image/png", max_age=3600)


def _register_api(server) -> None:
    """GET /healthz {"status": "ok", "online": online.status()} and the online queries as JSON:
    /api/partial_pruning?run=NAME&image=I&layer=L&head=H, /api/attention?... (nested list)."""
    from analysis.serving import transport as online  # imports torch: only once the app is built

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


def create_app(cache_dir=None, run=None) -> dash.Dash:
    """Build the dashboard for the runs under ``cache_dir`` (default: $HEADSCOPE_CACHE or cache/),
    opening ``run`` first (a name under cache_dir, or a run directory path)."""
    if run and Path(run).is_dir() and (Path(run) / "manifest.json").is_file():
        cache_dir, run = Path(run).resolve().parent, Path(run).name
    config.configure(cache_dir, run)
    # Pages register their callbacks with dash.callback when Dash imports them; drop leftovers of an
    # earlier create_app in this process (tests) so the new app gets exactly one copy.
    _callback.GLOBAL_CALLBACK_LIST.clear()
    _callback.GLOBAL_CALLBACK_MAP.clear()
    app = dash.Dash(
        "app", use_pages=True, pages_folder="pages", assets_folder=str(ROOT / "assets"),
        title="HeadScope", update_title=None, suppress_callback_exceptions=False,
        meta_tags=[{"name": "viewport", "content": "width=device-width, initial-scale=1"}],
    )
    app.layout = _shell
    _register_shell_callbacks(app)
    _register_thumbnails(app)
    _register_api(app.server)
    threading.Thread(target=_warm_up, name="headscope-warm-up", daemon=True).start()
    return app


def _warm_up() -> None:
    """Build the first run's index in the background so the first page view is fast."""
    from . import data

    try:
        data.get_index(config.default_run())
    except Exception:  # the page reports the problem when it is opened
        pass
