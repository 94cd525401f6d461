"""A click on a head in B1, C1 or D1 selects it.

On a zoomed (or panned) graph the click is held until plotly's double-click delay has passed since
its mousedown and dropped when it was the start of a double-click, which resets the zoom and nothing
else (plotly holds legend clicks the same way); assets/explorer.js remembers each graph's last two
mousedowns. On a graph that is not zoomed a double-click resets nothing (hsDoubleClickMatters), so a
click there is taken at once, and a double-click selects the head as a click does. A head of B1 / C1
([layer, head]) is set in the browser: at once into ``sel``; after a hold through ``head-pick``, on
the state as it is then. A point of D1's background ([image id, layer, head]: ``head-click``) goes
to select_head on the server. During a hold the server computes the head's online results
(assets/explorer.js hsWarm)."""
from __future__ import annotations

from dash import ClientsideFunction, Input, Output, Patch, State, dcc, html, no_update

from app import figures as F
from app.views import Callbacks

callbacks = Callbacks()


def stores() -> list:
    return [dcc.Store(id="head-click"), dcc.Store(id="head-pick")]


callbacks.clientside(
    ClientsideFunction("explorer", "headClick"),
    Output("head-pick", "data"), Output("head-click", "data"),
    Output("sel", "data", allow_duplicate=True), Output("pick-note", "children", allow_duplicate=True),
    Input("b1-graph", "clickData"), Input("c1-graph", "clickData"), Input("d1-graph", "clickData"),
    State("sel", "data"), prevent_initial_call=True,
)
callbacks.clientside(
    ClientsideFunction("explorer", "headPick"),
    Output("sel", "data", allow_duplicate=True), Output("pick-note", "children", allow_duplicate=True),
    Input("head-pick", "data"), State("sel", "data"), prevent_initial_call=True,
)


@callbacks.server(Output("sel", "data", allow_duplicate=True), Output("pick-note", "children"),
                  Input("head-click", "data"), State("sel", "data"), prevent_initial_call=True)
def select_head(click, sel):
    """A (held) click on a point of D1's background, [image id, layer, head], selects that head of
    that image; another image's: the note under the header says so."""
    if not click:  # Dash's call when the page mounts
        return no_update, no_update
    image, layer, head = (int(v) for v in click)
    p = Patch()
    p["image"], p["layer"], p["head"] = image, layer, head
    note = None
    if image != sel.get("image"):
        note = html.Span([html.B("D1: "), f"picked {F.head_name(layer, head)} of image {image} "
                          f"(was image {sel.get('image')})" if sel.get("image") is not None else
                          f"picked {F.head_name(layer, head)} of image {image}"], className="small")
    return p, note
