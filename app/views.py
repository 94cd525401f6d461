"""Small layout helpers shared by the pages (cards, messages, the run loader)."""
from __future__ import annotations

import dash_bootstrap_components as dbc
from dash import callback, clientside_callback, dcc, html

from analysis.errors import HeadScopeError

from . import data

# doubleClickDelay: plotly's documented default, given explicitly (the bundled plotly.js waits 500 ms),
# since the Explorer holds a head click on a zoomed graph that long to tell it from a double-click
# (app/explorer/head_click.py); doubleClick "reset": back to the figure's own view (assets/explorer.js),
# without plotly's further autorange on a second double-click.
GRAPH_CONFIG = {"displaylogo": False, "responsive": True, "displayModeBar": "hover", "doubleClickDelay": 300,
                "doubleClick": "reset",
                "modeBarButtonsToRemove": ["autoScale2d", "toggleSpikelines", "hoverClosestCartesian",
                                           "hoverCompareCartesian"]}


def load(sel) -> tuple[data.RunIndex | None, str | None]:
    """(index, None) for the selected run, or (None, message) when it cannot be opened."""
    try:
        return data.get_index((sel or {}).get("run")), None
    except HeadScopeError as err:
        return None, str(err)
    except Exception as err:  # a corrupt table: say so, keep the page alive
        return None, f"Run {(sel or {}).get('run')} cannot be read: {type(err).__name__}: {err}"


class Callbacks:
    """A component's callbacks, declared beside its layout with ``@callbacks.server(...)`` (as
    ``dash.callback``) and ``callbacks.clientside(...)`` (as ``dash.clientside_callback``), and added
    to the app by ``register()``, which the page calls each time Dash executes it: create_app clears
    Dash's callback list for each app, and a component module, imported once, would not run again.
    The decorated functions stay plain functions (the report calls views directly)."""

    def __init__(self):
        self._declared: list = []  # (fn or None for a clientside one, args, kwargs), in declaration order

    def server(self, *args, **kwargs):
        def add(fn):
            self._declared.append((fn, args, kwargs))
            return fn
        return add

    def clientside(self, *args, **kwargs) -> None:
        self._declared.append((None, args, kwargs))

    def register(self) -> None:
        for fn, args, kwargs in self._declared:
            if fn is None:
                clientside_callback(*args, **kwargs)
            else:
                callback(*args, **kwargs)(fn)


def card(letter: str, title: str, body, hint: str | None = None, tools=None, class_name: str = "") -> dbc.Card:
    """A view: header 'A · Image overview' with an optional hint and controls on the right."""
    header = [html.Span(letter, className="view-letter"), html.Span(title, className="view-title")]
    if hint:
        header.append(html.Span(hint, className="view-hint"))
    return dbc.Card([
        dbc.CardHeader([html.Div(header, className="view-head"), html.Div(tools or [], className="view-tools")],
                       className="d-flex justify-content-between align-items-center flex-wrap gap-1"),
        dbc.CardBody(body, className="p-1"),
    ], className=f"view-card mb-2 {class_name}")


def graph_config(id_: str, fmt: str = "png") -> dict:
    """GRAPH_CONFIG with the camera button exporting at publication size: PNG at 4x the on-screen
    pixels (print resolution) or SVG (vector), named after the view."""
    fmt = fmt if fmt in ("png", "svg") else "png"
    return {**GRAPH_CONFIG, "toImageButtonOptions": {"format": fmt, "filename": f"headscope-{id_.removesuffix('-graph')}",
                                                     "scale": 4 if fmt == "png" else 1}}


def graph(id_: str, height: int, **kw) -> dcc.Graph:
    return dcc.Graph(id=id_, config=graph_config(id_), style={"height": f"{height}px"},
                     figure={"data": [], "layout": {"xaxis": {"visible": False}, "yaxis": {"visible": False}}}, **kw)


def overlaid(view: str, height: int, **kw) -> html.Div:
    """dcc.Graph ``<view>-graph`` with a selection layer over it (``<view>-overlay``), which
    assets/overlay.js draws (``dash_clientside.overlay.draw(view, traces)``)."""
    return html.Div([graph(f"{view}-graph", height, **kw), html.Div(id=f"{view}-overlay", className="overlay")],
                    className="overlay-stack")


def message(text: str | None, color: str = "warning"):
    """An inline alert, or nothing."""
    if not text:
        return None
    return dbc.Alert(text, color=color, className="py-1 px-2 mb-1 small view-message")


def loading(children, *, note=None) -> html.Div:
    """``children``; while a callback recomputes one of them, after 150 ms, that one is dimmed and
    a graph gets a spinner, or ``note`` (what is being computed) is shown over them instead: CSS on
    the data-dash-is-loading attribute Dash puts on a running callback's outputs (assets/headscope.css).
    Not dcc.Loading: each dcc.Loading scans Dash's whole loading state at every store update (some
    270 of them for a click on an image in A), about a seventh of the renderer's time in a profile."""
    if not note:
        return html.Div(children, className="view-loading")
    return html.Div([*children, html.Div(note, className="view-loading-note small")], className="view-loading view-noted")
