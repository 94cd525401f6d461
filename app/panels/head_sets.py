"""The Explorer's view B beyond one head at a time (issue 13, SPEC "Several heads at once").

* The head set: heads pinned with the pin button or a shift-click in B1 (or typed into its chip
  box), held in the view state (``sel["heads"]``, the URL's ``heads=layer:head,...``) and pruned all
  at once on the selected image (online: ``transport.head_set``): prob / prob_drop / jsd /
  emb_dist and the top-5 under the whole set next to the selected head's alone.
* Pair interactions: the image's ``k`` most important heads by the chosen metric, or the current
  head set, and the SPEC interaction ``m({a,b}) - m({a}) - m({b})`` of every pair
  (``transport.pair_interactions``), a heatmap with the single-head values on its margin, as tall as
  its rows need to be labelled; a click on a cell makes that pair the set (top-k heads only: the
  set's own heatmap would shrink to the pair).
* B1 overlays: the Taylor estimate (approximate) on the exact prob_drop, and the mean-ablated
  metric next to the zero-ablated one, when the run has them.

The bottom of view B shows one of three panels (B2/B3, the set, the pairs): no extra height.
"""
from __future__ import annotations

import re

import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, Patch, State, callback, clientside_callback, ctx, dcc, html, no_update

from analysis.errors import HeadScopeError
from analysis.metrics import registry
from analysis.metrics.head_sets import MAX_PAIR_HEADS, MAX_SET_HEADS, SET_METRICS
from analysis.serving.transport import OnlineError

from app import data, figures as F
from app.views import graph, load, loading, message

DEFAULT_K = 8
PAIRS_FROM = {"top": "the image's top", "set": "the head set"}  # whose pairs the heatmap shows
VIEWS = {"b23": "B2/B3 · one head", "set": "head set", "pairs": "pairs"}
HEIGHT = 168  # the height of the B2/B3 row it shares
ZERO_MEAN = {m: f"mean_{m}" for m in SET_METRICS}  # zero-ablated metric -> its mean-ablated twin


def tools() -> list:
    """View B's header controls: B1 overlays, the pin button, the panel switch."""
    return [
        dbc.Checklist(id="b1-overlay", options=[{"label": "Taylor (approx.)", "value": "taylor"},
                                                 {"label": "mean abl.", "value": "mean"}],
                      value=[], inline=True, className="small toggle",
                      inputClassName="me-1"),
        dbc.Button("pin head", id="hs-pin", size="sm", color="success", outline=True, n_clicks=0, className="py-0",
                   title="add the selected head to the head set (or shift-click a head in B1)"),
        dbc.RadioItems(id="hs-view", options=[{"label": v, "value": k} for k, v in VIEWS.items()], value="b23",
                       inline=True, className="small toggle"),
    ]


def bottom(b23, query: dict) -> html.Div:
    """The bottom of view B: ``b23`` (the B2/B3 row), the head-set panel and the pairs panel; the
    set panel shows first when the URL names a set."""
    first = "set" if query.get("heads") else "b23"
    show = lambda k: {} if k == first else {"display": "none"}
    set_panel = dbc.Row([
        dbc.Col([
            html.Div([dcc.Dropdown(id="hs-set", multi=True, placeholder="pin heads, shift-click B1, or type L3H2",
                                   className="hs-set"),
                      dbc.Button("clear", id="hs-clear", size="sm", color="link", className="p-0 small", n_clicks=0)],
                     className="d-flex align-items-center gap-1"),
            loading([html.Div(id="hs-msg"), html.Div(id="hs-table", className="hs-table")]),
        ], width=6),
        dbc.Col(loading([graph("hs-top5", HEIGHT - 8)]), width=6),
    ], className="g-1", id="hs-set-panel", style=show("set"))
    pairs_panel = html.Div([
        html.Div([dbc.RadioItems(id="hs-pairs-from", options=[{"label": v, "value": k} for k, v in PAIRS_FROM.items()],
                                 value="top", inline=True, className="small toggle"),
                  dbc.Input(id="hs-k", type="number", min=2, max=MAX_PAIR_HEADS, step=1, value=DEFAULT_K, size="sm",
                            debounce=True, className="hs-k"),
                  html.Span("most important heads by the metric (click a cell: that pair becomes the set)",
                            className="small text-muted")], className="d-flex align-items-center gap-1"),
        loading([html.Div(id="hs-pairs-msg"), graph("hs-pairs-graph", HEIGHT - 28)]),
    ], id="hs-pairs-panel", style=show("pairs"))
    return html.Div([html.Div(b23, id="hs-b23", style=show("b23")), set_panel, pairs_panel,
                     dcc.Store(id="k-heads"), dcc.Store(id="hs-set-key"),
                     dcc.Store(id="hs-pairs-key")])


def b1_extras(index: data.RunIndex, metric: str, pos: int | None, overlay, heads) -> dict:
    """F.head_importance's ``overlays``, ``overlay_notes`` and ``pinned`` for B1: the Taylor estimate
    over prob_drop, the other ablation of the metric (mean vs zero), of the image (or the run mean);
    an overlay that is ticked but cannot be drawn for ``metric`` on this run says why instead."""
    def curve(name):
        return index.values(name)[pos] if pos is not None else index.summary(name)[0]

    overlays, notes = [], []
    if "taylor" in (overlay or []):
        if metric != "prob_drop":
            notes.append(f"Taylor (approx.) estimates prob_drop only: choose prob_drop as B1's metric "
                         f"(now {metric}) to see it.")
        elif "taylor_prob_drop" not in index.importance:
            notes.append(f"Taylor (approx.): run {index.name} has no Taylor estimate; build it with "
                         "python scripts/build_cache.py --taylor.")
        else:
            overlays.append(("taylor", "Taylor estimate (approx.)", curve("taylor_prob_drop")))
    if "mean" in (overlay or []):
        zero = metric[5:] if metric.startswith("mean_") else metric
        twin = ZERO_MEAN.get(zero)
        other = zero if metric.startswith("mean_") else twin
        if twin is None:
            notes.append(f"mean abl.: {metric} has no mean-ablated twin; choose one of "
                         f"{', '.join(SET_METRICS)} (or its mean_ version) as B1's metric.")
        elif not (twin in index.importance and other in index.importance):
            notes.append(f"mean abl.: run {index.name} has no {twin}; build it with "
                         "python scripts/build_cache.py --mean-ablation.")
        else:
            overlays.append(("mean", "zero ablation" if other == zero else "mean ablation", curve(other)))
    return {"overlays": overlays, "overlay_notes": notes, "pinned": [tuple(h) for h in heads or []]}


_CALLBACKS: list = []
_CLIENTSIDE: list = []


def _clientside(*args, **kwargs):
    _CLIENTSIDE.append((args, kwargs))


# ---- the state: sel.heads -> k-heads; shift-clicks; the panel switch --------------------------------
_clientside(
    """
    function(sel, held) {
        const s = sel || {}, v = {run: s.run || null, heads: s.heads || null};
        return JSON.stringify(v) === JSON.stringify(held) ? window.dash_clientside.no_update : v;
    }
    """,
    Output("k-heads", "data"), Input("sel", "data"), State("k-heads", "data"),
)

# A hidden panel costs nothing: its view listens to a store (hs-set-key, hs-pairs-key) that
# follows the parts it depends on only while the panel shows, and at once when it is shown.
for _view, _store, _parts in (("set", "hs-set-key", ("image", "head", "heads")),
                              ("pairs", "hs-pairs-key", ("image", "metric", "heads"))):
    _clientside(
        f"""
        function(...args) {{
            const view = args.pop();
            return view === '{_view}' ? Object.assign({{}}, ...args) : window.dash_clientside.no_update;
        }}
        """,
        Output(_store, "data"), *[Input(f"k-{part}", "data") for part in _parts], Input("hs-view", "value"),
    )

_clientside(
    """
    function(view) {
        const hide = {display: 'none'};
        return [view === 'b23' ? {} : hide, view === 'set' ? {} : hide, view === 'pairs' ? {} : hide];
    }
    """,
    Output("hs-b23", "style"), Output("hs-set-panel", "style"), Output("hs-pairs-panel", "style"),
    Input("hs-view", "value"), prevent_initial_call=True,
)




def _deferred(*args, **kwargs):
    """Declare a callback that register() adds to the app being built (see there)."""
    def wrap(fn):
        _CALLBACKS.append((args, kwargs, fn))
        return fn
    return wrap


def register() -> None:
    """Register the panels' callbacks; the Explorer page calls it each time Dash imports the page
    (create_app clears the callback list, and this module, imported once, would not run again)."""
    for args, kwargs, fn in _CALLBACKS:
        callback(*args, **kwargs)(fn)
    for args in _CLIENTSIDE:
        clientside_callback(*args[0], **args[1])


def _key(l, h) -> str:
    return f"{int(l)}:{int(h)}"


def _heads(sel: dict) -> list[list[int]]:
    return [[int(l), int(h)] for l, h in (sel or {}).get("heads") or []]


# The chip box -> sel.heads, in the browser (assets/explorer.js hsHeadSet): a removed chip or a
# typed head; the box filled by show_set from sel.heads gives the same heads and changes nothing (no
# request, and nothing that the views' requests must wait for). Bad entries are dropped (the guard
# checks sel on every request).
_clientside(
    """
    function(typed, sel) {
        const C = window.dash_clientside, s = sel || {}, heads = [];
        for (const key of typed || []) {
            const p = String(key).split(':').map(Number);
            if (p.length === 2 && p.every(v => Number.isInteger(v) && v >= 0)) { heads.push(p); }
        }
        const next = window.hsHeadSet(heads), now = (s.heads || []).map(h => [Number(h[0]), Number(h[1])]);
        if (JSON.stringify(next) === JSON.stringify(now.length ? now : null)) { return C.no_update; }
        return Object.assign({}, s, {heads: next});
    }
    """,
    Output("sel", "data", allow_duplicate=True), Input("hs-set", "value"), State("sel", "data"),
    prevent_initial_call=True,
)


@_deferred(Output("sel", "data", allow_duplicate=True), Output("hs-view", "value"),
          Input("hs-pin", "n_clicks"), Input("hs-clear", "n_clicks"),
          Input("hs-pairs-graph", "clickData"), State("sel", "data"),
          State("hs-pairs-from", "value"), prevent_initial_call=True)
def edit_set(pin, _clear, pair_click, sel, pairs_from):
    """The head set's edits on the server: pin toggles the selected head, "clear" empties it, a pair
    cell makes that pair (a margin cell that head alone) the set (a shift-click in B1 and the chip
    box change it in the browser: assets/explorer.js headClick, the clientside callback above).
    A call that names several inputs as changed is no edit: Dash makes it when the page renders and
    show_set fills the chip box (prevent_initial_call does not stop it), listing every input."""
    if len(ctx.triggered_prop_ids) != 1:
        return no_update, no_update
    trig = ctx.triggered_id
    heads = _heads(sel)
    view = no_update
    toggle = None
    if trig == "hs-pin" and pin and sel.get("layer") is not None and sel.get("head") is not None:
        toggle, view = [int(sel["layer"]), int(sel["head"])], "set"
    elif trig == "hs-clear":
        heads = []
    elif trig == "hs-pairs-graph" and pairs_from != "set" and pair_click and pair_click.get("points"):
        heads = _pair_cell(pair_click["points"][0])
        if heads is None:
            return no_update, no_update
    if toggle is not None:
        heads = [h for h in heads if h != toggle] if toggle in heads else heads + [toggle]
    new = sorted({tuple(h) for h in heads})[:MAX_SET_HEADS]
    if [list(h) for h in new] == sorted(_heads(sel)):
        return no_update, view
    p = Patch()
    p["heads"] = [list(h) for h in new] or None
    return p, view


_HEAD_NAME = re.compile(r"L(\d{1,4})H(\d{1,4})")


def _pair_cell(point: dict) -> list[list[int]] | None:
    """The heads of a clicked pair-heatmap cell: its customdata [a_layer, a_head, b_layer, b_head],
    or, as Dash's Graph drops a heatmap point's customdata and pointNumber from clickData, its
    axis labels (y: the row's head "L3H2", x: the column's, or "alone" on the margin strip)."""
    cd = point.get("customdata")
    if isinstance(cd, list) and len(cd) == 4:
        return [[int(cd[0]), int(cd[1])], [int(cd[2]), int(cd[3])]]
    row = _HEAD_NAME.fullmatch(str(point.get("y", "")))
    col = _HEAD_NAME.fullmatch(str(point.get("x", ""))) or (row if point.get("x") == "alone" else None)
    if row is None or col is None:
        return None
    return [[int(v) for v in row.groups()], [int(v) for v in col.groups()]]


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and v != v) else f"{v:.4g}"


def _table(index, results: list[tuple[str, str, dict]]):
    """metric rows x result columns (id ``hs-val-<column>-<metric>``)."""
    metrics = [m for m in SET_METRICS if any(r.get(m) is not None for _, _, r in results)]
    head = html.Tr([html.Th("")] + [html.Th(title) for _, title, _ in results])
    rows = [html.Tr([html.Td(registry.get_metric(m).label, title=registry.get_metric(m).meaning)]
                    + [html.Td(_fmt(r.get(m)), id=f"hs-val-{col}-{m}") for col, _, r in results]) for m in metrics]
    return html.Table([html.Thead(head), html.Tbody(rows)], className="table table-sm mb-0 hs-values")


@_deferred(Output("hs-set", "options"), Output("hs-set", "value"), Output("hs-pin", "children"),
          Input("k-heads", "data"), Input("k-head", "data"), State("sel", "data"))
def show_set(_khs, _kh, sel):
    """The chip box and the pin button follow the set (cheap, so it never lags behind an edit).
    Options and value come in one response: the dropdown drops values missing from its options,
    and that drop would reach edit_set as a user's edit."""
    index, _ = load(sel)
    if index is None:
        return [], [], "pin head"
    heads = _heads(sel)
    options = index.memo("hs-options", lambda: [{"label": f"L{l}H{h}", "value": _key(l, h)}
                                                for l in range(index.L) for h in range(index.H)])
    one = _one(index, sel)
    pin = "pin head" if one is None else ("unpin" if one in heads else "pin") + f" L{one[0]}H{one[1]}"
    if ctx.triggered_prop_ids == {"k-head.data": "k-head"}:  # another head, the same set: only the button
        return no_update, no_update, pin                 # (resent values would reach edit_set as an edit)
    return options, [_key(*h) for h in heads], pin


def _one(index, sel) -> list[int] | None:
    """The selected head [layer, head], None when none (or not of this run) is selected."""
    if index.head_index(sel.get("layer"), sel.get("head")) is None:
        return None
    return [int(sel["layer"]), int(sel["head"])]


@_deferred(Output("hs-table", "children"), Output("hs-top5", "figure"), Output("hs-msg", "children"),
          Input("hs-set-key", "data"), State("sel", "data"))
def view_set(_key, sel):
    """The set's metrics and top-5 on the selected image next to the selected head's alone (while
    the set panel shows)."""
    index, err = load(sel)
    if index is None:
        return None, F.empty(err or "No run"), None
    heads = _heads(sel)
    one = _one(index, sel)
    pos = index.pos(sel.get("image"))
    if not heads:
        return None, F.empty("Pin heads (button above, or shift-click in B1)\nto prune them together."), None
    if pos is None:
        return None, F.empty("Select an image in A."), None
    image = int(index.image_ids[pos])
    try:
        results = [("set", f"set of {len(heads)}", data.head_set(index.name, image, heads))]
        if one is not None:
            results.insert(0, ("one", f"L{one[0]}H{one[1]} alone", data.head_set(index.name, image, [one])))
    except (OnlineError, HeadScopeError) as err:
        return None, F.empty("Head set unavailable."), message(str(err), "danger")
    label = index.images["label"].iat[pos]
    panels = [(title, [index.class_name(c) for c in r["top5_classes"]], r["top5_probs"])
              for _, title, r in results if r.get("top5_classes")]
    top = F.top5_pair(panels, index.class_name(label)) if panels else F.empty("No classifier head: no top-5.")
    return _table(index, results), top, None


def top_heads(index: data.RunIndex, metric: str, pos: int, k: int) -> list[tuple[int, int]]:
    """The image's k most important heads by ``metric`` (its registry direction; ±inf and NaN last)."""
    v = np.asarray(index.values(metric)[pos], float)
    score = -v if registry.get_metric(metric).important == "high" else v
    order = np.argsort(np.where(np.isfinite(score), score, np.inf), kind="stable")[:k]
    return [(int(i) // index.H, int(i) % index.H) for i in order]


def pair_metric(index: data.RunIndex, metric: str, pos: int) -> str:
    """The interaction's metric: emb_dist for an embedding metric, a backbone or an unlabelled
    image, else prob_drop (SPEC defines interactions of these two)."""
    labelled = index.has_classifier and int(index.images["label"].iat[pos]) >= 0
    return "emb_dist" if "emb_dist" in metric or not labelled else "prob_drop"


@_deferred(Output("hs-pairs-graph", "figure"), Output("hs-pairs-msg", "children"), Output("hs-pairs-graph", "style"),
          Output("hs-k", "disabled"), Input("hs-pairs-key", "data"), Input("hs-k", "value"),
          Input("hs-pairs-from", "value"), State("hs-view", "value"), State("sel", "data"))
def view_pairs(_key, k, pairs_from, view, sel):
    """The pair-interaction heatmap of the image's top-k heads or of the head set (computed while
    the panel shows), the graph as tall as its rows need to be labelled."""
    if view != "pairs":
        return no_update, no_update, no_update, no_update
    from_set = pairs_from == "set"
    fig, msg, heads = _pairs(sel, k, from_set)
    return fig, msg, {"height": f"{F.pair_heatmap_height(len(heads), HEIGHT - 28)}px"}, from_set


def _pairs(sel: dict, k, from_set: bool) -> tuple[dict, object, list]:
    """(figure, message, heads shown) of the pairs panel."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), None, []
    pos = index.pos(sel.get("image"))
    if pos is None or not index.importance:
        return F.empty("Select an image in A."), None, []
    metric = sel.get("metric") if sel.get("metric") in index.importance else index.importance[0]
    if from_set:
        heads = [tuple(h) for h in _heads(sel)]
        if not 2 <= len(heads) <= MAX_PAIR_HEADS:
            return F.empty(f"The head set has {len(heads)} head(s): pin 2 to {MAX_PAIR_HEADS} heads to see their "
                           "pairs (or choose the image's top heads)."), None, []
    else:
        k = int(min(max(k or DEFAULT_K, 2), MAX_PAIR_HEADS, index.L * index.H))
        heads = top_heads(index, metric, pos, k)
    k = len(heads)
    what = pair_metric(index, metric, pos)
    try:
        rows = data.pair_interactions(index.name, int(index.image_ids[pos]), heads, what)["rows"]
    except (OnlineError, HeadScopeError) as err:
        return F.empty("Pair interactions unavailable."), message(str(err), "danger"), []
    at = {h: i for i, h in enumerate(heads)}
    M, single = np.full((k, k), np.nan), np.full(k, np.nan)
    for r in rows:
        i, j = at[(r["a_layer"], r["a_head"])], at[(r["b_layer"], r["b_head"])]
        M[i, j] = M[j, i] = r["interaction"]
        single[i], single[j] = r["single_a"], r["single_b"]
    return F.pair_heatmap(heads, M, single, registry.get_metric(what).label, current=_heads(sel)), None, heads
