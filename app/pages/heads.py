"""Heads: every head ranked by its mean importance (or another per-head property: strength
entropy, mean attention distance, semantic concentration) over all images (head_summary), as an
L x H heatmap and a table; clicking a head selects it for the Explorer."""
from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, Patch, State, callback, dcc, html, no_update

from app import data, figures as F
from app.views import GRAPH_CONFIG, load, message

dash.register_page(__name__, path="/heads", name="Heads", title="HeadScope · Heads", order=1)

# For "prob" (P(true) with the head pruned) a LOW value means an important head.
LOW_IS_IMPORTANT = {"prob"}
# Per-head properties that are not importance metrics; ranked highest first, read from head_summary.
PROPERTIES = {"strength_entropy": "strength_entropy · how global the attention is (0-1)",
              "mean_distance_px": "mean_distance_px · mean attention distance (px)",
              "semantic_concentration": "semantic_concentration · attention on SIFT-keypoint patches (1 = no preference)",
              "cls_semantic_concentration": "cls_semantic_concentration · the same for the CLS row"}


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
    if index is None or not index.metrics:
        return [], None
    hs = index.memo("head_summary", lambda: _read_summary(index)) or {}
    props = [m for m in PROPERTIES if np.isfinite(hs.get(f"{m}_mean", np.nan)).any()]
    opts = ([{"label": data.METRIC_SHORT.get(m, m), "value": m} for m in index.metrics]
            + [{"label": PROPERTIES[m], "value": m} for m in props])
    default = "prob_drop" if "prob_drop" in index.metrics else index.metrics[0]
    return opts, current if current in index.metrics + props else default


def summary(index: data.RunIndex, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per head [L*H] from head_summary (falls back to the per-image table)."""
    hs = index.memo("head_summary", lambda: _read_summary(index))
    if hs is not None and f"{metric}_mean" in hs:
        return hs[f"{metric}_mean"], hs[f"{metric}_std"]
    if metric in index.mean:
        return index.mean[metric], index.std[metric]
    nan = np.full(index.L * index.H, np.nan)
    return nan, nan


def _read_summary(index: data.RunIndex):
    from analysis.runs import store

    try:
        df = store.open_run(index.path).head_summary
    except Exception:
        return None
    out = {}
    idx = df["layer"].to_numpy(int) * index.H + df["head"].to_numpy(int)
    for col in df.columns:
        if col.endswith(("_mean", "_std")):
            arr = np.full(index.L * index.H, np.nan)
            arr[idx] = df[col].to_numpy(float)
            out[col] = arr
    return out


@callback(Output("heads-map", "figure"), Output("heads-table", "children"), Output("heads-msg", "children"),
          Input("sel", "data"), Input("heads-metric", "value"))
def heads_view(sel, metric):
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), None, message(err, "danger")
    if metric not in index.metric and metric not in PROPERTIES:
        return F.empty(index.missing.get("metrics", "Choose a metric.")), None, None
    mean, std = summary(index, metric)
    low = metric in LOW_IS_IMPORTANT
    grid = mean.reshape(index.L, index.H)
    idx = np.arange(index.L * index.H)
    fig = {"data": [{"type": "heatmap", "z": grid.tolist(), "x": list(range(index.H)), "y": list(range(index.L)),
                     "colorscale": "Cividis", "reversescale": low,
                     "customdata": np.stack([idx // index.H, idx % index.H], 1).reshape(index.L, index.H, 2).tolist(),
                     "colorbar": {"title": {"text": "mean"}, "thickness": 10},
                     "hovertemplate": "layer %{y} head %{x}<br>mean %{z:.4f}<extra></extra>"}],
           "layout": F.layout(f"mean {data.METRIC_LABELS.get(metric, metric)}",
                              xaxis=F.axis("head", dtick=1), yaxis=F.axis("layer", dtick=1, autorange="reversed"))}
    sel_head = (sel or {}).get("layer"), (sel or {}).get("head")
    if index.head_index(*sel_head) is not None:
        fig["data"].append({"type": "scatter", "x": [sel_head[1]], "y": [sel_head[0]], "mode": "markers",
                            "hoverinfo": "skip", "marker": {"symbol": "square-open", "size": 16,
                                                            "color": F.ACCENT, "line": {"width": 3}}})
    order = np.argsort(mean if low else -mean, kind="stable")
    order = order[~np.isnan(mean[order])][:20]
    ent = index.memo("mean-entropy", lambda: np.nanmean(index.entropy, axis=0)) if index.entropy is not None else None
    rows = [html.Tr([html.Td(r + 1), html.Td(int(i // index.H)), html.Td(int(i % index.H)),
                     html.Td(f"{mean[i]:.4f}"), html.Td(f"{std[i]:.4f}"),
                     html.Td("–" if ent is None else f"{ent[i]:.3f}")]) for r, i in enumerate(order)]
    table = dbc.Table([html.Thead(html.Tr([html.Th(c) for c in ("rank", "layer", "head", "mean", "std",
                                                                 "strength entropy")])), html.Tbody(rows)],
                      size="sm", hover=True, striped=True)
    if metric in PROPERTIES:
        text = f"Top {len(order)} heads by mean {metric} (highest first); see Help for the definition."
    else:
        text = f"Top {len(order)} heads; " + ("lower" if low else "higher") + " is more important."
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
