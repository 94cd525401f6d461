"""Curves: the run's cumulative pruning curves (SPEC "Several heads at once"): top-1 accuracy and
mean P(true) (mean emb_dist for a backbone) against the number of heads pruned, least important
first, for the exact, taylor and random orders (random: mean and range over the seeds), with the
area under each curve and how many heads can go before accuracy drops by 1 point, with what bounds
that count (``drop_limits``: the k grid it is read on, the number of images accuracy is measured on).
Built by ``scripts/build_cache.py --curves`` (analysis.runs.head_stages)."""
from __future__ import annotations

import math
from collections import Counter

import dash
import dash_bootstrap_components as dbc
import numpy as np
import pandas as pd
from dash import Input, Output, callback, dcc, html

from analysis.metrics.head_sets import curve_area, heads_before_drop
from app import figures as F
from app.views import GRAPH_CONFIG, load, message

dash.register_page(__name__, path="/curves", name="Curves", title="HeadScope · Pruning curves", order=2)

ORDER_STYLE = {"exact": ("exact (leave-one-out)", F.MEAN_BLUE), "taylor": ("taylor (approximate)", F.OKABE_ITO[0]),
               "random": ("random", F.GREY)}
COLUMNS = {"accuracy": "top-1 accuracy", "mean_prob": "mean P(true)", "mean_emb_dist": "mean emb. cos. dist."}
DROP = 0.01  # "a 1-point drop" of accuracy (heads_before_drop's default)


def layout(**_query):
    return html.Div([
        dbc.Row([
            dbc.Col(html.H4("Cumulative pruning curves", className="mt-2"), md=True),
            dbc.Col(dbc.InputGroup([dbc.InputGroupText("y"),
                                    dcc.Dropdown(id="curves-metric", clearable=False, searchable=False,
                                                 style={"minWidth": "12rem"})], size="sm", className="flex-nowrap"),
                    width="auto", className="mt-2"),
        ]),
        html.Div(id="curves-msg"),
        dbc.Row([
            dbc.Col(dcc.Graph(id="curves-graph", config=GRAPH_CONFIG, style={"height": "420px"}), lg=7),
            dbc.Col(html.Div(id="curves-table"), lg=5),
        ]),
        html.P(["The first k heads of each order (least important first) are pruned together (whole heads, zero "
                "ablation) and the model is evaluated on the run's labelled images. Orders: exact = ascending run "
                "mean of prob_drop (emb_dist for a backbone), taylor = ascending run mean of grad_score "
                "(approximate), random = seeded permutations (line: mean, band: range). Area: under the curve "
                "with k scaled to [0, 1]."], className="text-muted small"),
    ])


def is_classifier(index) -> bool:
    return bool(index.manifest.get("model", {}).get("num_classes"))


def read_curves(index) -> tuple[pd.DataFrame | None, dict | None, str | None]:
    entry = index.manifest.get("pruning_curves")
    # a file of the run only (the reader refuses a name or link that leads out of it)
    path = (index.run.file(str(entry.get("file", "pruning_curves.parquet")))
            if entry and isinstance(entry, dict) else None)
    if path is None:
        return None, None, (f"Run {index.name} has no pruning curves. Build it with "
                            "python scripts/build_cache.py --curves (with --taylor for the taylor order).")
    return index.memo("pruning_curves", lambda: pd.read_parquet(path)), entry, None


@callback(Output("curves-metric", "options"), Output("curves-metric", "value"), Input("sel", "data"))
def curves_metric(sel):
    index, _ = load(sel)
    if index is None:
        return [], None
    cols = ["accuracy", "mean_prob"] if is_classifier(index) else ["mean_emb_dist"]
    return [{"label": COLUMNS[c], "value": c} for c in cols], cols[0]


def curves_figure(curve: pd.DataFrame, column: str, total: int) -> dict:
    """Lines per order; random: mean line and a min-max band over its seeds."""
    data = []
    for order, (name, colour) in ORDER_STYLE.items():
        g = curve[curve.order == order]
        if g.empty:
            continue
        stats = g.groupby("k")[column].agg(["mean", "min", "max"]).reset_index()
        k = stats.k.tolist()
        if order == "random":
            data.append({"type": "scatter", "x": k + k[::-1], "y": stats["max"].tolist() + stats["min"].tolist()[::-1],
                         "fill": "toself", "fillcolor": "rgba(154,154,154,0.25)", "line": {"width": 0},
                         "hoverinfo": "skip", "showlegend": False, "name": "random range"})
        data.append({"type": "scatter", "mode": "lines+markers", "x": k, "y": stats["mean"].tolist(), "name": name,
                     "line": {"color": colour, "width": 2}, "marker": {"size": 5},
                     "hovertemplate": f"{name}<br>k = %{{x}} heads<br>{COLUMNS[column]} %{{y:.4g}}<extra></extra>"})
    return {"data": data, "layout": F.layout(
        f"{COLUMNS[column]} vs heads pruned", showlegend=True, legend={"orientation": "h", "y": -0.18},
        xaxis=F.axis("heads pruned (k)", range=[0, total]), yaxis=F.axis(COLUMNS[column]))}


def summary_rows(curve: pd.DataFrame, column: str, total: int, classifier: bool) -> list:
    rows = []
    for order, (name, _) in ORDER_STYLE.items():
        g = curve[curve.order == order]
        if g.empty:
            continue
        per_seed = [s for _, s in g.groupby(g.seed.fillna(-1))]
        areas = [curve_area(s, column, total) for s in per_seed]
        area = f"{np.mean(areas):.3f}" + (f" ({min(areas):.3f}-{max(areas):.3f})" if len(areas) > 1 else "")
        drop = "–"
        if classifier:
            ks = [heads_before_drop(s) for s in per_seed]
            drop = f"{np.mean(ks):.0f}" + (f" ({min(ks)}-{max(ks)})" if len(ks) > 1 else "")
        rows.append(html.Tr([html.Td(name), html.Td(area), html.Td(drop)]))
    return rows


def drop_bracket(curve: pd.DataFrame) -> tuple[int, int | None]:
    """(k*, the grid's next k after it, or None when k* is its last) for one curve (one order, one
    seed): k* = heads_before_drop, the last grid k with accuracy within DROP of k = 0 at every grid k
    up to it; at the next grid k it is not, so the first drop lies in k* + 1 .. next."""
    last = heads_before_drop(curve, "accuracy", DROP)
    later = sorted(int(k) for k in curve["k"] if k > last)
    return last, (later[0] if later else None)


def drop_limits(curve: pd.DataFrame, images: int, total: int) -> list[str]:
    """What bounds "heads before accuracy drops by 1 point" in this run, one sentence each: the k grid
    (accuracy is measured only at its k: the first drop lies between two of them, or beyond the last)
    and the image count (accuracy moves in steps of 1 / images: below 100 images one image is more
    than a point, so the count ends at the first image lost)."""
    steps = sorted(int(k) for k in curve["k"].unique())
    out = [f"k grid: accuracy is measured only at k = {', '.join(map(str, steps))}; each count is the last of "
           "these k before the drop."]
    for order, (name, _) in ORDER_STYLE.items():
        g = curve[curve.order == order]
        if g.empty:
            continue
        brackets = Counter(drop_bracket(s) for _, s in g.groupby(g.seed.fillna(-1)))
        seeds = (lambda n: f" ({n} seed{'s' if n > 1 else ''})") if g.seed.notna().any() else (lambda n: "")
        within = sorted((k, nxt, n) for (k, nxt), n in brackets.items() if nxt is not None)
        if within:
            out.append(f"{name}: the first 1-point drop lies between k = "
                       + "; ".join(f"{k} and {nxt}{seeds(n)}" for k, nxt, n in within)
                       + ": one head at a time, at most " + ", ".join(str(nxt - 1) for _, nxt, _ in within)
                       + " heads could go (" + ", ".join(str(k) for k, _, _ in within)
                       + " or more unless accuracy dips between grid points).")
        beyond = sum(n for (k, nxt), n in brackets.items() if nxt is None)
        if beyond:
            last = steps[-1]
            out.append(f"{name}: no 1-point drop at any k of the grid up to its last, k = {last}{seeds(beyond)}"
                       + (" (every head pruned)." if last >= total else f": the drop, if any, is beyond k = {last}."))
    allowed = math.floor(DROP * images + 1e-9)
    if images and allowed < 1:
        out.append(f"image-limited: accuracy is measured on {images} labelled images, so it moves in steps of "
                   f"{100 / images:.3g} points: one image lost is already more than a 1-point drop, and the count "
                   "ends at the first image that the pruning turns wrong (net). Build with more --curve-images "
                   "(100 or more for a 1-point resolution).")
    elif images:
        out.append(f"1 point of accuracy = {allowed} of the {images} labelled images (steps of {100 / images:.3g} "
                   "points).")
    return out


@callback(Output("curves-graph", "figure"), Output("curves-table", "children"), Output("curves-msg", "children"),
          Input("sel", "data"), Input("curves-metric", "value"))
def curves_view(sel, column):
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), None, message(err, "danger")
    curve, entry, missing = read_curves(index)
    if curve is None:
        return F.empty("No pruning curves in this run"), None, message(missing)
    column = column if column in COLUMNS and curve[column].notna().any() else (
        "accuracy" if is_classifier(index) else "mean_emb_dist")
    total = index.L * index.H
    head = html.Thead(html.Tr([html.Th("order"), html.Th(f"area ({COLUMNS[column]})"),
                               html.Th("heads before accuracy drops by 1 point")]))
    table = dbc.Table([head, html.Tbody(summary_rows(curve, column, total, is_classifier(index)))],
                      size="sm", hover=True, striped=True, id="curves-summary")
    note = html.P(f"{entry.get('images')} labelled images, {len(entry.get('steps', []))} steps of k from 0 to {total}; "
                  "heads before a 1-point drop: the largest k of the grid with accuracy still within 0.01 of the "
                  "unpruned model's at every step up to it (random: mean and range over the seeds).",
                  className="small text-muted")
    limits = (html.Ul([html.Li(t) for t in drop_limits(curve, int(entry.get("images") or 0), total)],
                      id="curves-limits", className="small text-muted")
              if is_classifier(index) else None)
    return curves_figure(curve, column, total), [table, note, limits], None
