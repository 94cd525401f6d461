"""The circuit panel of view D (SPEC "Beyond the paper (v3)": head-to-head paths, direct effect).

The selected image's circuit: heads laid out by layer (x = layer, y = head) and the logit (or, for a
backbone, the embedding) node; edges a -> b drawn by their path value (the top k by |value|, at
least the threshold; via q, k, v or all three) and a -> logit edges by the direct effect; nodes
coloured by the direct effect. Edge values come from edge attribution patching, an approximation
(online, one forward and backward per image, cached per (run, image)); "exact values for the shown
edges" computes them by path patching and relabels them. "run mean" shows the run's stored mean
circuit (the build's --circuits stage). A click on a node selects that head in every view; a click
on an edge's marker makes the pair the head set.
"""
from __future__ import annotations

import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, Patch, State, callback, clientside_callback, ctx, dcc, html, no_update

from analysis.errors import HeadScopeError
from analysis.serving import transport
from analysis.serving.service import MAX_EXACT_EDGES
from analysis.serving.transport import OnlineError

from app import config, figures as F
from app.views import graph, load, loading, message

HEIGHT = 330
VIAS = {"qkv": "QKV", "q": "Q", "k": "K", "v": "V"}
SOURCES = {"image": "this image", "mean": "run mean"}
DEFAULT_K = 20
POSITIVE, NEGATIVE = "#2166ac", "#b2182b"  # blue / red, as the nodes' colour scale (plotly.js RdBu reversed)
COMPUTING = ("Computing this image's circuit online: edge attribution patching gives every edge from one "
             "forward and one backward pass (a few seconds on a busy CPU); exact values take one partial "
             "forward per edge.")
EXACT_LABEL = {"path_logit": "path_logit (exact, path patching)", "path_emb": "path_emb (exact, path patching)"}
EAP_LABEL = "path_logit_eap (APPROXIMATE: edge attribution patching)"


def panel():
    """The panel's layout (view D's right part while the switch names it)."""
    return html.Div([
        html.Div([html.Span("Circuit ", className="sub-title"),
                  dbc.RadioItems(id="circ-source", options=[{"label": v, "value": k} for k, v in SOURCES.items()],
                                 value="image", inline=True, className="small toggle"),
                  html.Span("via", className="small text-muted"),
                  dbc.RadioItems(id="circ-via", options=[{"label": v, "value": k} for k, v in VIAS.items()],
                                 value="qkv", inline=True, className="small toggle"),
                  html.Span("top", className="small text-muted"),
                  dbc.Input(id="circ-k", type="number", min=1, max=MAX_EXACT_EDGES, step=1, value=DEFAULT_K,
                            size="sm", debounce=True, className="circ-num"),
                  html.Span("|value| ≥", className="small text-muted"),
                  dbc.Input(id="circ-thr", type="number", min=0, step="any", value=0, size="sm", debounce=True,
                            className="circ-num"),
                  dbc.Button("exact values for the shown edges", id="circ-exact-btn", size="sm", color="secondary",
                             outline=True, n_clicks=0, className="py-0")],
                 className="d-flex align-items-center gap-2 flex-wrap circ-controls"),
        loading([html.Div(id="circ-msg"), graph("circ-graph", HEIGHT)],
                note=[dbc.Spinner(size="sm", color="secondary"), html.Span(COMPUTING)]),
        html.Div("Click a head: select it in every view · click an edge's diamond: that pair becomes the head set.",
                 className="small text-muted"),
        dcc.Store(id="circ-key"), dcc.Store(id="circ-exact"),
    ], className="circuit-panel", id="circuit-panel")


# ---- the data: pure functions of the engine's arrays -----------------------------------------
def via_scores(eap: dict, via: str) -> np.ndarray:
    """EAP values [L, H (receiver b), L, H (sender a)] for ``via``: the q, k or v part, or their sum (qkv)."""
    parts = [np.asarray(eap[p], dtype=np.float64) for p in (("q", "k", "v") if via == "qkv" else (via,))]
    return np.nan_to_num(sum(parts[1:], parts[0]))


def top_edges(scores: np.ndarray, k: int, threshold: float = 0.0) -> list[tuple[int, int, int, int, float]]:
    """The edges a -> b (a before b) of ``scores`` [L, H (b), L, H (a)] with |value| >= threshold and
    non-zero, the k largest |value| first: [(a_layer, a_head, b_layer, b_head, value)]."""
    L, H = scores.shape[:2]
    bl, bh, al, ah = np.meshgrid(*(np.arange(n) for n in (L, H, L, H)), indexing="ij")
    keep = (al < bl) & (np.abs(scores) >= threshold) & (scores != 0) & np.isfinite(scores)
    flat = np.flatnonzero(keep.ravel())
    order = flat[np.argsort(-np.abs(scores.ravel()[flat]), kind="stable")][:max(int(k), 0)]
    return [(int(al.flat[i]), int(ah.flat[i]), int(bl.flat[i]), int(bh.flat[i]), float(scores.flat[i]))
            for i in order]


def top_heads(direct: np.ndarray, k: int, threshold: float = 0.0) -> list[tuple[int, int, float]]:
    """The heads with the k largest |direct effect| [L, H] (at least the threshold): [(layer, head, value)]."""
    d = np.asarray(direct, dtype=np.float64)
    flat = np.flatnonzero(np.isfinite(d.ravel()) & (np.abs(d.ravel()) >= threshold) & (d.ravel() != 0))
    order = flat[np.argsort(-np.abs(d.ravel()[flat]), kind="stable")][:max(int(k), 0)]
    H = d.shape[1]
    return [(int(i // H), int(i % H), float(d.flat[i])) for i in order]


def backbone_edges(direct: np.ndarray, head: tuple[int, int], k: int) -> list[list[int]]:
    """A backbone's small set for exact path_emb: edges into ``head`` from the k heads of earlier
    layers with the largest |direct_emb|."""
    layer = head[0]
    earlier = np.where(np.arange(direct.shape[0])[:, None] < layer, np.asarray(direct, np.float64), np.nan)
    return [[l, h, *head] for l, h, _ in top_heads(earlier, k)]


def with_exact(edges: list[tuple], rows: list[list]) -> list[tuple]:
    """The edges with their values replaced by the exact ones of ``rows`` [[a_l, a_h, b_l, b_h, value]]."""
    exact = {tuple(r[:4]): float(r[4]) for r in rows}
    return [(*e[:4], exact[tuple(e[:4])]) for e in edges if tuple(e[:4]) in exact]


# ---- the figure ------------------------------------------------------------------------------
HANDLE = 0.55  # where along a -> b its clickable marker sits: never on a node (that needs b - a = 20k)


def handle(a: float, b: float) -> float:
    """The coordinate of an edge's clickable marker between its ends a and b."""
    return a + HANDLE * (b - a)


def _width(value: float, top: float) -> float:
    return 1.0 + 5.0 * abs(value) / top if top > 0 else 1.0


def circuit_figure(direct: np.ndarray, edges: list[tuple], logit_edges: list[tuple], *, edge_label: str,
                   direct_label: str, sink_name: str = "logit", title: str = "", selected=None,
                   head_set=()) -> dict:
    """Heads at (layer, head), the sink node (logit / embedding) at x = L; an edge a -> b per
    (a_layer, a_head, b_layer, b_head, value) of ``edges`` and a -> sink per (layer, head, value) of
    ``logit_edges``, width by |value| (one scale for both), blue positive, red negative; a clickable
    marker on each a -> b edge (at HANDLE of the way) (customdata [a_layer, a_head, b_layer, b_head]); nodes coloured by
    ``direct`` [L, H] (RdBu around 0; customdata [layer, head]); ``selected`` (layer, head) ringed,
    ``head_set`` heads outlined green."""
    d = np.asarray(direct, dtype=np.float64)
    L, H = d.shape
    sink = (L, (H - 1) / 2)
    values = [abs(e[4]) for e in edges] + [abs(e[2]) for e in logit_edges]
    top = max(values, default=0.0)
    data = []
    for al, ah, bl, bh, v in edges:
        data.append({"type": "scatter", "x": [al, bl], "y": [ah, bh], "mode": "lines", "hoverinfo": "skip",
                     "line": {"color": POSITIVE if v > 0 else NEGATIVE, "width": _width(v, top)}, "opacity": 0.7})
    for l, h, v in logit_edges:
        data.append({"type": "scatter", "x": [l, sink[0]], "y": [h, sink[1]], "mode": "lines", "hoverinfo": "skip",
                     "line": {"color": POSITIVE if v > 0 else NEGATIVE, "width": _width(v, top), "dash": "dot"},
                     "opacity": 0.5})
    if edges:
        data.append({"type": "scatter", "mode": "markers", "name": "edges",
                     "x": [handle(e[0], e[2]) for e in edges], "y": [handle(e[1], e[3]) for e in edges],
                     "customdata": [list(e[:4]) for e in edges],
                     "text": [f"L{al}H{ah} → L{bl}H{bh}<br>{edge_label}: {v:.4g}" for al, ah, bl, bh, v in edges],
                     "hovertemplate": "%{text}<extra></extra>",
                     "marker": {"size": 8, "symbol": "diamond", "line": {"width": 0},
                                "color": [POSITIVE if e[4] > 0 else NEGATIVE for e in edges]}})
    ll, hh = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
    lim = float(np.nanmax(np.abs(d))) if np.isfinite(d).any() else 1.0
    in_set = {tuple(h) for h in head_set or ()}
    data.append({"type": "scatter", "mode": "markers", "name": "heads", "x": ll.ravel().tolist(),
                 "y": hh.ravel().tolist(), "customdata": np.stack([ll.ravel(), hh.ravel()], 1).tolist(),
                 "text": [f"L{l}H{h}<br>{direct_label}: " + ("n/a" if not np.isfinite(d[l, h]) else f"{d[l, h]:.4g}")
                          for l, h in zip(ll.ravel(), hh.ravel())],
                 "hovertemplate": "%{text}<extra></extra>",
                 "marker": {"size": 13, "color": F.finite_or_none(d.ravel()), "colorscale": "RdBu", "reversescale": True, "cmin": -lim,
                            "cmax": lim, "cmid": 0,
                            "colorbar": {"title": {"text": direct_label, "side": "right"}, "thickness": 10},
                            "line": {"color": [F.SET_GREEN if (l, h) in in_set else "#777"
                                               for l, h in zip(ll.ravel(), hh.ravel())],
                                     "width": [3 if (l, h) in in_set else 1 for l, h in zip(ll.ravel(), hh.ravel())]}}})
    data.append({"type": "scatter", "mode": "markers+text", "x": [sink[0]], "y": [sink[1]], "name": sink_name,
                 "text": [sink_name], "textposition": "top center", "hoverinfo": "text",
                 "hovertext": [f"{sink_name}: a → {sink_name} edges are {direct_label}"],
                 "marker": {"size": 16, "symbol": "diamond", "color": "#333"}})
    if selected is not None:
        data.append(F.selected_ring(selected[0], selected[1]))
    lay = F.layout(title, margin={"l": 40, "r": 10, "t": 30, "b": 36},
                   xaxis=F.axis("layer", tickvals=list(range(L)) + [L],
                                ticktext=[str(l) for l in range(L)] + [sink_name],
                                range=[-0.5, L + 0.6]),
                   yaxis=F.axis("head", dtick=1, range=[H - 0.5, -0.7]))
    if title:
        lay["title"]["font"] = {"size": 11}
    return {"data": data, "layout": lay}


# ---- the callbacks ---------------------------------------------------------------------------
# The panel computes only while it shows: circ-key follows the image, head and head set then.
clientside_callback(
    """
    function(image, head, heads, panel) {
        return panel === 'circuit' ? Object.assign({}, image, head, {heads: (heads || {}).heads || null})
                                   : window.dash_clientside.no_update;
    }
    """,
    Output("circ-key", "data"), Input("k-image", "data"), Input("k-head", "data"), Input("k-heads", "data"),
    Input("d-panel", "value"),
)


def _exact_key(key: dict, source: str, via: str, k, thr, per_head: bool) -> dict:
    """What the exact values were computed for: the shown edges follow from these (and, for a
    backbone, whose edges go into the selected head, from the head: ``per_head``)."""
    head = {"layer": key.get("layer"), "head": key.get("head")} if per_head else {}
    return {"image": key.get("image"), **head, "source": source, "via": via, "k": k, "thr": thr}


def _k(k) -> int:
    return int(min(max(int(k or DEFAULT_K), 1), MAX_EXACT_EDGES))


def _thr(thr) -> float:
    return max(float(thr or 0.0), 0.0)


@callback(Output("circ-graph", "figure"), Output("circ-msg", "children"), Output("circ-exact", "data"),
          Input("circ-key", "data"), Input("circ-source", "value"), Input("circ-via", "value"),
          Input("circ-k", "value"), Input("circ-thr", "value"), Input("circ-exact-btn", "n_clicks"),
          State("circ-exact", "data"), State("d-panel", "value"), State("sel", "data"))
def view_circuit(key, source, via, k, thr, _exact_clicks, exact_for, panel, sel):
    """The circuit of the image (or the run mean); exact values when the button asked for them for
    exactly what is shown."""
    if panel != "circuit" or not key:
        return no_update, no_update, no_update
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), None, None
    current = _exact_key(key, source, via, k, thr, per_head=not index.has_classifier)
    asked = ctx.triggered_id == "circ-exact-btn"
    exact = asked or exact_for == current
    selected = index.head_index(key.get("layer"), key.get("head"))
    selected = None if selected is None else (int(key["layer"]), int(key["head"]))
    try:
        if source == "mean":
            fig, note = _mean_view(index, via, _k(k), _thr(thr), selected, key.get("heads"))
            return fig, note, None
        fig, note = _image_view(index, key, via, _k(k), _thr(thr), selected, exact)
    except (OnlineError, HeadScopeError) as err:
        return F.empty(""), message(str(err), "danger"), None
    return fig, note, current if exact else None


def _image_view(index, key: dict, via: str, k: int, thr: float, selected, exact: bool):
    """(figure, note) of the selected image's circuit."""
    pos = index.pos(key.get("image"))
    if pos is None:
        return F.empty("Select an image (A) to see its circuit."), None
    image_id = int(index.image_ids[pos])
    run_dir = config.run_dir(index.name)
    out = transport.circuit(run_dir, image_id)
    direct = np.array([[np.nan if v is None else v for v in row] for row in out["direct"]], float)
    name = out["direct_name"]
    direct_label = f"{name} ({'run' if out['direct_stored'] else 'computed now'})"
    heads = key.get("heads") or ()
    if not out["classifier"]:
        return _backbone_view(run_dir, image_id, direct, direct_label, via, k, selected, heads, exact)
    edges = top_edges(via_scores(out["eap"], via), k, thr)
    label = EAP_LABEL
    if exact and edges:
        res = transport.circuit_exact(run_dir, image_id, [list(e[:4]) for e in edges], via)
        edges, label = with_exact(edges, res["rows"]), EXACT_LABEL[res["name"]]
    sink = f"logit {index.class_name(out['label'])}"
    title = (f"image {image_id} · {len(edges)} edges via {VIAS[via]}: {label}"
             + (" · values of the top edges by EAP" if exact else ""))
    fig = circuit_figure(direct, edges, top_heads(direct, k, thr), edge_label=label, direct_label=direct_label,
                         sink_name=sink, title=title, selected=selected, head_set=heads)
    note = message("No edge reaches the threshold: lower it.", "info") if not edges else (
        None if exact else message(agreement_note(index.run), "info"))
    return fig, note


def _backbone_view(run_dir, image_id, direct, direct_label, via, k, selected, heads, exact):
    """A backbone has no class logit for edge attribution patching: exact path_emb for the edges into
    the selected head from the k earlier heads with the largest |direct_emb|, on request."""
    what = ("This run's model is a backbone: edge attribution patching estimates path_logit and needs a "
            "classifier. Exact path_emb (cosine distance of the pooled embedding) is available for a small set: ")
    if selected is None or selected[0] == 0:
        return (circuit_figure(direct, [], [], edge_label="", direct_label=direct_label, sink_name="embedding",
                               title=f"image {image_id} · nodes by {direct_label}", head_set=heads),
                message(what + "select a head of layer 1 or later, then press 'exact values' for the edges into "
                        "it.", "info"))
    candidates = backbone_edges(direct, selected, k)
    edges = []
    if exact:
        res = transport.circuit_exact(run_dir, image_id, candidates, via)
        edges = [tuple(r) for r in res["rows"]]
    title = (f"image {image_id} · edges into L{selected[0]}H{selected[1]} via {VIAS[via]}: "
             + (EXACT_LABEL["path_emb"] if exact else "not computed"))
    fig = circuit_figure(direct, edges, [], edge_label=EXACT_LABEL["path_emb"], direct_label=direct_label,
                         sink_name="embedding", title=title, selected=selected, head_set=heads)
    return fig, None if exact else message(what + f"press 'exact values' for the {len(candidates)} edges into "
                                         f"L{selected[0]}H{selected[1]} from the earlier heads with the largest "
                                         "|direct_emb|.", "info")


def _mean_view(index, via: str, k: int, thr: float, selected, heads):
    """(figure, note) of the run's stored mean circuit, or what to build when it has none."""
    if not index.run.has_circuits:
        return (F.empty("This run has no stored circuits."),
                message(index.run.lacks_circuits() + " Meanwhile 'this image' computes one image's circuit online.",
                        "info"))
    direct = (index.summary("direct_logit")[0].reshape(index.L, index.H) if index.has("direct_logit")
              else np.full((index.L, index.H), np.nan))
    edges = top_edges(run_mean_circuit(index.run, via), k, thr)
    label = "run mean of path_logit_eap (APPROXIMATE)"
    images = (index.manifest.get("circuits") or {}).get("images", index.n)
    fig = circuit_figure(direct, edges, top_heads(direct, k, thr), edge_label=label,
                         direct_label="run mean direct_logit", sink_name="logit", selected=selected, head_set=heads,
                         title=f"run mean over {images} images · {len(edges)} edges via {VIAS[via]}: {label}")
    asked = ctx.triggered_id == "circ-exact-btn"
    return fig, message("Exact values are per image: choose 'this image'." if asked else agreement_note(index.run),
                        "info")


def agreement_note(run) -> str | None:
    """How well EAP agreed with exact path patching on this run (its circuits stage), when measured."""
    a = run.circuit_agreement
    if not a or a.get("per_image_median") is None:
        return None
    return (f"On this run, EAP ranks an image's edges like exact path patching with Spearman "
            f"{a['per_image_median']:.2f} "
            f"(median; quartiles {a['per_image_q25']:.2f}-{a['per_image_q75']:.2f}) over {a['images']} images, via "
            f"{VIAS.get(a.get('via'), a.get('via'))}.")


def run_mean_circuit(run, via: str) -> np.ndarray:
    """The run's stored mean circuit (Run.circuit_mean) as [L, H (receiver b), L, H (sender a)]."""
    df = run.circuit_mean(via)
    scores = np.zeros((run.L, run.H, run.L, run.H))
    scores[df.b_layer.to_numpy(), df.b_head.to_numpy(), df.a_layer.to_numpy(), df.a_head.to_numpy()] = \
        df.path_logit_eap.to_numpy(np.float64)
    return scores


@callback(Output("sel", "data", allow_duplicate=True), Input("circ-graph", "clickData"), State("sel", "data"),
          prevent_initial_call=True)
def click_circuit(click, sel):
    """A head node selects that head; an edge's marker makes its two heads the head set."""
    cd = ((click or {}).get("points") or [{}])[0].get("customdata")
    p = Patch()
    if isinstance(cd, list) and len(cd) == 2:
        p["layer"], p["head"] = int(cd[0]), int(cd[1])
        return p
    if isinstance(cd, list) and len(cd) == 4:
        p["heads"] = sorted([[int(cd[0]), int(cd[1])], [int(cd[2]), int(cd[3])]])
        return p
    return no_update
