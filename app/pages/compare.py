"""Compare: two or more runs side by side (other models, registers, fine-tuning, resolutions).

- Per-layer profiles of any scalar head metric the runs have: per layer, the mean over its heads
  of the head means (head_summary), with a band of +-1 std over those heads; every run overlaid
  (x = relative depth when the runs have different numbers of layers).
- Runs with the same L x H: the head-by-head difference (second run minus first) and the heads
  whose rank changes most. Other runs are compared at the layer level only, and the page says why.
- Runs on the same images (same data set fingerprint, or the same image paths): per-image scatter
  of one head's metric in the first run against the second.
The head-level views use the first two selected runs. The runs and the metric are the view state's
``runs`` and ``metric`` (app/state.py), so the URL ``/compare?runs=a,b&metric=prob_drop`` opens that
comparison and a change on the page is written back to it (absent: the state's run and the next
one, and the first of DEFAULT_METRICS that all compared runs have).
"""
from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, Patch, State, callback, dcc, html, no_update

from analysis.metrics import registry
from analysis.metrics.patterns import PATTERN_METRICS
from analysis.runs.reader import list_runs
from app import config, data, figures as F
from app.views import GRAPH_CONFIG, load, message

dash.register_page(__name__, path="/compare", name="Compare", title="HeadScope · Compare", order=3)

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
DEFAULT_METRICS = ("mean_distance_px", "strength_entropy")  # the first that all compared runs have


def layout(**_query):  # the runs and the metric come from the view state (the URL, parsed by the shell)
    return html.Div([
        html.H4("Compare runs", className="mt-2"),
        dbc.Row([
            dbc.Col(dbc.InputGroup([dbc.InputGroupText("runs"),
                                    dcc.Dropdown(id="compare-runs", multi=True,
                                                 placeholder="choose two or more runs", style={"minWidth": "26rem"})],
                                   size="sm", className="flex-nowrap"), width="auto"),
            dbc.Col(dbc.InputGroup([dbc.InputGroupText("metric"),
                                    dcc.Dropdown(id="compare-metric", clearable=False, searchable=False,
                                                 style={"minWidth": "21rem"})], size="sm", className="flex-nowrap"),
                    width="auto"),
        ], className="g-2 mb-2"),
        html.Div(id="compare-msg"),
        dcc.Graph(id="compare-profiles", config=GRAPH_CONFIG, style={"height": "340px"}),
        dbc.Row([
            dbc.Col(dcc.Graph(id="compare-diff", config=GRAPH_CONFIG, style={"height": "380px"}), lg=7),
            dbc.Col(html.Div(id="compare-ranks", className="heads-table"), lg=5),
        ]),
        dbc.Row([
            dbc.Col(dbc.InputGroup([dbc.InputGroupText("layer"),
                                    dbc.Input(id="compare-layer", type="number", min=0, step=1, value=0),
                                    dbc.InputGroupText("head"),
                                    dbc.Input(id="compare-head", type="number", min=0, step=1, value=0)],
                                   size="sm"), width="auto"),
        ], className="g-2 mt-2"),
        dcc.Graph(id="compare-scatter", config=GRAPH_CONFIG, style={"height": "380px"}),
    ], className="compare-page")


# ---- comparisons (pure functions of run indexes) ------------------------------------------------

def layer_profile(index: data.RunIndex, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean [L], std [L]) over each layer's heads of the per-head value of ``metric``."""
    mean = index.summary(metric)[0].reshape(index.L, index.H).astype(np.float64)
    finite = np.isfinite(mean)
    count = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.where(finite, mean, 0).sum(axis=1) / count
        sd = np.sqrt(np.where(finite, (mean - mu[:, None]) ** 2, 0).sum(axis=1) / count)
    return mu, sd


def head_ranks(values: np.ndarray, low_is_high: bool) -> np.ndarray:
    """Rank (1 = first) of every head by value, highest first (lowest first when ``low_is_high``); NaN last."""
    key = np.where(np.isfinite(values), values if low_is_high else -values, np.inf)
    ranks = np.empty(len(values), np.int64)
    ranks[np.argsort(key, kind="stable")] = np.arange(1, len(values) + 1)
    return ranks


def matched_images(a: data.RunIndex, b: data.RunIndex) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Row positions of the images two runs share, and how they were matched: by image id when both
    data sets have the same fingerprint, else by image path; None when they share none."""
    fa, fb = (r.manifest.get("dataset", {}).get("fingerprint") for r in (a, b))
    if fa and fa == fb:
        common, ia, ib = np.intersect1d(a.image_ids, b.image_ids, return_indices=True)
        return ia, ib, "the same data set (fingerprint)"
    pa, pb = a.images["path"].astype(str).to_numpy(), b.images["path"].astype(str).to_numpy()
    common, ia, ib = np.intersect1d(pa, pb, return_indices=True)
    return (ia, ib, "the same image paths") if len(common) else None


def _indexes(names) -> tuple[list[data.RunIndex], list[str]]:
    out, errors = [], []
    for name in names or []:
        index, err = load({"run": name})
        if index is None:
            errors.append(err)
        else:
            out.append(index)
    return out, errors


def scalar_metrics(index: data.RunIndex) -> list[str]:
    return index.importance + index.properties + index.run_level


# ---- the state: sel.runs / sel.metric <-> the two menus ------------------------------------------

def openable_runs() -> list[str]:
    return [r["name"] for r in list_runs(config.cache_dir()) if r["error"] is None]


def shown_runs(sel: dict | None, ok: list[str]) -> list[str]:
    """The runs the page compares: the state's runs that open, else the state's run and the next one."""
    chosen = [r for r in (sel or {}).get("runs") or [] if r in ok]
    if chosen:
        return chosen
    first = (sel or {}).get("run")
    return (([first] if first in ok else []) + [r for r in ok if r != first])[:2]


def metric_choice(runs) -> tuple[list[str], str | None]:
    """(every scalar metric of the runs, the default: the first of DEFAULT_METRICS all of them have)."""
    indexes, _ = _indexes(runs)
    names = []
    for index in indexes:
        names += [m for m in scalar_metrics(index) if m not in names]
    if not names:
        return [], None
    shared = [m for m in names if all(m in scalar_metrics(i) for i in indexes)]
    return names, next((m for m in DEFAULT_METRICS if m in shared), (shared or names)[0])


def shown_metric(sel: dict | None, names: list[str], default: str | None) -> str | None:
    """The state's metric when the compared runs have it, else the default."""
    return (sel or {}).get("metric") if (sel or {}).get("metric") in names else default


@callback(Output("compare-runs", "options"), Output("compare-runs", "value"), Input("sel", "data"),
          State("compare-runs", "value"))
def compare_runs(sel, current):
    ok = openable_runs()
    value = shown_runs(sel, ok)
    return [{"label": r, "value": r} for r in ok], no_update if value == current else value


@callback(Output("compare-metric", "options"), Output("compare-metric", "value"), Input("compare-runs", "value"),
          Input("sel", "data"), State("compare-metric", "value"))
def compare_metric(runs, sel, current):
    names, default = metric_choice(runs)
    value = shown_metric(sel, names, default)
    return data.metric_options(names), no_update if value == current else value


@callback(Output("sel", "data", allow_duplicate=True), Input("compare-runs", "value"),
          Input("compare-metric", "value"), State("sel", "data"), prevent_initial_call=True)
def write_state(runs, metric, sel):
    """The runs and metric shown, written to the state (and so to the URL) when they are not what
    the state already means: a change made on the page, never the defaults the page opened with."""
    if not runs:
        return no_update
    p, changed = Patch(), False
    if runs != shown_runs(sel, openable_runs()):
        p["runs"], changed = list(runs), True
    if metric is not None and metric != shown_metric(sel, *metric_choice(runs)):
        p["metric"], changed = metric, True
    return p if changed else no_update


@callback(Output("compare-profiles", "figure"), Output("compare-diff", "figure"), Output("compare-ranks", "children"),
          Output("compare-msg", "children"), Input("compare-runs", "value"), Input("compare-metric", "value"))
def compare_view(runs, metric):
    indexes, errors = _indexes(runs)
    notes = list(errors)
    if len(indexes) < 2 or metric is None:
        text = "Choose two or more runs (and a metric) to compare."
        return F.empty(text), F.empty(text), None, [message(n, "danger") for n in notes] or message(text, "info")
    m = registry.get_metric(metric)
    present = [i for i in indexes if metric in scalar_metrics(i)]
    notes += [(i.run.lacks(metric) if metric in PATTERN_METRICS else f"Run {i.name} has no {metric} (a backbone has "
               "no prob, prob_drop or jsd)") + "; it is left out of the profiles." for i in indexes if i not in present]
    notes += [f"Run {i.name}: {bad}: shown as n/a and left out of the profiles and rank changes (the run's tables "
              "hold ±inf or NaN there; rebuild it to recompute them)."
              for i in present if (bad := F.unusable_note(i.summary(metric)[0], i.H, metric))]
    profiles = profile_figure(present, m)
    a, b = indexes[0], indexes[1]
    if (a.L, a.H) != (b.L, b.H):
        why = (f"{a.name} has {a.L} x {a.H} heads and {b.name} {b.L} x {b.H}: the runs are compared at the layer "
               "level only (no head-by-head difference or rank change).")
        notes.append(why)
        diff, ranks = F.empty(why), None
    elif a not in present or b not in present:
        diff, ranks = F.empty(f"Both {a.name} and {b.name} need {metric} for a head-by-head view."), None
    else:
        diff, ranks = difference_views(a, b, m)
    return profiles, diff, ranks, [message(n, "warning") for n in notes] or None


def profile_figure(indexes: list[data.RunIndex], m: registry.Metric) -> dict:
    relative = len({i.L for i in indexes}) > 1
    traces = []
    for k, index in enumerate(indexes):
        mu, sd = layer_profile(index, m.name)
        x = (np.arange(index.L) / max(index.L - 1, 1)).tolist() if relative else list(range(index.L))
        colour = COLOURS[k % len(COLOURS)]
        band_y = np.concatenate([mu + sd, (mu - sd)[::-1]])
        traces.append({"type": "scatter", "x": x + x[::-1], "y": F.finite_or_none(band_y),
                       "fill": "toself", "fillcolor": colour, "opacity": 0.15, "line": {"width": 0},
                       "hoverinfo": "skip", "showlegend": False, "name": f"{index.name} band"})
        traces.append({"type": "scatter", "mode": "lines+markers", "x": x,
                       "y": F.finite_or_none(mu), "name": index.name,
                       "line": {"color": colour, "width": 2}, "marker": {"size": 5},
                       "hovertemplate": f"{index.name}<br>layer %{{x}}<br>mean %{{y:.4g}}<extra></extra>"})
    what = "mean over the layer's heads (band: ±1 std over heads)"
    return {"data": traces,
            "layout": F.layout(f"{m.title} per layer: {what}", showlegend=True,
                               legend={"orientation": "h", "y": -0.25},
                               xaxis=F.axis("relative depth (layer / (L-1))" if relative else "layer", dtick=None if relative else 1),
                               yaxis=F.axis(m.title))}


def difference_views(a: data.RunIndex, b: data.RunIndex, m: registry.Metric):
    """The difference heatmap (b - a, per head) and the table of the largest rank changes."""
    va, vb = a.summary(m.name)[0].astype(np.float64), b.summary(m.name)[0].astype(np.float64)
    diff = (vb - va).reshape(a.L, a.H)
    span = float(np.abs(diff[np.isfinite(diff)]).max()) if np.isfinite(diff).any() else 1.0
    fig = {"data": [{"type": "heatmap", "z": F.finite_or_none(diff),
                     "x": list(range(a.H)), "y": list(range(a.L)), "colorscale": "RdBu", "reversescale": True,
                     "zmin": -span, "zmax": span, "colorbar": {"title": {"text": "difference"}, "thickness": 10},
                     "hovertemplate": "layer %{y} head %{x}<br>difference %{z:.4g}<extra></extra>"}],
           "layout": F.layout(f"{m.title}: {b.name} minus {a.name}, per head",
                              xaxis=F.axis("head", dtick=1), yaxis=F.axis("layer", dtick=1, autorange="reversed"))}
    low = m.important == "low"
    ra, rb = head_ranks(va, low), head_ranks(vb, low)
    change = ra - rb  # positive: the head ranks higher in b
    both = np.isfinite(va) & np.isfinite(vb)  # a head without a finite value in either run has no rank change
    order = [i for i in np.argsort(-np.abs(change), kind="stable") if both[i]][:15]
    rows = [html.Tr([html.Td(int(i // a.H)), html.Td(int(i % a.H)), html.Td(int(ra[i])), html.Td(int(rb[i])),
                     html.Td(f"{int(change[i]):+d}")]) for i in order]
    table = [html.P(f"Heads whose rank by {m.name} changes most from {a.name} to {b.name} (rank 1 = "
                    f"{'lowest' if low else 'highest'}; + = higher in {b.name}).", className="small text-muted mb-1"),
             dbc.Table([html.Thead(html.Tr([html.Th(c) for c in ("layer", "head", f"rank {a.name}", f"rank {b.name}",
                                                                   "change")])), html.Tbody(rows)],
                       size="sm", hover=True, striped=True, id="compare-rank-table")]
    return fig, table


@callback(Output("compare-scatter", "figure"), Input("compare-runs", "value"), Input("compare-metric", "value"),
          Input("compare-layer", "value"), Input("compare-head", "value"))
def compare_scatter(runs, metric, layer, head):
    indexes, _ = _indexes(runs)
    if len(indexes) < 2 or metric is None:
        return F.empty("Choose two runs on the same images for a per-image scatter.")
    a, b = indexes[:2]
    m = registry.get_metric(metric)
    if m.level != "image_head" or not (a.has(metric) and b.has(metric)):
        return F.empty(f"{metric} is not a per-image metric of both {a.name} and {b.name}.")
    match = matched_images(a, b)
    if match is None:
        return F.empty(f"{a.name} and {b.name} share no images (neither the data set fingerprint nor any image path): "
                       "no per-image scatter.")
    ha, hb = a.head_index(layer, head), b.head_index(layer, head)
    if ha is None or hb is None:
        return F.empty(f"Choose a head that both runs have (layer < {min(a.L, b.L)}, head < {min(a.H, b.H)}).")
    ia, ib, how = match
    x, y = a.values(metric)[ia, ha].astype(np.float64), b.values(metric)[ib, hb].astype(np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    lo, hi = (float(min(x[ok].min(), y[ok].min())), float(max(x[ok].max(), y[ok].max()))) if ok.any() else (0, 1)
    return {"data": [{"type": "scattergl", "mode": "markers", "x": x[ok].tolist(), "y": y[ok].tolist(),
                      "customdata": a.image_ids[ia][ok].tolist(), "marker": {"size": 6, "color": F.ACCENT, "opacity": 0.7},
                      "hovertemplate": "image %{customdata}<br>%{x:.4g} vs %{y:.4g}<extra></extra>"},
                     {"type": "scatter", "mode": "lines", "x": [lo, hi], "y": [lo, hi], "hoverinfo": "skip",
                      "line": {"color": "#999", "dash": "dot", "width": 1}}],
            "layout": F.layout(f"{m.title} of layer {layer} head {head} per image ({int(ok.sum())} images matched by "
                               f"{how})", xaxis=F.axis(f"{a.name}"), yaxis=F.axis(f"{b.name}"))}
