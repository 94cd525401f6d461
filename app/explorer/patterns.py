"""View D, attention patterns: D1 the 2-D layout of every head of every image (CLS vectors or patch
latents), D2 the image with the attention masks of a source / target token, D3 the two-axis view of
the head's attention, D4 its matrix, D5 the histogram of its values with the threshold; the right
part shows D3-D5 or a panel module (app/panels/__init__.py D_PANELS, laid out by the page). D2-D5 ask
the online service for the head's attention, computed once per (image, head) for all of them."""
from __future__ import annotations

import dash_bootstrap_components as dbc
import numpy as np
from dash import ClientsideFunction, Input, Output, Patch, State, ctx, dcc, html, no_update

from analysis.errors import HeadScopeError
from analysis.metrics import registry
from analysis.serving.transport import OnlineError

from app import data, figures as F
from app.explorer.selection import SCOPES, attention, cached, online, scope_positions, scope_subset, selection
from app.panels import D_PANELS
from app.state import parse_threshold
from app.views import Callbacks, card, changed_inputs, graph, load, loading, message, overlaid

callbacks = Callbacks()
Q_MARKS = {-1: "0.1%", 0: "1%", 1: "10%", 2: "100%"}
Q_STEP = 0.05
HEIGHT = {"d1": 372, "d3": 140, "d4": 226}  # px: the four views fit one 1920x1080 screen (assets/headscope.css)
SCALE_NAMES = {"layer": "this layer of this image", "image": "all layers of this image",
               "run": "this layer over the run's images"}


def d1_color_options(categories) -> list[dict]:
    """D1's colourings: by layer, and by each registered category metric (its registry label); one the
    run lacks says why when chosen (as "by pattern" does for a run built before the pattern labels)."""
    return [{"label": "by layer", "value": "layer"}] + [{"label": f"by {m.label}", "value": m.name} for m in categories]


def layout(panels: dict) -> dbc.Card:
    """View D; ``panels``: key of D_PANELS (all but "pattern") -> the panel module's layout function."""
    tools = [
        dbc.RadioItems(id="d1-kind", options=[{"label": "CLS vectors", "value": "cls"},
                                               {"label": "patch latents", "value": "patch"}],
                       value="cls", inline=True, className="small toggle"),
        dbc.RadioItems(id="d1-style", options=[{"label": v, "value": k} for k, v in F.D1_STYLES.items()],
                       value="points", inline=True, className="small toggle"),
        dbc.RadioItems(id="d1-color", options=d1_color_options(data.category_metrics()),
                       value="layer", inline=True, className="small toggle"),
        dbc.RadioItems(id="scale", options=[{"label": "scale: this layer", "value": "layer"},
                                            {"label": "all layers", "value": "image"},
                                            {"label": "layer over the run", "value": "run"}],
                       value="layer", inline=True, className="small toggle",
                       ),
    ]
    threshold_row = html.Div([
        dbc.RadioItems(id="thr-kind", options=[{"label": "top q", "value": "q"}, {"label": "value ≥", "value": "a"}],
                       value="q", inline=True, className="small toggle me-2"),
        html.Div(dcc.Slider(id="q-slider", min=-1, max=2, step=Q_STEP, value=0, marks=Q_MARKS,
                            allow_direct_input=False, updatemode="mouseup"), className="q-slider"),
        dbc.Input(id="thr-abs", type="number", min=0, max=1, step="any", debounce=True, size="sm",
                  placeholder="value", className="thr-abs"),
        dbc.RadioItems(id="bins", options=[{"label": "log bins", "value": "log"}, {"label": "linear", "value": "linear"}],
                       value="log", inline=True, className="small toggle ms-2"),
        dcc.Store(id="thr-current"),
    ], className="q-row")
    return card("D", "Attention pattern", [
        dbc.Row([
            dbc.Col([html.Div(id="d1-msg"),
                     overlaid("d1", HEIGHT["d1"]),
                     # D2's masks each on its own scale: where a token looks stays visible beside a
                     # stronger head of the layer (under D1, where the column has room: one screen)
                     dbc.Checklist(id="d2-own", options=[{"label": "D2: each mask to its own max", "value": "own"}],
                                   value=[], switch=True, className="small d2-own"),
                     dcc.Store(id="d1-key"), dcc.Store(id="d1-selection"), dcc.Store(id="d1-drawn")],
                    className="d1-col"),
            dbc.Col(loading([html.Div(id="d2-msg"), html.Div(id="d2-images", className="d2-images")]), className="d2-col"),
            dbc.Col([
                # D3-D5 or the saliency panel D6 in one place: the four views keep one 1920x1080 screen
                html.Div([dbc.RadioItems(id="d-panel", options=[{"label": v, "value": k} for k, v in D_PANELS.items()],
                                         value="pattern", inline=True, className="small toggle d-panel"),
                          html.Span([html.Span("D3 · two-axis view ", className="sub-title"),
                                     html.Span(id="d3-count", className="d3-count")], id="d3-title")],
                         className="d-switch"),
                html.Div(loading([
                    html.Div(id="d-msg"),
                    graph("d3-graph", HEIGHT["d3"], clear_on_unhover=False),
                    dbc.Row([
                        dbc.Col([html.Div("D4 · attention (row source, column target)", className="sub-title"),
                                 graph("d4-graph", HEIGHT["d4"])], className="d4-col"),
                        dbc.Col([html.Div("D5 · attention values · drag the line or click a bar", className="sub-title"),
                                 graph("d5-graph", HEIGHT["d4"] - 38), threshold_row], className="d5-col"),
                    ], className="g-1"),
                ]), id="d-pattern"),
                *[html.Div(panels[key](), id=f"d-{key}", style={"display": "none"})
                  for key in D_PANELS if key != "pattern"],
            ], className="d3-col"),
        ], className="g-1"),
    ], hint="D1: all heads of all images · click a head", tools=tools, class_name="view-d")


callbacks.clientside(
    ClientsideFunction("explorer", "panelSwitch"),
    Output("d3-title", "style"), *[Output(f"d-{key}", "style") for key in D_PANELS], Input("d-panel", "value"),
    prevent_initial_call=True,
)


# ---- D1: pattern layout ----------------------------------------------------------------------
@cached.view(Output("d1-graph", "figure"), Output("d1-selection", "data"), Output("d1-key", "data"),
                  Output("d1-msg", "children"),
                  Input("k-image", "data"), Input("k-head", "data"), Input("k-d1", "data"), Input("k-set", "data"),
                  Input("d1-color", "value"), State("sel", "data"), State("d1-key", "data"))
def view_d1(_ki, _kh, _kd, _ks, color, sel, drawn):
    """The background (all heads of all images, by layer or by a category metric's labels: ``color``
    "layer" or the metric's name, e.g. "pattern") is cached per run/kind/style/
    colouring and sent only when that changes; a selection change sends only the selection layer
    (``d1-selection``), which assets/overlay.js draws over the background without redrawing it."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), [], None, None
    kind = sel.get("d1") if sel.get("d1") in ("cls", "patch") else "cls"
    style = sel.get("d1s") if sel.get("d1s") in F.D1_STYLES else "points"
    if kind not in index.layouts:
        other = "patch" if kind == "cls" else "cls"
        hint = f" Try the {other} layout." if other in index.layouts else ""
        return F.empty(index.missing.get(kind, "No layout.") + hint), [], None, message(index.missing.get(kind))
    category = color if color not in (None, "layer") and style != "contours" else None
    if category is not None and category not in index.categories:
        return no_update, no_update, no_update, message(index.run.lacks(category))
    pos, head = selection(index, sel)
    xy = index.layouts[kind]
    # the background draws only the scope's subset (class / mispredicted) when it has images; a
    # lasso set only restricts the selected head's points, over the whole background
    members, name = scope_positions(index, sel)
    subset = scope_subset(index, sel)
    filtered = subset is not None and len(subset[0]) > 0
    rows, scope = (members, name) if filtered else (np.arange(index.n), "all")
    note = None
    if filtered:
        note = message(f"D1 draws the heads of the {len(rows)} image{'s' if len(rows) != 1 else ''} of {name} "
                       f"(of {index.n}).", "info")
    elif sel.get("scope") in ("class", "wrong"):
        note = message(f"No image in {SCOPES[sel['scope']]}: D1 draws all {index.n} images.", "warning")
    head_xy, head_label = None, None
    if head is not None:
        head_xy = xy[slice(None) if members is None else members, head[0] * index.H + head[1]]
        head_label = f"{F.head_name(*head)} in " + ("all images" if members is None else f"{name} ({len(members)})")
    # "points + contours": the points' background with the density under it, in the selection layer
    # (the toggle redraws no point)
    density = index.memo(("d1-density", kind, scope), lambda: F.pattern_density(xy[rows], lines=False)) \
        if style == "both" else None
    overlay = F.pattern_overlay(None if pos is None else xy[pos], index.L, index.H, head, head_xy, head_label,
                                density)
    style = "points" if style == "both" else style
    key = f"{index.name}#{index.stamp}|{kind}|{style}|{category or 'layer'}|{scope}"
    if drawn == key:
        return no_update, overlay, no_update, note
    background = index.memo(("d1", kind, style, category, scope), lambda: F.pattern_background(
        xy[rows], style, index.H, index.image_ids[rows],
        patterns=None if category is None else index.values(category)[rows],
        label=None if category is None else registry.get_metric(category).label,
        colours=F.CATEGORY_COLOURS.get(category)))
    return F.pattern_layout(background, kind, uirevision=key), overlay, key, note


callbacks.clientside(ClientsideFunction("overlay", "drawD1"), Output("d1-drawn", "data"), Input("d1-selection", "data"))


# ---- D2-D5: one head's attention (online) -----------------------------------------------------
def colour_top(index: data.RunIndex, att: dict, layer: int, scale: str | None) -> tuple[float, str]:
    """(top, what it is the max of) of the shared colour scale of D2-D4: the largest attention value
    outside the CLS->CLS block R1 (whose cells clip) of all heads of the head's layer in this image
    ("layer", the default), of every layer of this image ("image"), or of the head's layer over all
    the run's images ("run": the run's ``peak_attention``, so images compare too); the matrix's own
    max when unknown."""
    maxes = att.get("layer_max")
    if scale == "run" and index.has("peak_attention"):
        peaks = index.values("peak_attention")[:, layer * index.H:(layer + 1) * index.H]
        if np.isfinite(peaks).any():
            return float(np.nanmax(peaks)), SCALE_NAMES["run"]
    if not maxes:
        return float(att["attention"].max()), "this matrix"
    if scale == "image":
        return float(max(maxes)), SCALE_NAMES["image"]
    return float(maxes[layer]), SCALE_NAMES["layer"] + (" (this run has no peak_attention: rebuild it for the run scale)"
                                                       if scale == "run" else "")


def threshold_of(A: np.ndarray, sel: dict) -> tuple[float, str]:
    """(absolute threshold, label) of the state's threshold for this matrix."""
    kind, v = parse_threshold(sel.get("thr"))
    if kind == "q":
        thr = data.threshold_for(A, v)
        return thr, f"top {v * 100:.3g}% ≥ {thr:.3g}"
    return v, f"≥ {v:.3g} (top {float((A >= v).mean()) * 100:.3g}%)"


@online.view(Output("d3-graph", "figure"), Output("d4-graph", "figure"), Output("d5-graph", "figure"),
                  Output("d3-count", "children"), Output("d-msg", "children"), Output("thr-current", "data"),
                  Input("k-image", "data"), Input("k-head", "data"), Input("k-thr", "data"), Input("k-scale", "data"),
                  State("sel", "data"))
def view_d3_d5(_ki, _kh, _kt, _ks, sel):
    """D3-D5 of the selected head; a threshold change alone patches D4's colour scale instead of
    resending its matrix."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), F.empty(""), F.empty(""), "", None, None
    pos, head = selection(index, sel)
    if pos is None or head is None:
        hint = "Select an image (A) and a head (B1, C1 or D1) to see its attention."
        return F.empty(hint), F.empty(""), F.empty(""), "", None, None
    try:
        att = attention(index, pos, head)
    except (OnlineError, HeadScopeError) as err:
        return F.empty("Attention unavailable."), F.empty(""), F.empty(""), "", message(str(err), "danger"), None
    A, T = att["attention"], int(att["num_prefix_tokens"])
    vmax, scale_name = colour_top(index, att, head[0], sel.get("scale"))
    thr, label = threshold_of(A, sel)
    d3, drawn, above, n_cls = F.two_axis(A, T, thr, att["grid"], vmax=vmax)
    count = (f"all {n_cls:,} CLS-related pairs + {drawn:,} patch→patch segments"
             + (f" (the strongest {drawn:,} of {above:,}: capped)" if drawn < above else "")
             + f" · {label} · colour 0–{vmax:.3g}: max of {scale_name}, CLS→CLS clips · hover a token for D2")
    d5 = F.attention_histogram(A, thr, label, binning="linear" if sel.get("bins") == "linear" else "log")
    if changed_inputs() == {"k-thr"}:  # the threshold alone
        d4 = Patch()
        d4["data"][1]["colorscale"] = F.threshold_colorscale(F.ORANGES, thr, vmax)
    else:
        d4 = F.attention_heatmap(A, T, thr, vmax=vmax)
    return d3, d4, d5, count, None, thr


@callbacks.server(Output("sel", "data", allow_duplicate=True), Input("d5-graph", "clickData"),
                  Input("d5-graph", "relayoutData"), State("sel", "data"), prevent_initial_call=True)
def threshold_from_histogram(click, relayout, sel):
    """Dragging D5's line or clicking a bar sets an absolute threshold (the line's value, the bar's left edge)."""
    value = None
    if ctx.triggered[0]["prop_id"].endswith("relayoutData"):
        x = (relayout or {}).get("shapes[0].x0")
        if x is not None:
            value = F.threshold_from_shape_x(float(x), "linear" if sel.get("bins") == "linear" else "log")
    elif click and click.get("points"):
        value = float(click["points"][0]["customdata"][0])
    if value is None:
        return no_update
    p = Patch()
    p["thr"] = f"a{float(f'{min(max(value, 0.0), 1.0):.4g}')}"
    return p


@online.view(Output("d2-images", "children"), Output("d2-msg", "children"),
                  Input("k-image", "data"), Input("k-head", "data"), Input("k-scale", "data"),
                  Input("d3-graph", "hoverData"), Input("d2-own", "value"), State("sel", "data"))
def view_d2(_ki, _kh, _ks, hover, own, sel):
    """The image, the sources attending to a target token, the targets a source token attends to,
    as a colour overlay on the shared scale of D3/D4 (with its colour bar), or with ``own`` (["own"])
    each mask on its own scale (0 to its max, written under it), so that where a token looks stays
    visible when the layer has a stronger head. Hovering a token in D3 picks it (default: CLS for both)."""
    index, err = load(sel)
    if index is None:
        return None, None
    pos, head = selection(index, sel)
    if pos is None or head is None:
        return html.Div("Image masks appear here once an image and a head are selected.",
                        className="text-muted small p-3"), None
    try:
        att = attention(index, pos, head)
    except (OnlineError, HeadScopeError) as err:
        return None, message(str(err), "danger")
    A, T, grid = att["attention"], int(att["num_prefix_tokens"]), tuple(att["grid"])
    vmax, _ = colour_top(index, att, head[0], sel.get("scale"))
    names = F.token_names(A.shape[0], T, grid)
    source, target = 0, 0  # the last hovered token stays picked when the head changes
    cd = (hover or {}).get("points", [{}])[0].get("customdata")
    if isinstance(cd, list) and len(cd) == 2 and 0 <= int(cd[1]) < A.shape[0]:
        if cd[0] == 0:
            source = int(cd[1])
        else:
            target = int(cd[1])
    try:
        image = index.thumbnail(index.image_ids[pos])
    except HeadScopeError as err:
        return None, message(str(err))
    per_mask = "own" in (own or [])
    masks = [(f"attention to {names[target]} (sources)", A[T:, target], target),
             (f"attention from {names[source]} (targets)", A[source, T:], source)]
    tiles = [("image", F.masked_image(image))]
    for caption, weights, token in masks:
        top = float(np.max(weights)) if per_mask else vmax  # masked_image: a 0 top draws no colour
        tiles.append((caption + (f" · 0–{top:.3g}" if per_mask else ""),
                      F.masked_image(image, weights, grid, highlight=None if token < T else token - T, vmax=top)))
    if per_mask:
        ticks, title = ["0", "max/2", "max"], "attention, each mask to its own max (under it)"
    else:
        ticks, title = ["0", f"{vmax / 2:.2g}", f"{vmax:.3g}"], "attention (shared scale of D3/D4)"
    bar = html.Div([html.Div(className="d2-bar", style={"background": F.mask_gradient_css()}),
                    html.Div([html.Span(t) for t in ticks], className="d2-ticks"),
                    html.Div(title, className="d2-bar-title")], className="d2-scale")
    return [html.Figure([html.Img(src=src, className="d2-img"), html.Figcaption(cap)], className="d2-tile",
                        id=f"d2-tile-{i}") for i, (cap, src) in enumerate(tiles)] + [bar], None
