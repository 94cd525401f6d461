"""Explorer: the paper's four linked views on one screen (Fig. 1).

A image overview · B head importance (B1 all heads, B2 pruning modes, B3 top-5) ·
C attention strength (C1 all heads, C2 k-hop vector, C3 entropy over images) ·
D attention pattern (D1 layout of all heads, D2 image masks, D3 two-axis view, D4 heatmap,
D5 histogram + threshold). Every view reads the shared selection store ``sel`` and writes to it.
Cached views only index arrays of app.data.RunIndex; B2/B3 and D2-D5 ask app.online.
"""
from __future__ import annotations

import math

import dash
import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, Patch, State, callback, ctx, dcc, html, no_update

from analysis.errors import HeadScopeError
from analysis.metrics import registry
from analysis.models.pruning import MODE_LABELS

from app import data, figures as F
from analysis.serving.transport import OnlineError
from app.views import card, graph, load, loading, message

dash.register_page(__name__, path="/", name="Explorer", title="HeadScope · Explorer", order=0)

Q_MARKS = {-1: "0.1%", math.log10(0.5): "0.5%", 0: "1%", math.log10(5): "5%", 1: "10%",
           math.log10(50): "50%", 2: "100%"}
DEFAULT_Q = 0.0  # log10 of the threshold in percent: top 1% (the paper's default)
Q_STEP = 0.05


def layout(**_query):
    top = dbc.Row([
        dbc.Col(html.Div(id="sel-summary", className="sel-summary"), md=True),
        dbc.Col(dbc.InputGroup([
            dbc.InputGroupText("image id"),
            dbc.Input(id="image-box", type="number", min=0, step=1, placeholder="e.g. 12", debounce=True,
                      style={"maxWidth": "7rem"}),
            dbc.Button("Go", id="image-go", color="secondary", n_clicks=0),
        ], size="sm"), width="auto"),
        dbc.Col(dbc.InputGroup([
            dbc.InputGroupText("metric"),
            dcc.Dropdown(id="metric", clearable=False, searchable=False, style={"minWidth": "21rem"}),
        ], size="sm", className="flex-nowrap"), width="auto"),
    ], className="g-2 align-items-center mb-2")

    view_a = card("A", "Image overview", [
        graph("a-graph", 400, clear_on_unhover=True),
        dcc.Tooltip(id="a-tooltip", direction="right"),
    ], hint="images laid out by head importance · click, lasso or type an id")

    view_b = card("B", "Head importance", [
        graph("b1-graph", 230),
        dbc.Row([
            dbc.Col([html.Div("B2 · metric under each pruning mode (click a bar for B3)", className="sub-title"),
                     loading([html.Div(id="b2-msg"), graph("b2-graph", 210)])], md=7),
            dbc.Col([html.Div("B3 · top-5 classes under that pruning", className="sub-title"),
                     loading([html.Div(id="b3-msg"), graph("b3-graph", 210)])], md=5),
        ], className="g-1"),
        dcc.Store(id="prune-mode", data=1),
    ], hint="B1: click a head")

    c1_tools = [dcc.Dropdown(id="c1-metric", clearable=False, searchable=False, className="c1-metric",
                             style={"minWidth": "13rem", "fontSize": "0.8rem"})]
    view_c = card("C", "Attention strength", [
        html.Div(id="c-msg"),
        graph("c1-graph", 270),
        html.Div("C2 · k-hop strength of the selected head", className="sub-title"), graph("c2-graph", 200),
        html.Div("C3 · the selected head's C1 property over all images", className="sub-title"),
        graph("c3-graph", 190),
    ], hint="C1: heads by layer and a head property · click a head", tools=c1_tools)

    d1_tools = [
        dbc.RadioItems(id="d1-kind", options=[{"label": "CLS vectors", "value": "cls"},
                                               {"label": "patch latents", "value": "patch"}],
                       value="cls", inline=True, className="small toggle"),
        dbc.RadioItems(id="d1-style", options=[{"label": "density", "value": "density"},
                                                {"label": "points", "value": "points"}],
                       value="density", inline=True, className="small toggle"),
    ]
    view_d = card("D", "Attention pattern", [
        dbc.Row([
            dbc.Col([html.Div(id="d1-msg"), graph("d1-graph", 300), dcc.Store(id="d1-key")], md=6),
            dbc.Col(loading([html.Div(id="d2-msg"), html.Div(id="d2-images", className="d2-images")]), md=6),
        ], className="g-1"),
        loading([
            html.Div(id="d-msg"),
            html.Div([html.Span("D3 · two-axis view ", className="sub-title"),
                      html.Span(id="d3-count", className="d3-count")]),
            graph("d3-graph", 190, clear_on_unhover=False),
            dbc.Row([
                dbc.Col([html.Div("D4 · attention heatmap (row source, column target)", className="sub-title"),
                         graph("d4-graph", 330)], md=6),
                dbc.Col([html.Div("D5 · attention values and the top-q threshold (click a bar or slide)",
                                  className="sub-title"),
                         graph("d5-graph", 250),
                         html.Div([html.Span("threshold: top q =", className="small me-2"),
                                   dcc.Slider(id="q-slider", min=-1, max=2, step=Q_STEP, value=DEFAULT_Q, marks=Q_MARKS,
                                              allow_direct_input=False, updatemode="mouseup",
                                              className="q-slider")], className="q-row")], md=6),
            ], className="g-1"),
        ], "d-loading"),
    ], hint="D1: all heads of all images · click a head", tools=d1_tools)

    return html.Div([
        html.Div(id="run-alert"),
        top,
        dbc.Row([dbc.Col([view_a, view_c], lg=4), dbc.Col([view_b, view_d], lg=8)], className="g-2"),
    ], className="explorer")


# ---- helpers -------------------------------------------------------------------------------
def _selection(index: data.RunIndex, sel: dict):
    """(image position or None, (layer, head) or None) of the selection, validated against the run."""
    pos = index.pos(sel.get("image"))
    hi = index.head_index(sel.get("layer"), sel.get("head"))
    return pos, (None if hi is None else (int(sel["layer"]), int(sel["head"])))


def _image_caption(index: data.RunIndex, pos: int) -> str:
    row = index.images.iloc[pos]
    return f"image {int(row.image_id)} ({index.class_name(row.label)})"


def thumb_url(run: str, image_id) -> str:
    return dash.get_relative_path(f"/thumbs/{run}/{int(image_id)}.png")


def _title(metric: str) -> str:
    return registry.get_metric(metric).title


# ---- selection summary, metric options -------------------------------------------------------
@callback(Output("metric", "options"), Output("metric", "value"), Input("sel", "data"), State("metric", "value"))
def metric_options(sel, current):
    """B1's choice: the importance metrics this run has values for (backbone runs have no prob / jsd)."""
    index, _ = load(sel)
    if index is None or not index.importance:
        return [], None
    # the paper's default (prob); for a backbone its output-level stand-in (emb_dist), as view A uses
    default = next((m for m in ("prob", "emb_dist") if m in index.importance), index.importance[0])
    return data.metric_options(index.importance), current if current in index.importance else default


@callback(Output("c1-metric", "options"), Output("c1-metric", "value"), Input("sel", "data"),
          State("c1-metric", "value"))
def c1_metric_options(sel, current):
    """C1's y axis: any scalar head property of the run (strength entropy by default, as in the
    paper), then the run-level per-head metrics."""
    index, _ = load(sel)
    names = index.properties + index.run_level if index is not None else []
    if not names:
        return [], None
    default = "strength_entropy" if "strength_entropy" in names else names[0]
    return data.metric_options(names), current if current in names else default


@callback(Output("sel-summary", "children"), Output("run-alert", "children"), Input("sel", "data"))
def selection_summary(sel):
    index, err = load(sel)
    if index is None:
        return None, message(err, "danger")
    pos, head = _selection(index, sel)
    notes = []
    if sel.get("image") is not None and pos is None:
        notes.append(f"Image {sel['image']} is not in run {index.name} (ids {index.image_ids.min()}-{index.image_ids.max()}).")
    if sel.get("layer") is not None and head is None:
        notes.append(f"Head ({sel['layer']}, {sel['head']}) does not exist: layers 0-{index.L - 1}, heads 0-{index.H - 1}.")
    model = index.manifest.get("model", {})
    parts = [html.Span(f"{index.name}", className="badge bg-secondary me-2"),
             html.Span(f"{model.get('name', '?')} · {index.n} images · {index.L} layers × {index.H} heads",
                       className="text-muted small me-3")]
    if pos is None:
        parts.append(html.Span("No image selected: views show all images. Click an image in A.", className="small"))
    else:
        row = index.images.iloc[pos]
        parts += [html.Img(src=thumb_url(index.name, row.image_id), className="sel-thumb me-2"),
                  html.Span([html.B(f"image {int(row.image_id)}"), f" · label {index.class_name(row.label)}"
                             f" · predicted {index.class_name(row.pred)}"
                             + (f" · P(true label) = {float(row.prob):.3f}" if row.prob == row.prob else "")], className="small")]
    if head is not None:
        parts.append(html.Span([" · ", html.B(F.head_name(*head))], className="small"))
    return parts, [message(n) for n in notes] or None


# ---- A: image overview -----------------------------------------------------------------------
def _overview_base(index: data.RunIndex):
    names = [index.class_name(c) for c in range(max(int(index.images["label"].max()) + 1, 1))]
    return F.image_overview(index.images["overview_x"].to_numpy(), index.images["overview_y"].to_numpy(),
                            index.images["label"].to_numpy(), index.image_ids, names, uirevision=index.name)


@callback(Output("a-graph", "figure"), Input("sel", "data"))
def view_a(sel):
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run")
    if "overview" in index.missing:
        return F.empty(index.missing["overview"])
    base = index.memo("overview", lambda: _overview_base(index))
    pos, _ = _selection(index, sel)
    if pos is None:
        return base
    ring = F.selected_ring(float(index.images["overview_x"].iat[pos]), float(index.images["overview_y"].iat[pos]))
    ring["showlegend"] = False
    return {"data": base["data"] + [ring], "layout": base["layout"]}


@callback(Output("a-tooltip", "show"), Output("a-tooltip", "bbox"), Output("a-tooltip", "children"),
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


@callback(Output("sel", "data", allow_duplicate=True),
          Input("a-graph", "clickData"), Input("a-graph", "selectedData"), Input("image-go", "n_clicks"),
          Input("image-box", "n_submit"), State("image-box", "value"), prevent_initial_call=True)
def select_image(click, selected, _go, _submit, typed_id):
    """A click, a lasso / box selection (its first image) or the id box selects an image."""
    trig = ctx.triggered_id
    image = None
    if trig == "a-graph" and ctx.triggered[0]["prop_id"].endswith("clickData") and click:
        image = click["points"][0].get("customdata")
    elif trig == "a-graph" and selected and selected.get("points"):
        image = min(p.get("customdata") for p in selected["points"] if p.get("customdata") is not None)
    elif trig in ("image-go", "image-box") and typed_id is not None:
        image = int(typed_id)
    if image is None:
        return no_update
    p = Patch()
    p["image"] = int(image)
    return p


# ---- B: head importance ----------------------------------------------------------------------
@callback(Output("b1-graph", "figure"), Input("sel", "data"), Input("metric", "value"))
def view_b1(sel, metric):
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run")
    if not metric or metric not in index.importance:
        return F.empty(index.missing.get("metrics", "Choose a metric."))
    pos, head = _selection(index, sel)
    values = None if pos is None else index.values(metric)[pos]
    mean, std = index.summary(metric)
    return F.head_importance(index.L, index.H, _title(metric), mean, std, image_values=values, selected=head,
                             image_label=None if pos is None else _image_caption(index, pos))


@callback(Output("sel", "data", allow_duplicate=True),
          Input("b1-graph", "clickData"), Input("c1-graph", "clickData"), Input("d1-graph", "clickData"),
          State("sel", "data"), State("d1-kind", "value"), State("d1-style", "value"), prevent_initial_call=True)
def select_head(b1, c1, d1, sel, kind, style):
    """A click on a head in B1, C1 or D1 selects it (in D1's points mode a background point also
    selects the image it belongs to)."""
    click = {"b1-graph": b1, "c1-graph": c1, "d1-graph": d1}.get(ctx.triggered_id)
    if not click or not click.get("points"):
        return no_update
    pt = click["points"][0]
    p = Patch()
    cd = pt.get("customdata")
    if isinstance(cd, list) and len(cd) == 2:
        p["layer"], p["head"] = int(cd[0]), int(cd[1])
        return p
    if ctx.triggered_id == "d1-graph" and style == "points" and pt.get("curveNumber") == 0:
        index, _ = load(sel)
        if index is None:
            return no_update
        image_pos, hi = divmod(int(pt["pointIndex"]), index.L * index.H)
        p["image"] = int(index.image_ids[image_pos])
        p["layer"], p["head"] = divmod(hi, index.H)
        return p
    return no_update


@callback(Output("b2-graph", "figure"), Output("b3-graph", "figure"), Output("b2-msg", "children"),
          Input("sel", "data"), Input("metric", "value"), Input("prune-mode", "data"))
def view_b2_b3(sel, metric, mode):
    """Partial pruning of the selected head on the selected image (online)."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), F.empty(""), None
    pos, head = _selection(index, sel)
    if pos is None or head is None:
        hint = "Select an image (A) and a head (B1, C1 or D1) to prune it partially."
        return F.empty(hint), F.empty("Top-5 classes appear here."), None
    try:
        res = data.partial_pruning(index.name, int(index.image_ids[pos]), *head)
    except (OnlineError, HeadScopeError) as err:
        return F.empty("Partial pruning unavailable."), F.empty(""), message(str(err), "danger")
    rows = sorted(res["rows"], key=lambda r: r["mode"])
    mode = int(mode) if mode is not None else 1
    if metric not in rows[0]:  # partial pruning gives the exact leave-one-out metrics
        metric = next((m for m in index.importance if m in rows[0]), "emb_dist")
    values = [r.get(metric) for r in rows]
    reference = rows[0].get("prob") if metric == "prob" else None
    b2 = F.pruning_modes(MODE_LABELS, values, _title(metric), selected_mode=mode, reference=reference)
    row = rows[mode] if 0 <= mode < len(rows) else rows[1]
    if not row.get("top5_classes"):
        b3 = F.empty("This model has no classifier head:\nno class probabilities.")
    else:
        label = index.images["label"].iat[pos]
        names = [index.class_name(c) for c in row["top5_classes"]]
        what = "unpruned" if row["mode"] == 0 else f"{row['regions']} of {F.head_name(*head)} pruned"
        b3 = F.top5(names, row["top5_probs"], index.class_name(label), what)
    return b2, b3, None


@callback(Output("prune-mode", "data"), Input("b2-graph", "clickData"), prevent_initial_call=True)
def choose_mode(click):
    if not click or not click.get("points"):
        return no_update
    return int(click["points"][0]["customdata"])


# ---- C: attention strength -------------------------------------------------------------------
@callback(Output("c1-graph", "figure"), Output("c2-graph", "figure"), Output("c3-graph", "figure"),
          Output("c-msg", "children"), Input("sel", "data"), Input("c1-metric", "value"))
def view_c(sel, prop):
    """C1: the chosen head property of every head (the image's, or the mean over images); C2: the
    selected head's k-hop strength; C3: its C1 property over all images (a run-level metric has one
    value per head: C1 shows it for any image, C3 has nothing to show)."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), F.empty(""), F.empty(""), None
    pos, head = _selection(index, sel)
    if prop not in index.properties + index.run_level:
        msg = index.missing.get("properties") if not index.properties else None
        return F.empty(msg or "Choose a head property."), F.empty(""), F.empty(""), message(msg)
    m = registry.get_metric(prop)
    values = index.values(prop) if m.level == "image_head" else None
    if values is None:
        c1 = F.property_overview(index.summary(prop)[0], index.L, index.H, head, "one value per head (run level)",
                                 y_title=m.title, y_range=m.range)
    elif pos is None:
        mean = index.memo(("mean", prop), lambda: index.summary(prop)[0])
        c1 = F.property_overview(mean, index.L, index.H, head, "mean over all images (select an image in A)",
                                 y_title=m.title, y_range=m.range)
    else:
        c1 = F.property_overview(values[pos], index.L, index.H, head, _image_caption(index, pos),
                                 y_title=m.title, y_range=m.range)
    if head is None:
        return c1, F.empty("Click a head to see its k-hop strength."), F.empty("… and its values over all images."), None
    hi = head[0] * index.H + head[1]
    if not index.has("strength"):
        c2 = F.empty(index.missing["strength"])
    elif pos is None:
        c2 = F.strength_bars(index.summary("strength")[0][hi], "mean over all images")
    else:
        c2 = F.strength_bars(index.values("strength")[pos, hi])
    if values is None:
        c3 = F.empty(f"{m.name} is a run-level metric: one value per head, no distribution over images.")
    else:
        current = None if pos is None else float(values[pos, hi])
        c3 = F.distribution(values[:, hi], current, x_title=m.title, x_range=m.range)
    return c1, c2, c3, None


# ---- D1: pattern layout ----------------------------------------------------------------------
@callback(Output("d1-graph", "figure"), Output("d1-key", "data"), Output("d1-msg", "children"),
          Input("sel", "data"), Input("d1-kind", "value"), Input("d1-style", "value"), State("d1-key", "data"))
def view_d1(sel, kind, style, drawn):
    """Background (all heads of all images) is cached per run/kind/style and sent only when it
    changes; a new selection only patches the overlay traces."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), None, None
    if kind not in index.layouts:
        other = "patch" if kind == "cls" else "cls"
        hint = f" Try the {other} layout." if other in index.layouts else ""
        return F.empty(index.missing.get(kind, "No layout.") + hint), None, message(index.missing.get(kind))
    pos, head = _selection(index, sel)
    xy = index.layouts[kind]
    overlay = F.pattern_overlay(
        None if pos is None else xy[pos], index.L, index.H, head,
        None if head is None else xy[:, head[0] * index.H + head[1]],
        None if head is None else f"{F.head_name(*head)} in all images")
    key = f"{index.name}|{kind}|{style}"
    if drawn == key:
        p = Patch()
        for i, trace in enumerate(overlay):
            p["data"][1 + i] = trace
        return p, no_update, None
    background = index.memo(("d1", kind, style), lambda: F.pattern_background(xy, style))
    return F.pattern_layout(background, overlay, kind, uirevision=key), key, None


# ---- D2-D5: one head's attention (online) -----------------------------------------------------
def _attention(index, pos, head):
    return data.attention(index.name, int(index.image_ids[pos]), *head)


@callback(Output("d3-graph", "figure"), Output("d4-graph", "figure"), Output("d5-graph", "figure"),
          Output("d3-count", "children"), Output("d-msg", "children"),
          Input("sel", "data"), Input("q-slider", "value"))
def view_d3_d5(sel, log_q):
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), F.empty(""), F.empty(""), "", None
    pos, head = _selection(index, sel)
    if pos is None or head is None:
        hint = "Select an image (A) and a head (B1, C1 or D1) to see its attention."
        return F.empty(hint), F.empty(""), F.empty(""), "", None
    try:
        att = _attention(index, pos, head)
    except (OnlineError, HeadScopeError) as err:
        return F.empty("Attention unavailable."), F.empty(""), F.empty(""), "", message(str(err), "danger")
    A, T = att["attention"], int(att["num_prefix_tokens"])
    q = 10 ** (DEFAULT_Q if log_q is None else float(log_q)) / 100
    thr = data.threshold_for(A, q)
    d3, drawn, above = F.two_axis(A, T, thr, att["grid"])
    count = f"{drawn:,} segments drawn" + (f" (strongest of {above:,})" if drawn < above else "") + \
        f" · values ≥ {thr:.4g} (top {q * 100:.3g}% of {A.size:,}) · hover a token to update D2"
    return d3, F.attention_heatmap(A, T, thr), F.attention_histogram(A, thr, q), count, None


@callback(Output("q-slider", "value"), Input("d5-graph", "clickData"), State("sel", "data"),
          prevent_initial_call=True)
def threshold_from_histogram(click, sel):
    """Clicking a histogram bar moves the threshold to its left edge (to the nearest slider step)."""
    index, _ = load(sel)
    if not click or index is None:
        return no_update
    pos, head = _selection(index, sel)
    if pos is None or head is None:
        return no_update
    try:
        A = _attention(index, pos, head)["attention"]
    except (OnlineError, HeadScopeError):
        return no_update
    edge = float(click["points"][0]["customdata"])
    q = max(float((A >= edge).mean()), 1e-3)
    log_q = max(-1.0, min(2.0, math.log10(q * 100)))
    return round(round(log_q / Q_STEP) * Q_STEP, 2)  # a value on the slider's steps


@callback(Output("d2-images", "children"), Output("d2-msg", "children"),
          Input("sel", "data"), Input("d3-graph", "hoverData"))
def view_d2(sel, hover):
    """The image, the sources attending to a target token, the targets a source token attends to.
    Hovering a token in D3 picks it (default: CLS for both)."""
    index, err = load(sel)
    if index is None:
        return None, None
    pos, head = _selection(index, sel)
    if pos is None or head is None:
        return html.Div("Image masks appear here once an image and a head are selected.",
                        className="text-muted small p-3"), None
    try:
        att = _attention(index, pos, head)
    except (OnlineError, HeadScopeError) as err:
        return None, message(str(err), "danger")
    A, T, grid = att["attention"], int(att["num_prefix_tokens"]), tuple(att["grid"])
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
    tiles = [
        ("image", F.masked_image(image)),
        (f"attention to {names[target]} (sources)",
         F.masked_image(image, A[T:, target], grid, highlight=None if target < T else target - T)),
        (f"attention from {names[source]} (targets)",
         F.masked_image(image, A[source, T:], grid, highlight=None if source < T else source - T)),
    ]
    return [html.Figure([html.Img(src=src, className="d2-img"), html.Figcaption(cap)], className="d2-tile",
                        id=f"d2-tile-{i}") for i, (cap, src) in enumerate(tiles)], None
