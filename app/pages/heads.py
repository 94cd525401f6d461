"""Heads: every head ranked by its mean over all images (head_summary) of any scalar registry
metric the run has (importance metrics, head properties such as strength entropy, mean attention
distance or semantic concentration, and run-level per-head metrics), as an L x H heatmap and a
table; clicking a head selects it for the Explorer."""
from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, Patch, State, callback, dash_table, dcc, html, no_update

from analysis.metrics import registry
from app import data, figures as F
from app.views import GRAPH_CONFIG, load, message
from analysis.metrics.patterns import modal_labels
from analysis.metrics.classes import class_specificity, class_statistics

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
        html.H5("Direct vs total effect", className="mt-3"),
        html.Div(id="heads-effects-msg"),
        dcc.Graph(id="heads-effects", config=GRAPH_CONFIG, style={"height": "420px"}),
        dbc.Row([
            dbc.Col([html.H5("Zero vs mean ablation", className="mt-3"), html.Div(id="heads-shift")], lg=6),
            dbc.Col([html.H5("Taylor estimate vs exact pruning", className="mt-3"), html.Div(id="heads-agreement")],
                    lg=6),
        ]),
        html.H5("Pattern and other category labels", className="mt-3"),
        html.Div(id="heads-patterns"),
        dbc.Row([
            dbc.Col(html.H5("Class level", className="mt-3"), md=True),
            dbc.Col(dbc.InputGroup([dbc.InputGroupText("metric"),
                                    dcc.Dropdown(id="heads-class-metric", clearable=False, searchable=False,
                                                 style={"minWidth": "21rem"})], size="sm", className="flex-nowrap"),
                    width="auto", className="mt-3"),
            dbc.Col(dbc.RadioItems(id="heads-class-images", options=[{"label": v, "value": k} for k, v in IMAGES.items()],
                                   value="all", inline=True, className="small toggle"),
                    width="auto", className="mt-3"),
        ]),
        html.Div(id="heads-class-msg"),
        dbc.Row([
            dbc.Col(html.Div(dcc.Graph(id="heads-class-map", config=GRAPH_CONFIG, style={"height": "420px"}),
                             className="heads-class-scroll"), lg=8),
            dbc.Col(html.Div(id="heads-specificity", className="heads-table"), lg=4),
        ]),
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
    cell = lambda v, fmt: "–" if v is None else ("n/a" if not np.isfinite(v) else format(v, fmt))
    fig = {"data": [{"type": "heatmap", "z": F.finite_or_none(grid), "x": list(range(index.H)),
                     "y": list(range(index.L)),
                     "colorscale": "Cividis", "reversescale": low,
                     "customdata": np.stack([idx // index.H, idx % index.H], 1).reshape(index.L, index.H, 2).tolist(),
                     "text": [[cell(v, ".4g") for v in row] for row in grid],
                     "colorbar": {"title": {"text": what}, "thickness": 10},
                     "hovertemplate": f"layer %{{y}} head %{{x}}<br>{what} %{{text}}<extra></extra>"}],
           "layout": F.layout(f"{what} {m.title}",
                              xaxis=F.axis("head", dtick=1), yaxis=F.axis("layer", dtick=1, autorange="reversed"))}
    sel_head = (sel or {}).get("layer"), (sel or {}).get("head")
    if index.head_index(*sel_head) is not None:
        fig["data"].append({"type": "scatter", "x": [sel_head[1]], "y": [sel_head[0]], "mode": "markers",
                            "hoverinfo": "skip", "marker": {"symbol": "square-open", "size": 16,
                                                            "color": F.ACCENT, "line": {"width": 3}}})
    order = np.argsort(mean if low else -mean, kind="stable")
    order = order[np.isfinite(mean[order])][:20]  # ±inf / NaN never rank (a corrupt or hand-edited run)
    ent = index.summary("strength_entropy")[0] if "strength_entropy" in index.properties else None
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
    bad = F.unusable_note(mean, index.H, f"{what} of {metric}")
    if bad:
        bad = message(f"{bad}: shown as n/a and left out of the ranking. The run's tables hold ±inf or NaN there "
                      "(changed by hand or corrupt); rebuild the run to recompute them.", "warning")
    return fig, [note, table], bad


@callback(Output("sel", "data", allow_duplicate=True), Input("heads-map", "clickData"), prevent_initial_call=True)
def heads_select(click):
    if not click or not click.get("points"):
        return no_update
    pt = click["points"][0]
    p = Patch()
    p["layer"], p["head"] = int(pt["y"]), int(pt["x"])
    return p


# ---- direct vs total effect (SPEC "Beyond the paper (v3)": direct effect) ----------------------
EFFECT_REGIONS = {  # by the angle of (total, direct) in [0, 180) degrees: which line the head lies nearest
    "through later heads": "#E69F00",  # near direct = 0: a total effect, no direct one
    "acts directly": "#0072B2",        # near direct = total
    "cancels": "#CC79A7",              # near total = 0 or of opposite sign: later heads undo its direct effect
}


def effect_regions(total: np.ndarray, direct: np.ndarray) -> np.ndarray:
    """Each head's region (EFFECT_REGIONS) from its run-mean total and direct effect [n]: by the angle
    a of (total, direct) folded into [0, 180) degrees: a < 22.5 or >= 157.5 "through later heads",
    22.5 <= a < 67.5 "acts directly", else "cancels"."""
    a = np.degrees(np.arctan2(direct, total)) % 180.0
    names = np.array(list(EFFECT_REGIONS), dtype=object)
    return np.where((a < 22.5) | (a >= 157.5), names[0], np.where(a < 67.5, names[1], names[2]))


def effects_figure(total: np.ndarray, direct: np.ndarray, H: int, selected=None) -> dict:
    """Run-mean direct effect (y) vs total effect (x) per head [L*H], coloured by region (named in
    the legend), the lines direct = total, direct = 0 and total = 0 drawn; customdata [layer, head]."""
    regions = effect_regions(total, direct)
    idx = np.arange(len(total))
    data = []
    for name, colour in EFFECT_REGIONS.items():
        i = idx[(regions == name) & np.isfinite(total) & np.isfinite(direct)]
        data.append({"type": "scatter", "mode": "markers", "name": name, "x": total[i].tolist(),
                     "y": direct[i].tolist(), "customdata": [[int(k // H), int(k % H)] for k in i],
                     "text": [f"L{k // H}H{k % H} · {name}<br>total (logit_drop) {total[k]:.4g}<br>direct "
                              f"(direct_logit) {direct[k]:.4g}<br>indirect {total[k] - direct[k]:.4g}" for k in i],
                     "hovertemplate": "%{text}<extra></extra>", "marker": {"size": 8, "color": colour}})
    if selected is not None:
        k = selected[0] * H + selected[1]
        data.append(F.selected_ring(float(total[k]), float(direct[k])))
    finite = np.concatenate([total[np.isfinite(total)], direct[np.isfinite(direct)], [0.0]])
    lim = float(np.abs(finite).max()) * 1.05 or 1.0
    line = lambda x0, y0, x1, y1: {"type": "line", "x0": x0, "y0": y0, "x1": x1, "y1": y1, "layer": "below",
                                   "line": {"color": "#bbb", "width": 1, "dash": "dot"}}
    lay = F.layout("run mean per head: direct effect vs total effect (logit units)", showlegend=True,
                   legend={"title": {"text": "the head"}},
                   shapes=[line(-lim, -lim, lim, lim), line(-lim, 0, lim, 0), line(0, -lim, 0, lim)],
                   xaxis=F.axis("total effect: run mean of logit_drop", range=[-lim, lim], zeroline=False),
                   yaxis=F.axis("direct effect: run mean of direct_logit", range=[-lim, lim], zeroline=False))
    return {"data": data, "layout": lay}


@callback(Output("heads-effects", "figure"), Output("heads-effects-msg", "children"), Input("sel", "data"))
def heads_effects(sel):
    """The direct vs total scatter, or what the run lacks and how to add it."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), None
    if not index.has_classifier:
        return F.empty(""), message("This run's model is a backbone: its direct effect (direct_emb, a share of the "
                                    "embedding) has no total effect in the same units, so there is no scatter. "
                                    "See direct_emb in the metric menu above.", "info")
    lacking = [n for n in ("direct_logit", "logit_drop") if not index.has(n)]
    if lacking:
        return F.empty(""), message(index.run.lacks(lacking[0]) + " The image stage computes direct_logit, "
                                    "logit_drop and indirect_logit by default.", "info")
    head = index.head_index((sel or {}).get("layer"), (sel or {}).get("head"))
    selected = None if head is None else (int(sel["layer"]), int(sel["head"]))
    fig = effects_figure(index.summary("logit_drop")[0], index.summary("direct_logit")[0], index.H, selected)
    note = html.P("Each head's run-mean total effect (logit_drop: the true-class logit lost when the head is "
                  "pruned) against its direct effect (direct_logit: what it writes straight into that logit, "
                  "norm scales frozen). On the diagonal it acts directly; on the x axis it acts through later "
                  "heads; near the y axis or opposite in sign, later heads cancel what it writes. Click a head "
                  "to select it.", className="small text-muted mb-1")
    return fig, note


@callback(Output("sel", "data", allow_duplicate=True), Input("heads-effects", "clickData"), prevent_initial_call=True)
def heads_effects_select(click):
    """A click on a head of the scatter selects it."""
    cd = ((click or {}).get("points") or [{}])[0].get("customdata")
    if not (isinstance(cd, list) and len(cd) == 2):
        return no_update
    p = Patch()
    p["layer"], p["head"] = int(cd[0]), int(cd[1])
    return p


# ---- zero vs mean ablation; Taylor agreement (issue 13) ----------------------------------------

def shift_rows(index: data.RunIndex, n: int = 10) -> tuple[str, list[tuple]]:
    """(metric, rows): the n heads whose run-mean importance changes most (|ablation_shift|) between
    zero and mean ablation: (layer, head, zero mean, mean-ablated mean, shift, zero rank, mean rank)."""
    zero = "prob_drop" if {"prob_drop", "mean_prob_drop"} <= set(index.importance) else "emb_dist"
    z, m = index.summary(zero)[0], index.summary(f"mean_{zero}")[0]
    shift = index.summary("ablation_shift")[0]
    rank = lambda v: np.argsort(np.argsort(-np.where(np.isfinite(v), v, -np.inf), kind="stable"), kind="stable") + 1
    rz, rm = rank(z), rank(m)
    order = np.argsort(-np.where(np.isfinite(shift), np.abs(shift), -np.inf), kind="stable")[:n]
    return zero, [(int(i) // index.H, int(i) % index.H, z[i], m[i], shift[i], int(rz[i]), int(rm[i]))
                  for i in order if np.isfinite(shift[i])]


@callback(Output("heads-shift", "children"), Output("heads-agreement", "children"), Input("sel", "data"))
def heads_ablation_and_taylor(sel):
    index, err = load(sel)
    if index is None:
        return message(err, "danger"), None
    if "ablation_shift" in index.run_level:
        zero, rows = index.memo("shift-rows", lambda: shift_rows(index))
        head = ("rank", "head", f"{zero} zero", f"{zero} mean-abl.", "shift", "rank zero", "rank mean")
        body = [html.Tr([html.Td(r + 1), html.Td(f"L{l}H{h}"), html.Td(f"{a:.4g}"), html.Td(f"{b:.4g}"),
                         html.Td(f"{d:+.4g}"), html.Td(ra), html.Td(rb)]) for r, (l, h, a, b, d, ra, rb) in enumerate(rows)]
        shift = [html.P(f"Heads whose importance changes most between zero and mean ablation: |run mean of "
                        f"mean_{zero} - {zero}| (ablation_shift), largest first. Positive: the head matters more "
                        "than zeroing says; negative: zeroing overstates it. Ranks: by the run mean under each.",
                        className="small text-muted mb-1"),
                 dbc.Table([html.Thead(html.Tr([html.Th(c) for c in head])), html.Tbody(body)], size="sm",
                           hover=True, striped=True, id="heads-shift-table")]
    else:
        shift = message("This run has no mean-ablated metrics: build it with the mean-ablation stage "
                        "(scripts/build_cache.py --mean-ablation).", "info")
    agreement = index.manifest.get("taylor_agreement") or {}
    if agreement:
        head = ("Taylor metric (approx.)", "images", "per image: median", "q25", "q75", "of the run means")
        body = [html.Tr([html.Td(name), html.Td(a.get("images")), *(html.Td(_rho(a.get(k))) for k in
                         ("per_image_median", "per_image_q25", "per_image_q75", "run_means"))])
                for name, a in agreement.items()]
        taylor = [html.P("Agreement of the approximate Taylor metrics with the exact prob_drop: Spearman's rank "
                         "correlation over the L*H heads, per image (median and quartiles over images) and of the "
                         "run means (SPEC).", className="small text-muted mb-1"),
                  dbc.Table([html.Thead(html.Tr([html.Th(c) for c in head])), html.Tbody(body)], size="sm",
                            striped=True, id="heads-agreement-table")]
    elif "taylor_prob_drop" in index.importance:
        taylor = message("This run has the Taylor metrics but not the exact prob_drop (a Taylor-only build): no "
                         "agreement to show.", "info")
    else:
        taylor = message("This run has no Taylor metrics: build it with the Taylor stage to compare.", "info")
    return shift, taylor


def _rho(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


# ---- category labels (pattern, ...): modal label, its share, consistency (sortable) -----------

def label_columns(index: data.RunIndex, metric: str) -> list[str]:
    """The run-level scalar metrics shown beside a category metric's labels: those of its registry
    group (``consistency`` beside ``pattern``)."""
    group = registry.get_metric(metric).group
    return [n for n in index.run_level if registry.get_metric(n).group == group]


def pattern_rows(index: data.RunIndex, metric: str = "pattern") -> list[dict]:
    """One row per head: layer, head, modal label of the category metric ``metric``, share of images
    with it, and the run-level metrics of its group (``label_columns``: consistency for pattern)."""
    modal, share = modal_labels(index.run.dense(metric))
    extra = {n: index.run.dense(n) for n in label_columns(index, metric)}
    value = lambda v: None if not np.isfinite(v) else round(float(v), 4)
    return [{"layer": l, "head": h, "label": modal[l, h], "share": round(float(share[l, h]), 4),
             **{n: value(a[l, h]) for n, a in extra.items()}}
            for l in range(index.L) for h in range(index.H)]


def label_table(index: data.RunIndex, metric: str) -> list:
    """(description, sortable table ``heads-<metric>-table``) of one category metric."""
    m = registry.get_metric(metric)
    extra = [registry.get_metric(n) for n in label_columns(index, metric)]
    rows = index.memo(("label-rows", metric), lambda: pattern_rows(index, metric))
    columns = [{"name": "layer", "id": "layer"}, {"name": "head", "id": "head"},
               {"name": "modal label", "id": "label"}, {"name": "share of images", "id": "share"},
               *({"name": e.label, "id": e.name} for e in extra)]
    about = "".join(f"; its {e.label}: {e.meaning}" for e in extra)
    return [html.P([html.B(f"{m.label}: "), f"each head's most frequent {m.label} label over the run's images, the "
                    f"share of images with that label{about}. Click a column header to sort."],
                   className="small text-muted mb-1"),
            dash_table.DataTable(id=f"heads-{metric}-table", data=rows, columns=columns, sort_action="native",
                                 sort_by=[{"column_id": extra[0].name if extra else "share", "direction": "desc"}],
                                 page_size=12, style_cell={"fontSize": "0.8rem", "padding": "2px 6px"},
                                 style_header={"fontWeight": "bold"})]


@callback(Output("heads-patterns", "children"), Input("sel", "data"))
def heads_patterns(sel):
    """One table per category metric of the run (``pattern`` first, then registry order), then what
    the run lacks of the registered ones (how to add them)."""
    index, err = load(sel)
    if index is None:
        return message(err, "danger")
    why = dict.fromkeys(index.run.lacks(m.name) for m in data.category_metrics() if m.name not in index.categories)
    lacking = [message(text, "warning") for text in why]  # one note for the pattern metrics an older run lacks
    if not index.categories:
        return lacking
    return [part for name in index.categories for part in label_table(index, name)] + lacking


# ---- class level: class x head heatmap and class specificity ---------------------------------
CLASS_MAP_HEAD_PX = 14   # the class heatmap's width per head column: a label for every head
CLASS_MAP_FRAME_PX = 280  # its class names, colour bar and margins


@callback(Output("heads-class-map", "style"), Input("sel", "data"))
def heads_class_size(sel):
    """The class heatmap as wide as its L*H head columns need to be labelled (scrolls sideways in its column)."""
    index, _ = load(sel)
    heads = 0 if index is None else index.L * index.H
    return {"height": "420px", "width": f"max(100%, {CLASS_MAP_FRAME_PX + CLASS_MAP_HEAD_PX * heads}px)"}


@callback(Output("heads-class-metric", "options"), Output("heads-class-metric", "value"), Input("sel", "data"),
          State("heads-class-metric", "value"))
def heads_class_metric(sel, current):
    index, _ = load(sel)
    if index is None:
        return [], None
    names = index.importance + index.properties
    if not names:
        return [], None
    default = "prob_drop" if "prob_drop" in names else names[0]
    return data.metric_options(names), current if current in names else default


IMAGES = {"all": "all images", "correct": "correctly predicted", "wrong": "mispredicted"}


def class_view(index: data.RunIndex, metric: str, images: str):
    """(classes, counts, mean [C, L*H], specificity [L*H], best class [L*H]) over the chosen images:
    "all", the correctly predicted ("correct") or the mispredicted ("wrong") ones."""
    labels = index.images["label"].to_numpy(np.int64)
    keep = np.ones(len(labels), bool)
    if images in ("correct", "wrong") and "pred" in index.images.columns:
        keep = (index.images["pred"].to_numpy(np.int64) == labels) == (images == "correct")
    values = index.values(metric)[keep]
    stats = class_statistics(values, labels[keep])
    if not len(stats.classes):
        return stats, None, None
    spec = class_specificity(values, labels[keep])
    best = stats.classes[np.argmax(np.where(np.isfinite(stats.mean), stats.mean, -np.inf), axis=0)]
    return stats, spec, best


@callback(Output("heads-class-map", "figure"), Output("heads-specificity", "children"),
          Output("heads-class-msg", "children"), Input("sel", "data"), Input("heads-class-metric", "value"),
          Input("heads-class-images", "value"))
def heads_class_view(sel, metric, images):
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), None, None
    if metric not in index.importance + index.properties:
        return F.empty("Choose a metric."), None, None
    if images != "all" and not index.has_classifier:
        return F.empty(""), None, message("This run's model has no classifier: no image is correctly or wrongly "
                                          "predicted. Choose all images.", "warning")
    stats, spec, best = index.memo(("class-view", metric, images), lambda: class_view(index, metric, images))
    if spec is None:
        if images != "all":
            return F.empty(f"No {IMAGES[images]} image with a class label."), None, None
        return F.empty("No image of this run has a known class label."), None, message(
            "Class views need images with true labels (a folder of class sub-folders or a manifest with labels).",
            "warning")
    m = registry.get_metric(metric)
    names = [f"{F.plotly_text(index.class_name(c))} (n={k})" for c, k in zip(stats.classes, stats.counts)]  # as text
    heads = [f"L{l}H{h}" for l in range(index.L) for h in range(index.H)]
    z = stats.mean.reshape(len(stats.classes), -1)
    std = stats.std.reshape(len(stats.classes), -1)
    band = [[("n=1, no band" if k < 2 else f"std {v:.3g}") for v in row] for k, row in zip(stats.counts, std)]
    fig = {"data": [{"type": "heatmap", "z": np.where(np.isfinite(z), z, None).tolist(), "x": heads, "y": names,
                     "customdata": band, "colorscale": "Cividis", "reversescale": m.important == "low",
                     "colorbar": {"title": {"text": "class mean"}, "thickness": 10},
                     "hovertemplate": "%{y}<br>%{x}<br>mean %{z:.4g}, %{customdata}<extra></extra>"}],
           "layout": F.layout(f"class mean of {m.title}" + ("" if images == "all" else f" · {IMAGES[images]} images"),
                              xaxis=F.axis("head (L layer H head)", type="category", dtick=1, tickangle=-90,
                                           tickfont={"size": 9}),
                              yaxis=F.axis("class", type="category", autorange="reversed"))}
    order = np.argsort(-np.where(np.isfinite(spec), spec, -np.inf).reshape(-1), kind="stable")[:20]
    flat_spec, flat_best = spec.reshape(-1), best.reshape(-1)
    rows = [html.Tr([html.Td(r + 1), html.Td(int(i // index.H)), html.Td(int(i % index.H)),
                     html.Td(index.class_name(flat_best[i])), html.Td(f"{flat_spec[i]:.4g}")])
            for r, i in enumerate(order) if np.isfinite(flat_spec[i])]
    table = [html.P(f"Class specificity of {metric}: max over classes of the class mean minus the mean over all "
                    "labelled images (highest first).", className="small text-muted mb-1"),
             dbc.Table([html.Thead(html.Tr([html.Th(c) for c in ("rank", "layer", "head", "class", "specificity")])),
                        html.Tbody(rows)], size="sm", hover=True, striped=True, id="heads-specificity-table")]
    note = None
    if (stats.counts < 2).any():
        note = message(f"{int((stats.counts < 2).sum())} class(es) have a single image: their count is shown "
                       "instead of a band.", "info")
    return fig, table, note
