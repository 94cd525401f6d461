"""Heads: every head ranked by its mean over all images (head_summary) of any scalar registry
metric the run has (importance metrics, head properties such as strength entropy, mean attention
distance or semantic concentration, and run-level per-head metrics), as an L x H heatmap and a
table; clicking a head selects it for the Explorer."""
from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, Patch, State, callback, dcc, html, no_update

from analysis.metrics import registry
from app import data, figures as F
from app.views import GRAPH_CONFIG, load, message

dash.register_page(__name__, path="/heads", name="Heads", title="HeadScope · Heads", order=1)


def layout(**_query):
    return html.Div([
        dbc.Row([
            dbc.Col(html.H4("Heads ranked by their mean over all images", className="mt-2"), md=True),
            dbc.Col(dbc.InputGroup([dbc.InputGroupText("metric"),
                                    dcc.Dropdown(id="heads-metric", clearable=False, searchable=False,
                                                 style={"minWidth": "21rem"})], size="sm", className="flex-nowrap"),
                    width="auto", className="mt-2"),
        ]),
        html.Div(id="heads-msg"),
        dbc.Row([
            dbc.Col(dcc.Graph(id="heads-map", config=GRAPH_CONFIG, style={"height": "420px"}), lg=6),
            dbc.Col(html.Div(id="heads-table", className="heads-table"), lg=6),
        ]),
        html.P(["Mean and standard deviation over all images of the run (head_summary). Click a cell to select "
                "the head, then open the ", dcc.Link("Explorer", href="/", id="heads-explorer-link"), "."],
               className="text-muted small"),
    ])


@callback(Output("heads-metric", "options"), Output("heads-metric", "value"), Input("sel", "data"),
          State("heads-metric", "value"))
def heads_metric(sel, current):
    index, _ = load(sel)
    if index is None or not index.head_metrics:
        return [], None
    names = index.head_metrics
    default = "prob_drop" if "prob_drop" in names else names[0]
    return data.metric_options(names), current if current in names else default


@callback(Output("heads-map", "figure"), Output("heads-table", "children"), Output("heads-msg", "children"),
          Input("sel", "data"), Input("heads-metric", "value"))
def heads_view(sel, metric):
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), None, message(err, "danger")
    if metric not in index.head_metrics:
        return F.empty(index.missing.get("metrics", "Choose a metric.")), None, None
    m = registry.get_metric(metric)
    mean, std = index.summary(metric)
    low = m.important == "low"
    grid = mean.reshape(index.L, index.H)
    idx = np.arange(index.L * index.H)
    what = "mean" if m.level == "image_head" else "value"
    fig = {"data": [{"type": "heatmap", "z": grid.tolist(), "x": list(range(index.H)), "y": list(range(index.L)),
                     "colorscale": "Cividis", "reversescale": low,
                     "customdata": np.stack([idx // index.H, idx % index.H], 1).reshape(index.L, index.H, 2).tolist(),
                     "colorbar": {"title": {"text": what}, "thickness": 10},
                     "hovertemplate": f"layer %{{y}} head %{{x}}<br>{what} %{{z:.4g}}<extra></extra>"}],
           "layout": F.layout(f"{what} {m.title}",
                              xaxis=F.axis("head", dtick=1), yaxis=F.axis("layer", dtick=1, autorange="reversed"))}
    sel_head = (sel or {}).get("layer"), (sel or {}).get("head")
    if index.head_index(*sel_head) is not None:
        fig["data"].append({"type": "scatter", "x": [sel_head[1]], "y": [sel_head[0]], "mode": "markers",
                            "hoverinfo": "skip", "marker": {"symbol": "square-open", "size": 16,
                                                            "color": F.ACCENT, "line": {"width": 3}}})
    order = np.argsort(mean if low else -mean, kind="stable")
    order = order[~np.isnan(mean[order])][:20]
    ent = index.summary("strength_entropy")[0] if "strength_entropy" in index.properties else None
    cell = lambda v, fmt: "–" if v is None or not np.isfinite(v) else format(v, fmt)
    rows = [html.Tr([html.Td(r + 1), html.Td(int(i // index.H)), html.Td(int(i % index.H)),
                     html.Td(cell(mean[i], ".4g")), html.Td(cell(std[i], ".4g")),
                     html.Td("–" if ent is None else cell(ent[i], ".3f"))]) for r, i in enumerate(order)]
    table = dbc.Table([html.Thead(html.Tr([html.Th(c) for c in ("rank", "layer", "head", "mean", "std",
                                                                 "strength entropy")])), html.Tbody(rows)],
                      size="sm", hover=True, striped=True)
    if not m.is_importance:
        text = f"Top {len(order)} heads by {what} of {metric} (highest first); see Help for the definition."
    else:
        text = f"Top {len(order)} heads; " + ("lower" if low else "higher") + " is more important."
    if not m.exact:
        text += " Approximate metric."
    note = html.P(text, className="small text-muted mb-1")
    return fig, [note, table], None


@callback(Output("sel", "data", allow_duplicate=True), Input("heads-map", "clickData"), prevent_initial_call=True)
def heads_select(click):
    if not click or not click.get("points"):
        return no_update
    pt = click["points"][0]
    p = Patch()
    p["layer"], p["head"] = int(pt["y"]), int(pt["x"])
    return p
