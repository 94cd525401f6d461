"""Runs: every run under the cache directory with its model, data set, size and build date;
broken runs show why they cannot be opened. Opening a run makes it the shared selection."""
from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, callback, dcc, html

from analysis.runs.reader import list_runs
from app import config

dash.register_page(__name__, path="/runs", name="Runs", title="HeadScope · Runs", order=4)


def human_size(n) -> str:
    if not n:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def layout(**_query):
    return html.Div([
        html.H4("Runs", className="mt-2"),
        html.P(["Each run is one model analysed on one image set, built with ",
                html.Code("python scripts/build_cache.py"), ". Open a run to explore it; the selection "
                "(run, image, head) is kept in the page address, so a view can be shared as a link."],
               className="text-muted"),
        html.Div(id="runs-table"),
    ])


@callback(Output("runs-table", "children"), Input("sel", "data"))
def runs_table(sel):
    cache = config.cache_dir()
    try:
        runs = list_runs(cache)
    except OSError as err:
        return dbc.Alert(f"Cannot read the cache directory {cache}: {err}", color="danger")
    if not runs:
        return dbc.Alert(["No runs under ", html.Code(str(cache)), ". Build the default one with ",
                          html.Code("python scripts/build_cache.py --out cache/default"),
                          " or start the app with --cache-dir pointing at your runs."], color="warning")
    current = (sel or {}).get("run")
    head = html.Thead(html.Tr([html.Th(c) for c in
                               ("run", "status", "model", "data set", "images", "size", "built", "")]))
    rows = []
    for r in runs:
        ok = r["error"] is None
        action = (dcc.Link("open", href=dash.get_relative_path(f"/?run={r['name']}"), className="btn btn-sm btn-primary") if ok
                  else html.Span("unreadable", className="text-danger small"))
        rows.append(html.Tr([
            html.Td(html.B(r["name"]) if r["name"] == current else r["name"]),
            html.Td(r.get("status") or "–"), html.Td(r.get("model") or "–"), html.Td(r.get("dataset") or "–"),
            html.Td(r.get("images") if r.get("images") is not None else "–"), html.Td(human_size(r.get("size_bytes"))),
            html.Td((r.get("created") or "–")[:19].replace("T", " ")), html.Td(action),
        ], className="table-active" if r["name"] == current else None))
        if not ok:
            rows.append(html.Tr(html.Td(dbc.Alert(r["error"], color="danger", className="py-1 mb-0 small"),
                                        colSpan=8)))
    return [html.P(["Cache directory: ", html.Code(str(cache))], className="small"),
            dbc.Table([head, html.Tbody(rows)], bordered=False, hover=True, size="sm", responsive=True,
                      className="runs-table")]
