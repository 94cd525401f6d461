"""View B, head importance: B1 every head's importance (the image's, over the band of the images'
mean ± std), B2 the selected head's metric under each pruning mode on the image, B3 the top-5
classes under the mode chosen in B2 (partial pruning: online, cached per (image, head)). Under B1
the head-set panels (app/panels/head_sets.py) share B2/B3's place."""
from __future__ import annotations

import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, Patch, State, html, no_update

from analysis.errors import HeadScopeError
from analysis.metrics import registry
from analysis.models.pruning import MODE_LABELS
from analysis.serving.transport import OnlineError

from app import figures as F
from app.explorer.selection import (SCOPES, cached, chosen_metric, image_caption, metric_title, online, pruning_mode,
                                    pruning_rows, scope_positions, selection)
from app.panels import head_sets
from app.views import Callbacks, card, changed_inputs, graph, layout_patch, load, loading, message

callbacks = Callbacks()
HEIGHT = {"b1": 190, "b2": 150}  # px: the four views fit one 1920x1080 screen (assets/headscope.css)
# B1 shows the image's unpruned P(true label) beside the metrics made of it: a line on the axis of
# those that are P(true) itself (with the head pruned), the value in a corner beside drops of it
UNPRUNED_LINE = ("prob", "mean_prob")
UNPRUNED_NOTE = ("prob_drop", "mean_prob_drop", "taylor_prob_drop")


def unpruned_reference(index, metric: str, pos: int | None) -> tuple[str, float | None] | None:
    """B1's ``reference`` (figures.head_importance): the image's unpruned P(true label) when ``metric``
    is made of it and the run has it (a classifier run with an image selected); else None."""
    if pos is None or metric not in UNPRUNED_LINE + UNPRUNED_NOTE:
        return None
    p = float(index.images["prob"].iat[pos])
    if p != p:
        return None
    return f"unpruned P(true) = {p:.3f}", (p if metric in UNPRUNED_LINE else None)


def layout(query: dict) -> dbc.Card:
    return card("B", "Head importance", [
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


@cached.view(Output("b1-graph", "figure"), Input("k-image", "data"), Input("k-head", "data"),
                  Input("k-metric", "data"), Input("k-set", "data"), Input("k-heads", "data"),
                  Input("b1-overlay", "value"), State("sel", "data"))
def view_b1(_ki, _kh, _km, _ks, _khs, overlay, sel):
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run")
    metric = chosen_metric(index, sel)
    if metric is None:
        return F.empty(index.missing.get("metrics", "Choose a metric."))
    pos, head = selection(index, sel)
    values = None if pos is None else index.values(metric)[pos]
    members, name = scope_positions(index, sel)
    if members is None or len(members) < 2:
        (mean, std), band = index.summary(metric), "mean over images"
        if members is not None:  # too few for a band: say how many
            band += f" ({name}: {len(members)} image{'s' if len(members) != 1 else ''}, no band)"
    else:
        sub = index.values(metric)[members]
        mean, std, band = np.nanmean(sub, 0), np.nanstd(sub, 0), f"mean over {name} ({len(members)})"
    fig = F.head_importance(index.L, index.H, metric_title(metric), mean, std, image_values=values, selected=head,
                            image_label=None if pos is None else image_caption(index, pos),
                            value_range=registry.get_metric(metric).range or (None, None), band_label=band,
                            reference=unpruned_reference(index, metric, pos),
                            **head_sets.b1_extras(index, metric, pos, overlay, sel.get("heads")))
    # a new head only moves its marker, a shape: the curves stay as drawn
    return layout_patch(fig, "shapes") if changed_inputs() == {"k-head"} else fig


@online.view(Output("b2-graph", "figure"), Output("b3-graph", "figure"), Output("b2-msg", "children"),
                  Input("k-image", "data"), Input("k-head", "data"), Input("k-metric", "data"), Input("k-mode", "data"),
                  State("sel", "data"))
def view_b2_b3(_ki, _kh, _km, _kmode, sel):
    """Partial pruning of the selected head on the selected image (online, cached per (image, head))."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), F.empty(""), None
    pos, head = selection(index, sel)
    if pos is None or head is None:
        hint = "Select an image (A) and a head (B1, C1 or D1) to prune it partially."
        return F.empty(hint), F.empty("Top-5 classes appear here."), None
    try:
        rows = pruning_rows(index, pos, head)
    except (OnlineError, HeadScopeError) as err:
        return F.empty("Partial pruning unavailable."), F.empty(""), message(str(err), "danger")
    mode = pruning_mode(sel)
    metric = chosen_metric(index, sel)
    if metric not in rows[0]:  # partial pruning gives the exact leave-one-out metrics
        metric = next((m for m in index.importance if m in rows[0]), "emb_dist")
    values = [r.get(metric) for r in rows]
    reference = rows[0].get("prob") if metric == "prob" else None
    b2 = F.pruning_modes(MODE_LABELS, values, metric_title(metric), selected_mode=mode, reference=reference)
    row = rows[mode] if 0 <= mode < len(rows) else rows[1]
    if not row.get("top5_classes"):
        b3 = F.empty("This model has no classifier head:\nno class probabilities.")
    else:
        label = index.images["label"].iat[pos]
        names = [index.class_name(c) for c in row["top5_classes"]]
        what = "unpruned" if row["mode"] == 0 else f"{row['regions']} of {F.head_name(*head)} pruned"
        b3 = F.top5(names, row["top5_probs"], index.class_name(label), what)
    return b2, b3, None


@callbacks.server(Output("sel", "data", allow_duplicate=True), Input("b2-graph", "clickData"), prevent_initial_call=True)
def choose_mode(click):
    if not click or not click.get("points"):
        return no_update
    p = Patch()
    p["mode"] = int(click["points"][0]["customdata"])
    return p
