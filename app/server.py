"""The Dash app factory: ``create_app(cache_dir=None, run=None) -> dash.Dash``.

One shell around the pages (app/pages/*.py): a navbar, the shared selection store ``sel``
(the view state, declared in app/state.py) and its mirror in the URL query string, so any view can be shared
as a link (``/?run=default&image=12&layer=0&head=4&metric=jsd&thr=a0.05``). Every change of the
state is pushed to the browser history (assets/url.js), so Back/Forward step through it; within a
page they change the state only (the page is not rendered anew).
"""
from __future__ import annotations

import importlib
import json
import sys
import threading
from pathlib import Path

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, State, _callback, dcc, html, no_update
from flask import abort, jsonify, request, send_file

from analysis.errors import HeadScopeError
from analysis.serving import transport as online
from analysis.values import strict_int

from . import callbacks, config, data, security, state
from .auth import install_basic_auth
from .state import selection_query
from .views import load

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PAGES = (("Explorer", "/"), ("Heads", "/heads"), ("Curves", "/curves"), ("Compare", "/compare"), ("Runs", "/runs"),
         ("Help", "/help"))


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
        dcc.Store(id="sel", data={**dict.fromkeys(state.names()), "run": run}),
        dcc.Store(id="url-written"), dcc.Store(id="url-popped"), dcc.Store(id="url-parsed"),
        # the view state's declaration (app/state.py) as the browser reads it: data, not a script
        html.Div(id="hs-state-spec", hidden=True, **{"data-spec": json.dumps(state.browser_spec())}),
        nav,
        dbc.Container([html.Div(id="state-notes", className="state-notes"), dash.page_container],
                      fluid=True, className="pt-1 pb-2"),
    ])


def _register_shell_callbacks(app: dash.Dash) -> None:
    @app.callback(Output("sel", "data"), Output("url-parsed", "data"), Output("state-notes", "children"),
                  Input("url", "search"), Input("url-popped", "data"), State("url", "pathname"), State("sel", "data"))
    def parse_url(search, popped, pathname, sel):
        """The URL decides the state when the page loads and on Back/Forward (``url-popped``,
        assets/url.js): parsed (app/state.py) and judged against the run here. What was ignored is
        said above the page, and the URL is rewritten without it (``url-parsed``: assets/url.js
        replaces the history entry instead of adding one)."""
        if dash.ctx.triggered_id == "url-popped" and popped:
            search = popped.get("search")
        new, notes = state.parse_query(search, (sel or {}).get("run") or config.default_run())
        index, _ = load(new)  # a run that cannot be opened: the page says why
        compared = None
        if dash.strip_relative_path(pathname or "/") == "compare":  # Compare's runs and metric (app/pages/compare.py)
            compared = {r: (i.facts if i is not None else err) for r in new.get("runs") or []
                        for i, err in [load({"run": r})]}
        new, more = state.judge(new, None if index is None else index.facts, compared)
        notes += more
        parsed = {"from": search or "", "query": selection_query(new)}
        shown = [dbc.Alert(n, color="warning", dismissable=True, className="py-1 px-2 mb-1 small state-note")
                 for n in notes] or None
        return no_update if new == sel else new, parsed, shown

    # A new state is pushed to the browser history in the browser (assets/url.js: the same string as
    # selection_query), behind dcc.Location's back: a write through its props would run parse_url,
    # and while a callback that writes sel runs, Dash holds every callback listening to sel (the
    # views). Back/Forward reach parse_url through url-popped; the URL it parsed is replaced by the
    # canonical one (url-parsed), so what it ignored leaves the URL without a new history entry.
    app.clientside_callback("function(sel, parsed) { return window.hsUrl.write(sel, parsed); }",
                            Output("url-written", "data"), Input("sel", "data"), Input("url-parsed", "data"))

    # the nav links keep the whole state
    app.clientside_callback(
        """
        function(sel) {
            const base = window.hsUrl.base(), q = window.hsUrl.query(sel);
            return [...PATHS.map(p => base + p + q), sel && sel.run ? 'run: ' + sel.run : 'no run'];
        }
        """.replace("PATHS", json.dumps([path.lstrip("/") for _, path in PAGES])),
        [*(Output(f"nav-{name.lower()}", "href") for name, _ in PAGES), Output("nav-run", "children")],
        Input("sel", "data"),
    )


def _register_thumbnails(app: dash.Dash) -> None:
    @app.server.route(app.config.routes_pathname_prefix + "thumbs/<run>/<int:image_id>.png")
    def thumbnail(run, image_id):
        problem = config.name_problem(run)
        if problem:
            return jsonify(error=problem), 400
        try:  # through the run reader: a resolved file inside the run, never a link out of it
            path = data.get_index(run).run.thumbnail_file(image_id)
        except HeadScopeError:  # an unknown or unreadable run: the same 404, nothing about why
            path = None
        if path is None:
            abort(404)
        return send_file(path, mimetype="image/png", max_age=3600)


def _register_api(server, prefix: str = "/") -> None:
    """GET /healthz {"status": "ok", "online": online.status()} and the online queries as JSON:
    /api/partial_pruning?run=NAME&image=I&layer=L&head=H, /api/attention?... (nested list), /api/warm?...
    The queries answer under the app's routes prefix too (DASH_URL_BASE_PATHNAME=/x/: /x/api/...),
    where the page asks for them, beside the thumbnails."""
    @server.get("/healthz")
    def healthz():
        """The app is up (precomputed views work); "online" says whether online queries can run."""
        return jsonify(status="ok", online=online.status())

    def api(query: str):
        """One online query as JSON; errors as {"error": message} with status 400."""
        queries = ("partial_pruning", "attention", "head_set", "pair_interactions", "warm")
        if query not in queries:
            return jsonify(error=f"Unknown query {query!r}: use {', '.join(queries)}."), 404
        name = request.args.get("run", "")
        problem = config.name_problem(name)
        if problem or not config.run_dir(name).is_dir():
            shown = repr(name) if len(name) <= 60 else repr(name[:60]) + "..."
            return jsonify(error=f"Unknown run {shown}: {problem + ' ' if problem else ''}Give ?run=NAME of a "
                                 f"run in {config.cache_dir()}."), 400
        if query in ("head_set", "pair_interactions"):
            return _head_set_query(query, name)
        try:
            args = [request.args[k] for k in ("image", "layer", "head")]
            if query == "warm":
                return _warm(config.run_dir(name), args)
            out = getattr(online, query)(config.run_dir(name), *args)
        except KeyError as err:
            return jsonify(error=f"Missing parameter {err.args[0]!r}: give image, layer and head."), 400
        except online.OnlineError as err:
            return jsonify(error=str(err)), 400
        if query == "attention":
            out["attention"] = out["attention"].astype(float).tolist()
        return jsonify(out)

    for base in dict.fromkeys(("/", prefix)):
        server.add_url_rule(base + "api/<query>", "api" if base == "/" else "api_prefixed", api)


def _warm(run_dir: Path, args: list):
    """/api/warm?run=&image=&layer=&head=: the head's partial pruning and attention on the image,
    computed into the online cache; answers only {"warmed": bool}. The Explorer asks while it holds
    a head click (assets/explorer.js), so the views find the results computed."""
    try:
        for query in (online.partial_pruning, online.attention):
            query(run_dir, *args)
    except online.OnlineError as err:  # the views say it when they ask
        return jsonify(warmed=False, error=str(err))
    return jsonify(warmed=True)


def parse_heads(text: str) -> list[list]:
    """'0:4,11:5:R2' -> [[0, 4], [11, 5, "R2"]] (layer:head[:regions], comma-separated)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(item)
        out.append([strict_int(parts[0]), strict_int(parts[1]), *parts[2:]])
    return out


def _head_set_query(query: str, name: str):
    """/api/head_set?run=&image=&heads=L:H[:REGIONS],... and /api/pair_interactions?...&metric=prob_drop."""
    try:
        image, heads = request.args["image"], parse_heads(request.args["heads"])
    except KeyError as err:
        return jsonify(error=f"Missing parameter {err.args[0]!r}: give image and heads=L:H[:REGIONS],..."), 400
    except ValueError as err:
        return jsonify(error=f"Bad head {err.args[0]!r}: write heads as layer:head or layer:head:R1+R2, "
                             "separated by commas."), 400
    try:
        if query == "head_set":
            return jsonify(online.head_set(config.run_dir(name), image, heads))
        return jsonify(online.pair_interactions(config.run_dir(name), image, heads,
                                                request.args.get("metric", "prob_drop")))
    except online.OnlineError as err:
        return jsonify(error=str(err)), 400


def create_app(cache_dir=None, run=None, users: dict[str, str] | None = None) -> dash.Dash:
    """Build the dashboard for the runs under ``cache_dir`` (default: $HEADSCOPE_CACHE or cache/),
    opening ``run`` first (a name under cache_dir, or a run directory path).

    The login (app/auth.py) is part of the app, so every way of serving it has it: ``users``
    {name: password}, default HEADSCOPE_BASIC_AUTH / HEADSCOPE_BASIC_AUTH_FILE (none: no login);
    ``app.server.config["HEADSCOPE_LOGIN"]`` says whether it is on. ConfigError for unreadable users."""
    if run and Path(run).is_dir() and (Path(run) / "manifest.json").is_file():
        cache_dir, run = Path(run).resolve().parent, Path(run).name
    config.configure(cache_dir, run)
    # Pages register their callbacks with dash.callback when Dash imports them; drop leftovers of an
    # earlier create_app in this process (tests) so the new app gets exactly one copy.
    _callback.GLOBAL_CALLBACK_LIST.clear()
    _callback.GLOBAL_CALLBACK_MAP.clear()
    # Dash executes the page modules again for each app, but not what they import: the panels
    # (app/panels/*) are re-executed here so that a second app (tests, a notebook's second
    # explorer()) gets their callbacks too.
    for name in sorted(m for m in sys.modules if m.startswith("app.panels.")):
        importlib.reload(sys.modules[name])
    app = dash.Dash(
        "app", use_pages=True, pages_folder="pages", assets_folder=str(ROOT / "assets"),
        title="HeadScope", update_title=None, suppress_callback_exceptions=False, compress=True,
        meta_tags=[{"name": "viewport", "content": "width=device-width, initial-scale=1"}],
    )
    app.layout = _shell
    _register_shell_callbacks(app)
    _register_thumbnails(app)
    _register_api(app.server, app.config.routes_pathname_prefix)
    app.server.config["HEADSCOPE_LOGIN"] = install_basic_auth(app.server, users)
    security.install_csp(app)  # Content-Security-Policy on every HTML response (app/security.py)
    callbacks.guard(app)  # after the login: an unauthenticated request is refused before it is parsed
    threading.Thread(target=_warm_up, name="headscope-warm-up", daemon=True).start()
    return app


def _warm_up() -> None:
    """Build the first run's index in the background so the first page view is fast."""
    try:
        data.get_index(config.default_run())
    except Exception:  # the page reports the problem when it is opened
        pass
