"""Explorer: the paper's four linked views on one screen (Fig. 1).

A image overview · B head importance (B1 all heads, B2 pruning modes, B3 top-5) ·
C attention strength (C1 all heads, C2 k-hop vector, C3 entropy over images) ·
D attention pattern (D1 layout of all heads, D2 image masks, D3 two-axis view, D4 heatmap,
D5 histogram + threshold).

State: the shell's store ``sel`` holds the whole view state (declared in app/state.py) and mirrors the
URL. The controls and ``sel`` are kept in step by one clientside callback; a second one splits
``sel`` into small ``k-*`` stores that change only when their part changes, and every view listens
to just the parts it depends on (a threshold change redraws D3-D5 only, an image change leaves the
D1 background alone, ...). Cached views index arrays of app.data.RunIndex; B2/B3 and D2-D5 ask the
online service, which answers each (image, head) once (its result cache) for all of them.
"""
from __future__ import annotations

import io
import json
import string

import dash
import dash_bootstrap_components as dbc
import flask
import numpy as np
import pandas as pd
from dash import Input, Output, Patch, State, callback, clientside_callback, ctx, dcc, html, no_update

from analysis.errors import HeadScopeError
from analysis.metrics import registry
from analysis.models.pruning import MODE_LABELS
from analysis.safe_text import render_html, write_csv
from analysis.serving.transport import OnlineError

from app import data, figures as F, report
from app.panels import D_PANELS, head_sets, saliency
from app.state import MAX_SET, PARTS, STATE, judge, parse_threshold, selection_query
from app.views import card, graph, graph_config, load, loading, message, overlaid

dash.register_page(__name__, path="/", name="Explorer", title="HeadScope · Explorer", order=0)
head_sets.register()

Q_MARKS = {-1: "0.1%", 0: "1%", 1: "10%", 2: "100%"}
Q_STEP = 0.05
GRAPHS = ("a-graph", "b1-graph", "b2-graph", "b3-graph", "c1-graph", "c2-graph", "c3-graph", "d1-graph",
          "d3-graph", "d4-graph", "d5-graph")
# the right part of view D: the paper's D3-D5 ("pattern") or a panel module (app/panels/__init__.py)
PANEL_LAYOUTS = {"saliency": saliency.panel}
# C2's vector metric when the run has it (else its first vector metric, registry order)
C2_DEFAULT = "strength"
# graph heights in px: the four views fit one 1920x1080 screen (see assets/headscope.css)
HEIGHT = {"a": 352, "b1": 190, "b2": 150, "c1": 168, "c2": 160, "d1": 372, "d3": 140, "d4": 226}


def layout(**query):
    tool = {"size": "sm", "className": "flex-nowrap"}
    top = dbc.Row([
        dbc.Col(html.Div([html.Div(id="sel-summary", className="sel-summary"), html.Div(id="pick-note", className="pick-note")]),
                md=True),
        dbc.Col(dbc.InputGroup([
            dbc.InputGroupText("image"),
            dbc.Input(id="image-box", type="number", min=0, step=1, placeholder="id", debounce=True, style={"width": "4.5rem"}),
            dbc.InputGroupText("layer"),
            dbc.Input(id="goto-layer", type="number", min=0, step=1, placeholder="l", style={"width": "3.6rem"}),
            dbc.InputGroupText("head"),
            dbc.Input(id="goto-head", type="number", min=0, step=1, placeholder="h", style={"width": "3.6rem"}),
            dbc.Button("Go", id="image-go", color="secondary", n_clicks=0),
        ], **tool), width="auto"),
        dbc.Col(dbc.InputGroup([
            dbc.InputGroupText("metric"),
            dcc.Dropdown(id="metric", clearable=False, searchable=False, style={"minWidth": "17rem"}),
        ], **tool), width="auto"),
        dbc.Col(html.Div([
            dbc.RadioItems(id="fig-format", options=[{"label": "PNG", "value": "png"}, {"label": "SVG", "value": "svg"}],
                           value="png", inline=True, className="small toggle", inputClassName="me-1"),
            dbc.DropdownMenu([
                dbc.DropdownMenuItem("head table · CSV", id="dl-heads-csv"),
                dbc.DropdownMenuItem("head table · Parquet", id="dl-heads-parquet"),
                dbc.DropdownMenuItem("attention matrix · CSV", id="dl-att-csv"),
                dbc.DropdownMenuItem("attention matrix · Parquet", id="dl-att-parquet"),
                dbc.DropdownMenuItem("B2/B3 pruning modes · CSV", id="dl-prune-csv"),
                dbc.DropdownMenuItem(divider=True),
                dbc.DropdownMenuItem("report of this head · HTML", id="dl-report"),
            ], label="Export", size="sm", color="secondary", id="export-menu"),
            dcc.Download(id="download"),
        ], className="d-flex align-items-center gap-2", title="figure format of the camera button of every plot"),
            width="auto"),
    ], className="g-2 align-items-center mb-1 explorer-top")

    a_tools = [dbc.Select(id="a-color", size="sm", className="a-color", value="class",
                          options=[{"label": f"colour: {v}", "value": k} for k, v in F.COLOR_BY.items()]),
               dbc.Button("clear set", id="set-clear", size="sm", color="link", className="p-0 small", n_clicks=0)]
    view_a = card("A", "Image overview", [
        overlaid("a", HEIGHT["a"], clear_on_unhover=True),
        html.Div(id="a-legend", className="a-legend"),
        dcc.Store(id="a-key"), dcc.Store(id="a-selection"), dcc.Store(id="a-drawn"),
        dcc.Tooltip(id="a-tooltip", direction="right"),
    ], hint="click · lasso/box = a set", tools=a_tools, class_name="view-a")

    view_b = card("B", "Head importance", [
        graph("b1-graph", HEIGHT["b1"]),
        head_sets.bottom(dbc.Row([
            dbc.Col([html.Div("B2 · metric under each pruning mode (click a bar for B3)", className="sub-title"),
                     loading([html.Div(id="b2-msg"), graph("b2-graph", HEIGHT["b2"])])], width=7),
            dbc.Col([html.Div("B3 · top-5 classes under that pruning", className="sub-title"),
                     loading([graph("b3-graph", HEIGHT["b2"])])], width=5),
        ], className="g-1"), query),
    ], hint="B1: click a head · shift-click: add to the set",
        tools=[*head_sets.tools(), dbc.Select(id="band-scope", size="sm", value="set", className="band-scope",
                                              options=[{"label": f"band & C3: {v}", "value": k}
                                                       for k, v in SCOPES.items()])], class_name="view-b")

    c1_tools = [dcc.Dropdown(id="c1-metric", clearable=False, searchable=False, className="c1-metric",
                             style={"minWidth": "13rem", "fontSize": "0.8rem"})]
    view_c = card("C", "Attention strength", [
        html.Div(id="c-msg"),
        graph("c1-graph", HEIGHT["c1"]),
        dbc.Row([
            dbc.Col([html.Div([html.Div(f"C2 · {registry.get_metric(C2_DEFAULT).label} of the head", id="c2-title",
                                        className="sub-title"),
                               # C2 draws any vector metric of the run: a choice when it has more than one
                               html.Div(dcc.Dropdown(id="c2-metric", clearable=False, searchable=False, className="c2-metric",
                                                     style={"minWidth": "9rem", "fontSize": "0.75rem"}),
                                        id="c2-choice", style={"display": "none"})],
                              className="d-flex align-items-center gap-2"),
                     graph("c2-graph", HEIGHT["c2"])], width=6),
            dbc.Col([html.Div("C3 · the head's C1 property over images", className="sub-title"), graph("c3-graph", HEIGHT["c2"])], width=6),
        ], className="g-1"),
    ], hint="C1: heads by layer and a head property · click a head", tools=c1_tools, class_name="view-c")

    d_tools = [
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
    view_d = card("D", "Attention pattern", [
        dbc.Row([
            dbc.Col([html.Div(id="d1-msg"),
                     overlaid("d1", HEIGHT["d1"]),
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
                *[html.Div(PANEL_LAYOUTS[key](), id=f"d-{key}", style={"display": "none"})
                  for key in D_PANELS if key != "pattern"],
            ], className="d3-col"),
        ], className="g-1"),
    ], hint="D1: all heads of all images · click a head", tools=d_tools, class_name="view-d")

    keys = [dcc.Store(id=f"k-{k}") for k in PARTS]
    return html.Div([
        html.Div(id="run-alert"),
        top,
        html.Div([view_a, view_b, view_c, view_d], className="explorer-grid"),
        *keys, dcc.Store(id="ctl-sync"), dcc.Store(id="head-click"), dcc.Store(id="head-pick"),
    ], className="explorer", id="explorer-root")


clientside_callback(
    """
    function(panel) {  // outputs: D3's title, then d-<key> for every key of D_PANELS
        const keys = %s, hide = {display: 'none'};
        return [panel === 'pattern' ? {} : hide, ...keys.map(k => k === panel ? {} : hide)];
    }
    """ % json.dumps(list(D_PANELS)),
    Output("d3-title", "style"), *[Output(f"d-{key}", "style") for key in D_PANELS], Input("d-panel", "value"),
    prevent_initial_call=True,
)


# ---- state: controls <-> sel, sel -> the parts views listen to -----------------------------------
# sel -> controls goes through dash_clientside.set_props (not a declared Output), so the two
# directions form no dependency cycle; a control set from sel computes the same sel and stops.
clientside_callback(
    """
    function(sel) {
        const C = window.dash_clientside, s = sel || {}, D = window.hsUrl.defaults();  // app/state.py
        const t = s.thr || D.thr, kind = t[0] === 'a' ? 'a' : 'q', v = parseFloat(t.slice(1));
        const want = {'metric': s.metric || null, 'a-color': s.color || D.color, 'd1-kind': s.d1 || D.d1,
                      'd1-style': s.d1s || D.d1s, 'scale': s.scale || D.scale, 'bins': s.bins || D.bins,
                      'thr-kind': kind, 'band-scope': s.scope || D.scope};
        if (isFinite(v) && kind === 'q' && v > 0) { want['q-slider'] = Math.max(-1, Math.min(2, Math.log10(v))); }
        if (isFinite(v) && kind === 'a') { want['thr-abs'] = v; }
        // only what changed since the last call on this page (each set_props re-renders the page)
        const root = document.getElementById('explorer-root');
        const last = root && root === C.hs_ctl_el ? C.hs_ctl : {};
        for (const [id, value] of Object.entries(want)) {
            if (last[id] !== value && document.getElementById(id)) { C.set_props(id, {value: value}); }
        }
        C.hs_ctl = want;
        C.hs_ctl_el = root;
        return C.no_update;
    }
    """,
    Output("ctl-sync", "data"), Input("sel", "data"),
)

clientside_callback(
    """
    function(metric, color, d1, d1s, scale, bins, scope, kind, logq, absv, sel, current) {
        const C = window.dash_clientside, nu = C.no_update;
        const trig = (C.callback_context.triggered || []).map(t => t.prop_id.split('.')[0]);
        if (!trig.length) { return nu; }
        const id = trig[0], out = Object.assign({}, sel || {}), D = window.hsUrl.defaults();  // app/state.py
        const dflt = (v, k) => (v === D[k] ? null : v);
        if (id === 'metric' && metric) { out.metric = metric; }  // null: the menu before its options came
        if (id === 'a-color') { out.color = dflt(color, 'color'); }
        if (id === 'd1-kind') { out.d1 = dflt(d1, 'd1'); }
        if (id === 'd1-style') { out.d1s = dflt(d1s, 'd1s'); }
        if (id === 'scale') { out.scale = dflt(scale, 'scale'); }
        if (id === 'bins') { out.bins = dflt(bins, 'bins'); }
        if (id === 'band-scope') { out.scope = dflt(scope, 'scope'); }
        const qthr = () => 'q' + parseFloat(Math.pow(10, logq).toPrecision(3));
        const athr = () => {
            const v = (absv !== null && absv !== undefined && absv !== '') ? Number(absv) : current;
            return (v === null || v === undefined || !isFinite(v)) ? null : 'a' + parseFloat(Number(v).toPrecision(4));
        };
        const was = (sel && sel.thr) || D.thr;
        if (id === 'q-slider' && kind === 'q') { out.thr = qthr(); }
        if (id === 'thr-abs' && kind === 'a') { out.thr = athr() || was; }
        if (id === 'thr-kind' && kind !== was[0]) { out.thr = kind === 'q' ? qthr() : (athr() || was); }
        if (out.thr === D.thr) { out.thr = null; }
        const norm = o => JSON.stringify(Object.keys(o).sort().map(k => [k, o[k] === undefined ? null : o[k]]));
        return norm(out) === norm(sel || {}) ? nu : out;
    }
    """,
    Output("sel", "data", allow_duplicate=True),
    Input("metric", "value"), Input("a-color", "value"), Input("d1-kind", "value"), Input("d1-style", "value"),
    Input("scale", "value"), Input("bins", "value"), Input("band-scope", "value"), Input("thr-kind", "value"),
    Input("q-slider", "value"),
    Input("thr-abs", "value"), State("sel", "data"), State("thr-current", "data"),
    prevent_initial_call=True,
)

clientside_callback(
    """
    function(sel) {
        const C = window.dash_clientside, parts = window.hsUrl.parts(sel);  // app/state.py PARTS
        // the page's stores are new after each visit of the page: compare with what they hold now
        const root = document.getElementById('explorer-root');
        const held = C.hs_parts && root === C.hs_parts_el ? C.hs_parts : [];
        C.hs_parts = parts;
        C.hs_parts_el = root;
        return parts.map((p, i) => JSON.stringify(p) === JSON.stringify(held[i]) ? C.no_update : p);
    }
    """,
    *[Output(f"k-{k}", "data") for k in PARTS],
    Input("sel", "data"),
)


# ---- helpers -------------------------------------------------------------------------------
def _selection(index: data.RunIndex, sel: dict):
    """(image position or None, (layer, head) or None) of the selection, validated against the run."""
    pos = index.pos(sel.get("image"))
    hi = index.head_index(sel.get("layer"), sel.get("head"))
    return pos, (None if hi is None else (int(sel["layer"]), int(sel["head"])))


def _set_positions(index: data.RunIndex, sel: dict) -> np.ndarray | None:
    """Positions of the selected set's images in the run (None when there is no set)."""
    ids = sel.get("set") or []
    pos = [p for p in (index.pos(i) for i in ids) if p is not None]
    return np.asarray(sorted(pos), int) if pos else None


SCOPES = {"set": "all images (or the lasso set)", "class": "the image's class", "wrong": "mispredicted images"}


def _scope_subset(index: data.RunIndex, sel: dict) -> tuple[np.ndarray, str] | None:
    """(positions, name) of the selected image's class or of the mispredicted images when the
    state's ``scope`` asks for one and the run can answer it; else None."""
    imgs, scope = index.images, sel.get("scope")
    if scope == "class" and sel.get("image") is not None and index.pos(sel["image"]) is not None:
        label = imgs["label"].iat[index.pos(sel["image"])]
        return np.flatnonzero((imgs["label"] == label).to_numpy()), f"class {index.class_name(label)}"
    if scope == "wrong" and index.has_classifier:
        return np.flatnonzero((imgs["pred"] != imgs["label"]).to_numpy()), "mispredicted"
    return None


def _scope_positions(index: data.RunIndex, sel: dict) -> tuple[np.ndarray | None, str]:
    """(positions, name) of the images B1's band, C3's second area and D1's selected head are
    restricted to: the scope's subset (``_scope_subset``), else the lasso set (None: no set)."""
    return _scope_subset(index, sel) or (_set_positions(index, sel), "the set")


def _metric(index: data.RunIndex, sel: dict) -> str | None:
    """The chosen metric, or the run's default (prob; emb_dist for a backbone, as view A uses)."""
    if not index.importance:
        return None
    if sel.get("metric") in index.importance:
        return sel["metric"]
    return next((m for m in ("prob", "emb_dist") if m in index.importance), index.importance[0])


def _mode(sel: dict) -> int:
    m = sel.get("mode")
    return int(m) if m is not None and 0 <= int(m) < len(MODE_LABELS) else 1


def _triggered():
    """The id of the input that triggered the running callback (None outside one, e.g. the report)."""
    try:
        return ctx.triggered_id
    except Exception:
        return None


def _image_caption(index: data.RunIndex, pos: int) -> str:
    row = index.images.iloc[pos]
    return f"image {int(row.image_id)} ({index.class_name(row.label)})"


def thumb_url(run: str, image_id) -> str:
    return dash.get_relative_path(f"/thumbs/{run}/{int(image_id)}.png")


def _title(metric: str) -> str:
    return registry.get_metric(metric).title


# ---- selection summary, metric options, export format ----------------------------------------------
@callback(Output("metric", "options"), Output("metric", "placeholder"), Input("k-run", "data"), State("sel", "data"))
def metric_options(_k, sel):
    """B1's choice: the importance metrics this run has values for (backbone runs have no prob / jsd);
    the default as placeholder."""
    index, _ = load(sel)
    if index is None or not index.importance:
        return [], "no metrics"
    if sel.get("metric") in index.importance:  # the state's metric, once the menu has its options
        dash.set_props("metric", {"value": sel["metric"]})
    default = _metric(index, {})
    return data.metric_options(index.importance), registry.get_metric(default).option


@callback(Output("c1-metric", "options"), Output("c1-metric", "value"), Input("k-run", "data"),
          State("sel", "data"), State("c1-metric", "value"))
def c1_metric_options(_k, sel, current):
    """C1's y axis: any scalar head property of the run (strength entropy by default, as in the
    paper), then the run-level per-head metrics."""
    index, _ = load(sel)
    names = index.properties + index.run_level if index is not None else []
    if not names:
        return [], None
    default = "strength_entropy" if "strength_entropy" in names else names[0]
    return data.metric_options(names), current if current in names else default


def _vector(names: list[str], current=None) -> str | None:
    """C2's vector metric: ``current`` when the run has it, else C2_DEFAULT, else the run's first."""
    if current in names:
        return current
    return C2_DEFAULT if C2_DEFAULT in names else (names[0] if names else None)


@callback(Output("c2-metric", "options"), Output("c2-metric", "value"), Output("c2-choice", "style"),
          Input("k-run", "data"), State("sel", "data"), State("c2-metric", "value"))
def c2_metric_options(_k, sel, current):
    """C2's profile: any vector metric of the run (registry); the choice shows when it has more than one."""
    index, _ = load(sel)
    names = index.vectors if index is not None else []
    options = [{"label": registry.get_metric(n).label, "value": n, "title": registry.get_metric(n).meaning} for n in names]
    return options, _vector(names, current), ({} if len(names) > 1 else {"display": "none"})


@callback(Output("c2-title", "children"), Input("c2-metric", "value"), prevent_initial_call=True)
def c2_title(vector):
    return f"C2 · {registry.get_metric(vector).label} of the head" if vector else no_update


def d1_color_options(categories) -> list[dict]:
    """D1's colourings: by layer, and by each registered category metric (its registry label); one the
    run lacks says why when chosen (as "by pattern" does for a run built before the pattern labels)."""
    return [{"label": "by layer", "value": "layer"}] + [{"label": f"by {m.label}", "value": m.name} for m in categories]


@callback(*[Output(g, "config") for g in GRAPHS], Input("fig-format", "value"))
def figure_format(fmt):
    """Every plot's camera button exports at publication size in the chosen format; D5's threshold
    line can be dragged (plotly's shapePosition edits: relayoutData ``shapes[0].x0``)."""
    return [dict(graph_config(g, fmt), **({"edits": {"shapePosition": True}} if g == "d5-graph" else {})) for g in GRAPHS]


@callback(Output("sel-summary", "children"), Output("run-alert", "children"),
          Input("k-image", "data"), Input("k-head", "data"), Input("k-set", "data"), State("sel", "data"))
def selection_summary(_image, _head, _set, sel):
    """The header: the run, the image, the head and the set (not redrawn for a threshold, a metric...)."""
    index, err = load(sel)
    if index is None:
        return None, message(err, "danger")
    pos, head = _selection(index, sel)
    _, notes = judge(sel, index.facts)  # what the run lacks (a URL's were dropped by parse_url)
    model = index.manifest.get("model", {})
    parts = [html.Span(f"{index.name}", className="badge bg-secondary me-2"),
             html.Span(f"{model.get('name', '?')} · {index.n} images · {index.L} layers × {index.H} heads",
                       className="text-muted small me-3 sel-run")]
    # one line that never wraps (the four views keep one 1920x1080 screen): the image and the head
    # first, the rest cut with an ellipsis where the line is too short (the whole text on hover)
    head_part = [html.B(F.head_name(*head))] if head is not None else []
    if pos is None:
        text = [*head_part, (" · " if head_part else "") + "No image selected: views show all images. Click an image in A."]
    else:
        row = index.images.iloc[pos]
        parts.append(html.Img(src=thumb_url(index.name, row.image_id), className="sel-thumb me-2"))
        text = [html.B(f"image {int(row.image_id)}"), *([" · ", *head_part] if head_part else []),
                f" · label {index.class_name(row.label)} · predicted {index.class_name(row.pred)}"
                + (f" · P(true label) = {float(row.prob):.3f}" if row.prob == row.prob else "")]
    parts.append(html.Span(text, className="small sel-text",
                           title="".join(t if isinstance(t, str) else t.children for t in text)))
    members = _set_positions(index, sel)
    if members is not None:
        parts.append(html.Span(f" · set of {len(members)} images (B1 band, C3, D1)", className="small set-badge ms-2"))
    return parts, [message(n) for n in notes] or None


# ---- A: image overview -----------------------------------------------------------------------
def _overview(index: data.RunIndex, sel: dict):
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
        _, head = _selection(index, sel)
        metric = _metric(index, sel)
        if head is None or metric is None:
            color = "class"
        else:
            kw = {"values": index.values(metric)[:, head[0] * index.H + head[1]],
                  "value_label": f"{metric} of {F.head_name(*head)}"}
    return F.image_overview(imgs["overview_x"].to_numpy(), imgs["overview_y"].to_numpy(), imgs["label"].to_numpy(),
                            index.image_ids, names, uirevision=index.name, color_by=color, **kw)


def _legend(fig: dict):
    items = F.legend_items(fig)
    if not items:
        return None
    glyph = {"circle": "●", "square": "■", "diamond": "◆", "triangle-up": "▲", "x": "✕", "cross": "✚",
             "triangle-down": "▼", "star": "★"}
    return [html.Span([html.Span(glyph.get(sym, "●"), style={"color": col}, className="me-1"), name], className="a-chip",
                      title=name) for name, col, sym in items]


@callback(Output("a-graph", "figure"), Output("a-legend", "children"), Output("a-selection", "data"),
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
    pos, _ = _selection(index, sel)
    members = _set_positions(index, sel)
    x, y = index.images["overview_x"].to_numpy(), index.images["overview_y"].to_numpy()
    layer = F.overview_selection(x, y, pos, members)
    drawn_key = f"{index.name}#{index.stamp}|{'|'.join(map(str, key))}"
    if drawn == drawn_key:
        return no_update, no_update, layer, no_update
    base = index.memo(key, lambda: _overview(index, sel))
    return base, _legend(base), layer, drawn_key


clientside_callback("function(traces) { return window.dash_clientside.overlay.draw('a', traces); }",
                    Output("a-drawn", "data"), Input("a-selection", "data"))


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


# A click in A selects that image in the browser (no round trip before the views update)
clientside_callback(
    """
    function(click, sel) {
        const nu = window.dash_clientside.no_update;
        const id = click && click.points && click.points.length ? click.points[0].customdata : null;
        return Number.isInteger(id) && id !== (sel || {}).image ? Object.assign({}, sel, {image: id}) : nu;
    }
    """,
    Output("sel", "data", allow_duplicate=True), Input("a-graph", "clickData"), State("sel", "data"),
    prevent_initial_call=True,
)


@callback(Output("sel", "data", allow_duplicate=True),
          Input("a-graph", "selectedData"), Input("image-go", "n_clicks"),
          Input("image-box", "n_submit"), Input("set-clear", "n_clicks"),
          State("image-box", "value"), State("goto-layer", "value"), State("goto-head", "value"), prevent_initial_call=True)
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


# ---- B: head importance ----------------------------------------------------------------------
@callback(Output("b1-graph", "figure"), Input("k-image", "data"), Input("k-head", "data"), Input("k-metric", "data"),
          Input("k-set", "data"), Input("k-heads", "data"), Input("b1-overlay", "value"), State("sel", "data"))
def view_b1(_ki, _kh, _km, _ks, _khs, overlay, sel):
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run")
    metric = _metric(index, sel)
    if metric is None:
        return F.empty(index.missing.get("metrics", "Choose a metric."))
    pos, head = _selection(index, sel)
    values = None if pos is None else index.values(metric)[pos]
    members, name = _scope_positions(index, sel)
    if members is None or len(members) < 2:
        (mean, std), band = index.summary(metric), "mean over images"
        if members is not None:  # too few for a band: say how many
            band += f" ({name}: {len(members)} image{'s' if len(members) != 1 else ''}, no band)"
    else:
        sub = index.values(metric)[members]
        mean, std, band = np.nanmean(sub, 0), np.nanstd(sub, 0), f"mean over {name} ({len(members)})"
    return F.head_importance(index.L, index.H, _title(metric), mean, std, image_values=values, selected=head,
                             image_label=None if pos is None else _image_caption(index, pos),
                             value_range=registry.get_metric(metric).range or (None, None), band_label=band,
                             **head_sets.b1_extras(index, metric, pos, overlay, sel.get("heads")))


# A click on a head in B1, C1 or D1 on a zoomed (or panned) graph is held until plotly's
# double-click delay has passed since its mousedown and dropped when it was the start of a
# double-click, which resets the zoom and nothing else (plotly holds legend clicks the same way);
# assets/explorer.js remembers each graph's last two mousedowns. On a graph that is not zoomed a
# double-click resets nothing (hsDoubleClickMatters), so a click there is taken at once, and a
# double-click selects the head as a click does. A head of B1 / C1 ([layer, head]) is set in the
# browser: at once into ``sel``; after a hold through ``head-pick``, on the state as it is then. A
# point of D1's background ([image id, layer, head]: ``head-click``) goes to select_head on the
# server. During a hold the server computes the head's online results (assets/explorer.js hsWarm).
clientside_callback(
    """
    function(b1, c1, d1, sel) {
        const C = window.dash_clientside, nu = C.no_update, id = C.callback_context.triggered_id;
        const none = [nu, nu, nu, nu], click = {'b1-graph': b1, 'c1-graph': c1, 'd1-graph': d1}[id];
        if (!click || !click.points || !click.points.length) { return none; }
        const cd = click.points[0].customdata, head = Array.isArray(cd) && (cd.length === 2 || cd.length === 3);
        const gd = document.querySelector('#' + id + ' .js-plotly-plot');
        const delay = (gd && gd._context && gd._context.doubleClickDelay) || 300;
        const ours = e => e && e.id === id && Date.now() - e.t < 5000;  // this click's mousedown, or the next
        const twice = e => ours(e) && e.t - e.prev < delay;  // a mousedown soon after another: a double-click
        const d = ours(window.hsDown) ? window.hsDown : {t: Date.now(), zoomed: window.hsDoubleClickMatters(gd), prev: -Infinity};
        if (!head || (twice(d) && d.prevZoomed)) { return none; }  // a contour, the colour bar; a zoom reset
        if (!d.zoomed || twice(d)) {  // not zoomed: taken at once (a double-click there is a click)
            return cd.length === 2 ? [nu, nu, Object.assign({}, sel, {layer: cd[0], head: cd[1]}), null] : [nu, cd, nu, nu];
        }
        window.hsWarm(sel, cd);
        const held = cd.length === 2 ? [cd, nu, nu, nu] : [nu, cd, nu, nu];
        return new Promise(resolve => setTimeout(() => resolve(twice(window.hsDown) ? none : held),
                                                 Math.max(0, d.t + delay - Date.now())));
    }
    """,
    Output("head-pick", "data"), Output("head-click", "data"),
    Output("sel", "data", allow_duplicate=True), Output("pick-note", "children", allow_duplicate=True),
    Input("b1-graph", "clickData"), Input("c1-graph", "clickData"), Input("d1-graph", "clickData"),
    State("sel", "data"), prevent_initial_call=True,
)
clientside_callback(
    """
    function(pick, sel) {
        const nu = window.dash_clientside.no_update;  // Dash calls it once when the page mounts, with no pick
        return Array.isArray(pick) ? [Object.assign({}, sel, {layer: pick[0], head: pick[1]}), null] : [nu, nu];
    }
    """,
    Output("sel", "data", allow_duplicate=True), Output("pick-note", "children", allow_duplicate=True),
    Input("head-pick", "data"), State("sel", "data"), prevent_initial_call=True,
)


@callback(Output("sel", "data", allow_duplicate=True), Output("pick-note", "children"),
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


def _pruning(index, pos, head) -> list[dict]:
    res = data.partial_pruning(index.name, int(index.image_ids[pos]), *head)
    return sorted(res["rows"], key=lambda r: r["mode"])


@callback(Output("b2-graph", "figure"), Output("b3-graph", "figure"), Output("b2-msg", "children"),
          Input("k-image", "data"), Input("k-head", "data"), Input("k-metric", "data"), Input("k-mode", "data"),
          State("sel", "data"))
def view_b2_b3(_ki, _kh, _km, _kmode, sel):
    """Partial pruning of the selected head on the selected image (online, cached per (image, head))."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), F.empty(""), None
    pos, head = _selection(index, sel)
    if pos is None or head is None:
        hint = "Select an image (A) and a head (B1, C1 or D1) to prune it partially."
        return F.empty(hint), F.empty("Top-5 classes appear here."), None
    try:
        rows = _pruning(index, pos, head)
    except (OnlineError, HeadScopeError) as err:
        return F.empty("Partial pruning unavailable."), F.empty(""), message(str(err), "danger")
    mode = _mode(sel)
    metric = _metric(index, sel)
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


@callback(Output("sel", "data", allow_duplicate=True), Input("b2-graph", "clickData"), prevent_initial_call=True)
def choose_mode(click):
    if not click or not click.get("points"):
        return no_update
    p = Patch()
    p["mode"] = int(click["points"][0]["customdata"])
    return p


# ---- C: attention strength -------------------------------------------------------------------
@callback(Output("c1-graph", "figure"), Output("c2-graph", "figure"), Output("c3-graph", "figure"),
          Output("c-msg", "children"), Input("k-image", "data"), Input("k-head", "data"), Input("k-set", "data"),
          Input("c1-metric", "value"), State("sel", "data"), State("c2-metric", "value"))
def view_c(_ki, _kh, _ks, prop, sel, vector=None):
    """C1: the chosen head property of every head (the image's, or the mean over images); C2: the
    selected head's vector metric ``vector`` (the k-hop strength by default; any vector metric of the
    run, titles from the registry); C3: its C1 property over all images and over the selected set
    (a run-level metric has one value per head: C1 shows it for any image, C3 has nothing to show)."""
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
    c2 = _profile(index, pos, head, vector)
    if head is None:
        return c1, c2, F.empty("… and its values over all images."), None
    hi = head[0] * index.H + head[1]
    if values is None:
        c3 = F.empty(f"{m.name} is a run-level metric: one value per head, no distribution over images.")
    else:
        current = None if pos is None else float(values[pos, hi])
        subset, name = _scope_positions(index, sel)
        c3 = F.distribution(values[:, hi], current, x_title=m.title, x_range=m.range, subset=subset, subset_label=name)
    return c1, c2, c3, None


def _profile(index: data.RunIndex, pos, head, vector) -> dict:
    """C2: the head's vector metric ``vector`` (``_vector``'s choice; axis title from the registry) on
    the image at ``pos``, or its mean over all images."""
    vector = _vector(index.vectors, vector)
    v = None if vector is None else registry.get_metric(vector)
    if head is None:
        return F.empty(f"Click a head to see its {v.label if v else 'vector metric'}.")
    if v is None:
        return F.empty("This run has no vector metric (e.g. the k-hop strength, column strength).")
    hi = head[0] * index.H + head[1]
    x_title, hover = F.VECTOR_INDEX.get(vector, ("entry k", "k"))
    profile = index.summary(vector)[0][hi] if pos is None else index.values(vector)[pos, hi]
    return F.vector_bars(profile, "mean over all images" if pos is None else None, v.title, x_title, hover)


@callback(Output("c2-graph", "figure", allow_duplicate=True), Input("c2-metric", "value"), State("sel", "data"),
          prevent_initial_call=True)
def view_c2(vector, sel):
    """C2 alone when its vector metric is changed (view_c draws it with the rest of C otherwise)."""
    index, _ = load(sel)
    if index is None:
        return no_update
    return _profile(index, *_selection(index, sel), vector)


# ---- D1: pattern layout ----------------------------------------------------------------------
@callback(Output("d1-graph", "figure"), Output("d1-selection", "data"), Output("d1-key", "data"),
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
    pos, head = _selection(index, sel)
    xy = index.layouts[kind]
    # the background draws only the scope's subset (class / mispredicted) when it has images; a
    # lasso set only restricts the selected head's points, over the whole background
    members, name = _scope_positions(index, sel)
    subset = _scope_subset(index, sel)
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
    overlay = F.pattern_overlay(None if pos is None else xy[pos], index.L, index.H, head, head_xy, head_label)
    key = f"{index.name}#{index.stamp}|{kind}|{style}|{category or 'layer'}|{scope}"
    if drawn == key:
        return no_update, overlay, no_update, note
    background = index.memo(("d1", kind, style, category, scope), lambda: F.pattern_background(
        xy[rows], style, index.H, index.image_ids[rows],
        patterns=None if category is None else index.values(category)[rows],
        label=None if category is None else registry.get_metric(category).label,
        colours=F.CATEGORY_COLOURS.get(category)))
    return F.pattern_layout(background, kind, uirevision=key), overlay, key, note


clientside_callback("function(traces) { return window.dash_clientside.overlay.draw('d1', traces); }",
                    Output("d1-drawn", "data"), Input("d1-selection", "data"))


# ---- D2-D5: one head's attention (online) -----------------------------------------------------
def _attention(index, pos, head) -> dict:
    return data.attention(index.name, int(index.image_ids[pos]), *head)


SCALE_NAMES = {"layer": "this layer of this image", "image": "all layers of this image",
               "run": "this layer over the run's images"}


def _vmax(index: data.RunIndex, att: dict, layer: int, scale: str | None) -> tuple[float, str]:
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


def _threshold(A: np.ndarray, sel: dict) -> tuple[float, str]:
    """(absolute threshold, label) of the state's threshold for this matrix."""
    kind, v = parse_threshold(sel.get("thr"))
    if kind == "q":
        thr = data.threshold_for(A, v)
        return thr, f"top {v * 100:.3g}% ≥ {thr:.3g}"
    return v, f"≥ {v:.3g} (top {float((A >= v).mean()) * 100:.3g}%)"


@callback(Output("d3-graph", "figure"), Output("d4-graph", "figure"), Output("d5-graph", "figure"),
          Output("d3-count", "children"), Output("d-msg", "children"), Output("thr-current", "data"),
          Input("k-image", "data"), Input("k-head", "data"), Input("k-thr", "data"), Input("k-scale", "data"),
          State("sel", "data"))
def view_d3_d5(_ki, _kh, _kt, _ks, sel):
    """D3-D5 of the selected head; a threshold change alone patches D4's colour scale instead of
    resending its matrix."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), F.empty(""), F.empty(""), "", None, None
    pos, head = _selection(index, sel)
    if pos is None or head is None:
        hint = "Select an image (A) and a head (B1, C1 or D1) to see its attention."
        return F.empty(hint), F.empty(""), F.empty(""), "", None, None
    try:
        att = _attention(index, pos, head)
    except (OnlineError, HeadScopeError) as err:
        return F.empty("Attention unavailable."), F.empty(""), F.empty(""), "", message(str(err), "danger"), None
    A, T = att["attention"], int(att["num_prefix_tokens"])
    vmax, scale_name = _vmax(index, att, head[0], sel.get("scale"))
    thr, label = _threshold(A, sel)
    d3, drawn, above, n_cls = F.two_axis(A, T, thr, att["grid"], vmax=vmax)
    count = (f"all {n_cls:,} CLS-related pairs + {drawn:,} patch→patch segments"
             + (f" (the strongest {drawn:,} of {above:,}: capped)" if drawn < above else "")
             + f" · {label} · colour 0–{vmax:.3g}: max of {scale_name}, CLS→CLS clips · hover a token for D2")
    d5 = F.attention_histogram(A, thr, label, binning="linear" if sel.get("bins") == "linear" else "log")
    if _triggered() == "k-thr":
        d4 = Patch()
        d4["data"][1]["colorscale"] = F.threshold_colorscale(F.ORANGES, thr, vmax)
    else:
        d4 = F.attention_heatmap(A, T, thr, vmax=vmax)
    return d3, d4, d5, count, None, thr


@callback(Output("sel", "data", allow_duplicate=True), Input("d5-graph", "clickData"), Input("d5-graph", "relayoutData"),
          State("sel", "data"), prevent_initial_call=True)
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


@callback(Output("d2-images", "children"), Output("d2-msg", "children"),
          Input("k-image", "data"), Input("k-head", "data"), Input("k-scale", "data"), Input("d3-graph", "hoverData"),
          State("sel", "data"))
def view_d2(_ki, _kh, _ks, hover, sel):
    """The image, the sources attending to a target token, the targets a source token attends to,
    as a colour overlay on the shared scale of D3/D4 (with its colour bar). Hovering a token in D3
    picks it (default: CLS for both)."""
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
    vmax, _ = _vmax(index, att, head[0], sel.get("scale"))
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
         F.masked_image(image, A[T:, target], grid, highlight=None if target < T else target - T, vmax=vmax)),
        (f"attention from {names[source]} (targets)",
         F.masked_image(image, A[source, T:], grid, highlight=None if source < T else source - T, vmax=vmax)),
    ]
    bar = html.Div([html.Div(className="d2-bar", style={"background": F.mask_gradient_css()}),
                    html.Div([html.Span("0"), html.Span(f"{vmax / 2:.2g}"), html.Span(f"{vmax:.3g}")], className="d2-ticks"),
                    html.Div("attention (shared scale of D3/D4)", className="d2-bar-title")], className="d2-scale")
    return [html.Figure([html.Img(src=src, className="d2-img"), html.Figcaption(cap)], className="d2-tile",
                        id=f"d2-tile-{i}") for i, (cap, src) in enumerate(tiles)] + [bar], None


# ---- export ------------------------------------------------------------------------------------
def _head_table(index: data.RunIndex, sel: dict) -> pd.DataFrame:
    """The run's head table (head_metrics), of the selected image when one is selected."""
    hm = index.run.head_metrics
    pos, _ = _selection(index, sel)
    if pos is not None:
        hm = hm[hm["image_id"] == int(index.image_ids[pos])]
    return hm.drop(columns=[c for c in ("strength",) if c in hm.columns]).reset_index(drop=True)


def _attention_table(index, pos, head) -> pd.DataFrame:
    att = _attention(index, pos, head)
    A = att["attention"].astype(np.float32)
    names = F.token_names(A.shape[0], int(att["num_prefix_tokens"]), att["grid"])
    return pd.DataFrame(A, index=pd.Index(names, name="source \\ target"), columns=names)


REPORT_HEADER = string.Template("<p>label $label · predicted $pred · metric $metric · $count</p>"
                                "<p>Reproduce: $link</p><h3>D2 · image and attention masks</h3>")


def report_html(index: data.RunIndex, sel: dict, url: str) -> str:
    """A self-contained HTML page about the selected head on the selected image: its B2, B3, C2,
    C3, D2-D4 and the URL that reproduces the view (app.report: plotly.js inlined once, names
    escaped, a CSP that runs only plotly.js and the figure loader)."""
    pos, head = _selection(index, sel)
    b2, b3, _ = view_b2_b3(None, None, None, None, sel)
    _, c2, c3, _ = view_c(None, None, None, "strength_entropy", sel)
    vector = _vector(index.vectors)
    d3, d4, _, count, _, _ = view_d3_d5(None, None, None, None, sel)
    d2, _ = view_d2(None, None, None, None, sel)
    figures = [(title, dict(fig, layout=dict(fig["layout"], height=360, width=720))) for title, fig in (
        ("B2 · metric under each pruning mode", b2), ("B3 · top-5 classes", b3),
        (f"C2 · {registry.get_metric(vector).label if vector else 'vector metric'}", c2),
        ("C3 · strength entropy over images", c3), ("D3 · two-axis view", d3), ("D4 · attention matrix", d4))]
    images = [(t.children[0].src, t.children[1].children) for t in (d2 or []) if isinstance(t, html.Figure)]
    row = index.images.iloc[pos]
    header = render_html(REPORT_HEADER, label=index.class_name(row.label), pred=index.class_name(row.pred),
                         metric=_metric(index, sel), count=count, link=report.link(url))
    title = f"HeadScope · {F.head_name(*head)} on image {int(row.image_id)} of run {index.name}"
    return report.figure_page(title, header, figures, images)


def view_url(sel: dict) -> str:
    """The link that opens the Explorer in state ``sel`` on this server (inside a request)."""
    return flask.request.host_url.rstrip("/") + dash.get_relative_path("/") + selection_query(sel)


@callback(Output("download", "data"),
          Input("dl-heads-csv", "n_clicks"), Input("dl-heads-parquet", "n_clicks"), Input("dl-att-csv", "n_clicks"),
          Input("dl-att-parquet", "n_clicks"), Input("dl-prune-csv", "n_clicks"), Input("dl-report", "n_clicks"),
          State("sel", "data"), prevent_initial_call=True)
def export(_a, _b, _c, _d, _e, _f, sel):
    """The data behind the views as CSV / Parquet, and the report of this head (with the link to
    this view: the state's URL on this server)."""
    index, _ = load(sel)
    if index is None or not ctx.triggered_id:
        return no_update
    pos, head = _selection(index, sel)
    what = ctx.triggered_id
    stem = f"headscope-{index.name}" + ("" if pos is None else f"-image{int(index.image_ids[pos])}") + \
        ("" if head is None else f"-L{head[0]}H{head[1]}")
    if what.startswith("dl-heads"):
        df = _head_table(index, sel)
    elif pos is None or head is None:
        return no_update
    elif what.startswith("dl-att"):
        df = _attention_table(index, pos, head)
    elif what == "dl-prune-csv":
        df = pd.DataFrame(_pruning(index, pos, head))
    else:
        return dcc.send_string(report_html(index, sel, view_url(sel)), f"{stem}-report.html", type="text/html")
    if what.endswith("parquet"):  # the raw values: Parquet is data for programs, not a spreadsheet
        buf = io.BytesIO()
        df.to_parquet(buf)
        return dcc.send_bytes(buf.getvalue(), f"{stem}-{what.split('-')[1]}.parquet")
    # a CSV opens in spreadsheets: text cells that would run as formulas are neutralised (safe_text)
    return dcc.send_string(write_csv(df, index=what.startswith("dl-att")), f"{stem}-{what.split('-')[1]}.csv")
