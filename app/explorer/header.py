"""The Explorer's header: the toolbar (go to an image / head, the importance metric, the figure
format, the export menu) and the selection summary (run, image, head with its rank and pattern
label, the image's accuracy, the set)."""
from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, State, dcc, html

from analysis.metrics import registry

from app import data, figures as F
from app.explorer import exports
from app.explorer.selection import cached, chosen_metric, selection, set_positions, thumb_url
from app.state import judge
from app.views import Callbacks, graph_config, load, message

callbacks = Callbacks()

# every plot of the Explorer (its camera button exports in the toolbar's format)
GRAPHS = ("a-graph", "b1-graph", "b2-graph", "b3-graph", "c1-graph", "c2-graph", "c3-graph", "d1-graph",
          "d3-graph", "d4-graph", "d5-graph")


def layout() -> dbc.Row:
    tool = {"size": "sm", "className": "flex-nowrap"}
    return dbc.Row([
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
            *exports.menu(),
        ], className="d-flex align-items-center gap-2", title="figure format of the camera button of every plot"),
            width="auto"),
    ], className="g-2 align-items-center mb-1 explorer-top")


@callbacks.server(Output("metric", "options"), Output("metric", "placeholder"), Input("k-run", "data"), State("sel", "data"))
def metric_options(_k, sel):
    """B1's choice: the importance metrics this run has values for (backbone runs have no prob / jsd);
    the default as placeholder."""
    index, _ = load(sel)
    if index is None or not index.importance:
        return [], "no metrics"
    if sel.get("metric") in index.importance:  # the state's metric, once the menu has its options
        dash.set_props("metric", {"value": sel["metric"]})
    default = chosen_metric(index, {})
    return data.metric_options(index.importance), registry.get_metric(default).option


@callbacks.server(*[Output(g, "config") for g in GRAPHS], Input("fig-format", "value"), prevent_initial_call=True)
def figure_format(fmt):
    """Every plot's camera button exports at publication size in the chosen format (the graphs are
    laid out with PNG's: app/views.py graph_config)."""
    return [graph_config(g, fmt) for g in GRAPHS]


def head_rank(values, hi: int, important: str) -> tuple[int, int] | None:
    """(rank, of how many) of head ``hi`` among one image's heads ``values`` [L*H] by an importance
    metric: rank 1 = the most important (``important`` "high": the largest value; "low": the
    smallest); ties share the better rank; heads without a finite value are not ranked (None when
    ``hi`` is one of them)."""
    v = np.asarray(values, float)
    finite = np.isfinite(v)
    if not finite[hi]:
        return None
    better = v[finite] > v[hi] if important == "high" else v[finite] < v[hi]
    return int(better.sum()) + 1, int(finite.sum())


def summary_parts(index: data.RunIndex, sel: dict) -> list:
    """The selection summary after the thumbnail: the image and the head (keys), the head's rank by the
    chosen metric among the image's heads and its pattern label, the image's accuracy line (true label,
    prediction: prose that is shortened with an ellipsis where the line is too short; P(true): a
    number, always whole)."""
    pos, head = selection(index, sel)
    key = lambda text: html.B(text, className="sel-key")
    num = lambda text, title=None: html.Span(text, className="sel-num", title=title)
    out = [key(F.head_name(*head))] if head is not None else []
    if pos is None:
        return out + [html.Span("No image selected: views show all images. Click an image in A.", className="sel-prose")]
    row = index.images.iloc[pos]
    out.insert(0, key(f"image {int(row.image_id)}"))
    if head is not None:
        hi = head[0] * index.H + head[1]
        metric = chosen_metric(index, sel)
        rank = None if metric is None else head_rank(index.values(metric)[pos], hi, registry.get_metric(metric).important)
        if rank is not None:
            out.append(num(f"rank {rank[0]}/{rank[1]}", f"rank of {F.head_name(*head)} among this image's {rank[1]} heads "
                                                         f"by {registry.get_metric(metric).label} (1 = most important)"))
        if index.categories:
            label = index.values(index.categories[0])[pos, hi]
            out.append(num(f"{registry.get_metric(index.categories[0]).label}: {label}"))
    prose = f"label {index.class_name(row.label)} · predicted {index.class_name(row.pred)}"
    out.append(html.Span(prose, className="sel-prose", title=prose))
    if row.prob == row.prob:
        out.append(num(f"P(true) = {float(row.prob):.3f}", "the model's probability of the true label on this image"))
    return out


@cached.view(Output("sel-summary", "children"), Output("run-alert", "children"),
                  Input("k-image", "data"), Input("k-head", "data"), Input("k-set", "data"), Input("k-metric", "data"),
                  State("sel", "data"))
def selection_summary(_image, _head, _set, _metric, sel):
    """The header: the run, the image, the head (its rank by the chosen metric, its pattern label), the
    image's accuracy and the set (not redrawn for a threshold, a colouring...)."""
    index, err = load(sel)
    if index is None:
        return None, message(err, "danger")
    pos, _ = selection(index, sel)
    _, notes = judge(sel, index.facts)  # what the run lacks (a URL's were dropped by parse_url)
    model = index.manifest.get("model", {})
    parts = [html.Span(f"{index.name}", className="badge bg-secondary me-2"),
             html.Span(f"{model.get('name', '?')} · {index.n} images · {index.L} layers × {index.H} heads",
                       className="text-muted small me-3 sel-run")]
    if pos is not None:
        parts.append(html.Img(src=thumb_url(index.name, index.image_ids[pos]), className="sel-thumb me-2"))
    # one line (the four views keep one 1920x1080 screen): the run's description gives way first,
    # then the prose (label names) is cut with an ellipsis; the keys and numbers stay whole
    text = summary_parts(index, sel)
    parts.append(html.Span(text, className="small sel-text", title=" · ".join(t.children for t in text)))  # whole on hover
    members = set_positions(index, sel)
    if members is not None:
        parts.append(html.Span(f" · set of {len(members)} images (B1 band, C3, D1)", className="small set-badge ms-2"))
    return parts, [message(n) for n in notes] or None
