"""Small layout helpers shared by the pages (cards, messages, the run loader) and the callback plumbing
of view components (Callbacks: callbacks declared beside a layout; ViewModel: views answering a state
change in one request)."""
from __future__ import annotations

import contextvars
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import dash_bootstrap_components as dbc
from dash import Input, Output, Patch, State, callback, clientside_callback, dcc, html, no_update

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


@dataclass(frozen=True)
class View:
    """One view of a ViewModel: its data function and its Dash dependencies, in its declared order."""
    fn: Callable
    outputs: tuple            # Output, ...
    args: tuple               # Input / State, in the order ``fn`` takes them
    inputs: tuple             # "id.prop" of the Inputs, whose values it is drawn for

    @property
    def name(self) -> str:
        return self.fn.__name__

    def keys(self) -> list[str]:
        return [f"{d.component_id}.{d.component_property}" for d in self.args]


_CHANGED: contextvars.ContextVar = contextvars.ContextVar("changed_inputs", default=None)


def changed_inputs() -> set[str]:
    """The component ids of the running view's Inputs whose values differ from those the browser
    shows it for (every Input on its first draw), plus ViewModel.VERSION when the data changed under
    them; empty outside a view model (the report, tests)."""
    return _CHANGED.get() or set()


def layout_patch(figure: dict, *keys: str) -> Patch:
    """A Patch setting only ``keys`` of ``figure``'s layout (e.g. "shapes"): what a view sends when
    nothing else of its figure changed (``changed_inputs``); the browser keeps the figure's traces,
    and plotly redraws only those layout parts (shapes and annotations without replotting)."""
    patch = Patch()
    for key in keys:
        patch["layout"][key] = figure["layout"].get(key, [])
    return patch


def _fingerprint(value) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()


class ViewModel:
    """Views that answer one state change together, in one request: each view declares its outputs,
    Inputs and States beside its layout (``@model.view(Output(...), Input(...), State(...))``, as
    ``dash.callback``) and ``register()`` adds one Dash callback with every view's outputs and the
    union of their dependencies. A call computes only the views whose Inputs differ from those the
    browser shows them for (the record ``vm-<name>``, a store the same response updates: a response
    the browser drops, superseded by a newer request, leaves it as it was, so nothing is skipped) and
    sends no_update for the others, so a new head does not resend what depends on the image only.
    ``parallel``: the views run in threads (the online views, whose model queries release the GIL).
    ``version(values)``: the identity of the data the views read (a run replaced in place has another):
    when it changes, every view is drawn anew, whatever its Inputs (and patches nothing).
    The decorated functions stay plain functions (tests, the report and the exports call them)."""

    VERSION = "@version"  # the record's entry for ``version``, beside each view's Inputs

    def __init__(self, name: str, parallel: bool = False, version: Callable[[dict], str | None] | None = None):
        self.name, self.parallel, self.version, self.views = name, parallel, version, []

    @property
    def record_id(self) -> str:
        return f"vm-{self.name}"

    def store(self) -> dcc.Store:
        """The record of what the browser shows (in the page that lays out the views)."""
        return dcc.Store(id=self.record_id)

    def view(self, *deps):
        def add(fn):
            outputs = tuple(d for d in deps if isinstance(d, Output))
            args = tuple(d for d in deps if isinstance(d, (Input, State)))
            inputs = tuple(f"{d.component_id}.{d.component_property}" for d in args if isinstance(d, Input))
            self.views.append(View(fn, outputs, args, inputs))
            return fn
        return add

    def dependencies(self) -> tuple[list, list, list]:
        """(outputs, Inputs, States) of the one callback: an id.prop that one view reads as an Input is
        an Input of the callback (a view that reads it as a State is not recomputed for it)."""
        inputs, states = {}, {}
        for v in self.views:
            for d, key in zip(v.args, v.keys()):
                if key in v.inputs:
                    inputs.setdefault(key, Input(d.component_id, d.component_property))
                    states.pop(key, None)
                elif key not in inputs:
                    states.setdefault(key, State(d.component_id, d.component_property))
        return [o for v in self.views for o in v.outputs], list(inputs.values()), list(states.values())

    def run(self, values: dict, shown: dict | None) -> tuple[list, dict]:
        """(every view's outputs, flat; the new record): computed for the views whose Inputs'
        fingerprints differ from ``shown`` (the record: view -> {input: fingerprint}), no_update for
        the rest. ``values``: "id.prop" -> value."""
        shown = shown if isinstance(shown, dict) else {}
        version = self.version(values) if self.version else None
        record, todo = {}, []
        for v in self.views:
            record[v.name] = {k: _fingerprint(values.get(k)) for k in v.inputs}
            if version is not None:
                record[v.name][self.VERSION] = version
            was = shown.get(v.name) if isinstance(shown.get(v.name), dict) else {}
            changed = {k.rpartition(".")[0] or k for k, fp in record[v.name].items() if was.get(k) != fp}
            if changed:
                todo.append((v, changed))

        def call(v, changed):
            token = _CHANGED.set(changed)
            try:
                return v.fn(*[values.get(k) for k in v.keys()])
            finally:
                _CHANGED.reset(token)
        if self.parallel and len(todo) > 1:
            with ThreadPoolExecutor(len(todo)) as pool:  # each thread in a copy of the callback's context
                results = list(pool.map(lambda t: contextvars.copy_context().run(call, *t), todo))
        else:
            results = [call(*t) for t in todo]
        done = {t[0].name: r for t, r in zip(todo, results)}
        out = []
        for v in self.views:
            if v.name not in done:
                out.extend([no_update] * len(v.outputs))
            else:
                out.extend(done[v.name] if len(v.outputs) > 1 else [done[v.name]])
        return out, record

    def register(self) -> None:
        outputs, inputs, states = self.dependencies()
        keys = [f"{d.component_id}.{d.component_property}" for d in inputs + states]

        def view_model(*args):
            out, record = self.run(dict(zip(keys, args[:-1])), args[-1])
            return [*out, record]

        view_model.__name__ = f"view_model_{self.name}"
        callback(*outputs, Output(self.record_id, "data"), *inputs, *states, State(self.record_id, "data"))(view_model)


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
    pixels (print resolution) or SVG (vector), named after the view; D5's threshold line can be
    dragged (plotly's shapePosition edits: relayoutData ``shapes[0].x0``)."""
    fmt = fmt if fmt in ("png", "svg") else "png"
    return {**GRAPH_CONFIG, "toImageButtonOptions": {"format": fmt, "filename": f"headscope-{id_.removesuffix('-graph')}",
                                                     "scale": 4 if fmt == "png" else 1},
            **({"edits": {"shapePosition": True}} if id_ == "d5-graph" else {})}  # D5's threshold line drags


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
