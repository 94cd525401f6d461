"""View A, the image overview: every image of the run in its 2-D layout, coloured by class,
correctness, P(true label) or the selected head's metric. A click selects an image, a lasso / box
a set of images; hovering shows the image."""
from __future__ import annotations

import dash_bootstrap_components as dbc
from dash import ClientsideFunction, Input, Output, Patch, State, ctx, dcc, html, no_update

from app import data, figures as F
from app.explorer.selection import cached, chosen_metric, selection, set_positions, thumb_url
from app.state import MAX_SET, STATE
from app.views import Callbacks, card, load, overlaid

callbacks = Callbacks()
HEIGHT = 352  # px: the four views fit one 1920x1080 screen (assets/headscope.css)


def layout() -> dbc.Card:
    tools = [dbc.Select(id="a-color", size="sm", className="a-color", value="class",
                        options=[{"label": f"colour: {v}", "value": k} for k, v in F.COLOR_BY.items()]),
             dbc.Button("clear set", id="set-clear", size="sm", color="link", className="p-0 small", n_clicks=0)]
    return card("A", "Image overview", [
        overlaid("a", HEIGHT, clear_on_unhover=True),
        html.Div(id="a-legend", className="a-legend"),
        dcc.Store(id="a-key"), dcc.Store(id="a-selection"), dcc.Store(id="a-drawn"),
        dcc.Tooltip(id="a-tooltip", direction="right"),
    ], hint="click · lasso/box = a set", tools=tools, class_name="view-a")


def overview_figure(index: data.RunIndex, sel: dict) -> dict:
    """A's images, coloured as the state's ``color`` says (class when the run cannot answer it)."""
    color = sel.get("color") if sel.get("color") in F.COLOR_BY else "class"
    names = [index.class_name(c) for c in range(max(int(index.images["label"].max()) + 1, 1))]
    imgs = index.images
    kw = {}
    if color == "prob":
        if not index.has_classifier:
            color = "class"
        else:
            kw = {"values": imgs["prob"].to_numpy(float), "value_label": "P(true label)"}
    elif color == "correct":
        if not index.has_classifier:
            color = "class"
        else:
            kw = {"correct": (imgs["pred"] == imgs["label"]).to_numpy()}
    elif color == "head":
        _, head = selection(index, sel)
        metric = chosen_metric(index, sel)
        if head is None or metric is None:
            color = "class"
        else:
            kw = {"values": index.values(metric)[:, head[0] * index.H + head[1]],
                  "value_label": f"{metric} of {F.head_name(*head)}"}
    return F.image_overview(imgs["overview_x"].to_numpy(), imgs["overview_y"].to_numpy(), imgs["label"].to_numpy(),
                            index.image_ids, names, uirevision=index.name, color_by=color, **kw)


def legend(fig: dict):
    """A's legend as chips under the graph (the figure's own legend would take the plot's room)."""
    items = F.legend_items(fig)
    if not items:
        return None
    glyph = {"circle": "●", "square": "■", "diamond": "◆", "triangle-up": "▲", "x": "✕", "cross": "✚",
             "triangle-down": "▼", "star": "★"}
    return [html.Span([html.Span(glyph.get(sym, "●"), style={"color": col}, className="me-1"), name], className="a-chip",
                      title=name) for name, col, sym in items]


@cached.view(Output("a-graph", "figure"), Output("a-legend", "children"), Output("a-selection", "data"),
                  Output("a-key", "data"),
                  Input("k-image", "data"), Input("k-color", "data"), Input("k-set", "data"), State("sel", "data"),
                  State("a-key", "data"))
def view_a(_ki, _kc, _ks, sel, drawn):
    """The images (cached per run and colouring) are sent only when that changes; a new selection
    sends only the selection layer (``a-selection``: the set's outline, the ring around the selected
    image), which assets/overlay.js draws over the images without redrawing them."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), None, [], None
    if "overview" in index.missing:
        return F.empty(index.missing["overview"]), None, [], None
    key = (("overview", str(sel.get("color")), sel.get("metric"), sel.get("layer"), sel.get("head"))
           if sel.get("color") == "head" else ("overview", str(sel.get("color"))))
    pos, _ = selection(index, sel)
    members = set_positions(index, sel)
    x, y = index.images["overview_x"].to_numpy(), index.images["overview_y"].to_numpy()
    layer = F.overview_selection(x, y, pos, members)
    drawn_key = f"{index.name}#{index.stamp}|{'|'.join(map(str, key))}"
    if drawn == drawn_key:
        return no_update, no_update, layer, no_update
    base = index.memo(key, lambda: overview_figure(index, sel))
    return base, legend(base), layer, drawn_key


callbacks.clientside(ClientsideFunction("overlay", "drawA"), Output("a-drawn", "data"), Input("a-selection", "data"))


@callbacks.server(Output("a-tooltip", "show"), Output("a-tooltip", "bbox"), Output("a-tooltip", "children"),
                  Input("a-graph", "hoverData"), State("sel", "data"))
def a_tooltip(hover, sel):
    """Thumbnail, label, prediction and probability of the hovered image."""
    if not hover or not hover.get("points"):
        return False, no_update, no_update
    pt = hover["points"][0]
    index, _ = load(sel)
    pos = index.pos(pt.get("customdata")) if index else None
    if pos is None:
        return False, no_update, no_update
    row = index.images.iloc[pos]
    body = html.Div([
        html.Img(src=thumb_url(index.name, row.image_id), className="tip-thumb"),
        html.Div([html.B(f"image {int(row.image_id)}"), html.Br(), f"label: {index.class_name(row.label)}", html.Br(),
                  f"predicted: {index.class_name(row.pred)}",
                  html.Br() if row.prob == row.prob else None,
                  f"P(true label): {float(row.prob):.3f}" if row.prob == row.prob else None], className="tip-text"),
    ], className="tip")
    return True, pt["bbox"], body


# A click in A selects that image in the browser (no round trip before the views update)
callbacks.clientside(ClientsideFunction("explorer", "imageClick"),
                     Output("sel", "data", allow_duplicate=True), Input("a-graph", "clickData"), State("sel", "data"),
                     prevent_initial_call=True)


@callbacks.server(Output("sel", "data", allow_duplicate=True),
                  Input("a-graph", "selectedData"), Input("image-go", "n_clicks"),
                  Input("image-box", "n_submit"), Input("set-clear", "n_clicks"),
                  State("image-box", "value"), State("goto-layer", "value"), State("goto-head", "value"),
                  prevent_initial_call=True)
def select_image(selected, _go, _submit, _clear, typed_id, typed_layer, typed_head):
    """A lasso / box selection in A selects a set of images (a deselection, e.g. the double-click
    that resets the zoom, keeps the set); the id box selects an image, and "Go" also goes to the
    typed layer / head."""
    trig = ctx.triggered_id
    p = Patch()
    if trig == "a-graph":
        ids = sorted({int(pt["customdata"]) for pt in (selected or {}).get("points", [])
                      if isinstance(pt.get("customdata"), (int, float))})
        if not ids:
            return no_update
        p["set"] = ids[:MAX_SET]
        return p
    if trig == "set-clear":
        p["set"] = None
        return p
    if trig in ("image-go", "image-box"):
        changed = False  # a value the state does not accept (a negative id, ...) is not taken
        if typed_id is not None and STATE["image"].accepts(typed_id):
            p["image"], changed = int(typed_id), True
        if STATE["layer"].accepts(typed_layer) and STATE["head"].accepts(typed_head):
            p["layer"], p["head"], changed = int(typed_layer), int(typed_head), True
        return p if changed else no_update
    return no_update
