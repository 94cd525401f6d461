"""The view state on the page: the shell's store ``sel`` holds the whole state (app/state.py) and
mirrors the URL. The controls and ``sel`` are kept in step by two clientside callbacks (sel ->
controls through set_props, so the two directions form no dependency cycle); a third splits ``sel``
into the small ``k-*`` stores (app/state.py PARTS), each set only when its part changes, so every
view listens to just the parts it depends on. The functions: assets/explorer.js."""
from __future__ import annotations

from dash import ClientsideFunction, Input, Output, State, dcc

from app.state import PARTS
from app.views import Callbacks

callbacks = Callbacks()


def stores() -> list:
    """The ``k-*`` part stores and the controls' sync target."""
    return [*[dcc.Store(id=f"k-{k}") for k in PARTS], dcc.Store(id="ctl-sync")]


callbacks.clientside(ClientsideFunction("explorer", "controlsFromState"), Output("ctl-sync", "data"), Input("sel", "data"))

callbacks.clientside(
    ClientsideFunction("explorer", "stateFromControls"),
    Output("sel", "data", allow_duplicate=True),
    Input("metric", "value"), Input("a-color", "value"), Input("d1-kind", "value"), Input("d1-style", "value"),
    Input("scale", "value"), Input("bins", "value"), Input("band-scope", "value"), Input("thr-kind", "value"),
    Input("q-slider", "value"),
    Input("thr-abs", "value"), State("sel", "data"), State("thr-current", "data"),
    prevent_initial_call=True,
)

callbacks.clientside(ClientsideFunction("explorer", "parts"), *[Output(f"k-{k}", "data") for k in PARTS],
                     Input("sel", "data"))
