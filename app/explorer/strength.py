"""View C, attention strength: C1 a scalar head property of every head (by layer; the image's or the
mean over images), C2 the selected head's vector metric (the k-hop strength by default), C3 the
head's C1 property over all images and over the selected set or scope."""
from __future__ import annotations

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, State, dcc, html, no_update

from analysis.metrics import registry

from app import data, figures as F
from app.explorer.selection import cached, image_caption, scope_positions, selection
from app.views import Callbacks, card, changed_inputs, graph, layout_patch, load, message

callbacks = Callbacks()
# C2's vector metric when the run has it (else its first vector metric, registry order)
C2_DEFAULT = "strength"
HEIGHT = {"c1": 168, "c2": 160}  # px: the four views fit one 1920x1080 screen (assets/headscope.css)


def layout() -> dbc.Card:
    c1_tools = [dcc.Dropdown(id="c1-metric", clearable=False, searchable=False, className="c1-metric",
                             style={"minWidth": "13rem", "fontSize": "0.8rem"})]
    return card("C", "Attention strength", [
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


def c1_choices(sel: dict, current=None) -> tuple[list[dict], str | None]:
    """(options, value) of C1's y axis: any scalar head property of the run (strength entropy by
    default, as in the paper), then the run-level per-head metrics; ``current`` when the run has it."""
    index, _ = load(sel)
    names = index.properties + index.run_level if index is not None else []
    if not names:
        return [], None
    default = "strength_entropy" if "strength_entropy" in names else names[0]
    return data.metric_options(names), current if current in names else default


def c2_choices(sel: dict, current=None) -> tuple[list[dict], str | None, dict]:
    """(options, value, the choice's style) of C2's profile: any vector metric of the run (registry);
    the choice shows when it has more than one."""
    index, _ = load(sel)
    names = index.vectors if index is not None else []
    options = [{"label": registry.get_metric(n).label, "value": n, "title": registry.get_metric(n).meaning} for n in names]
    return options, vector_metric(names, current), ({} if len(names) > 1 else {"display": "none"})


def vector_metric(names: list[str], current=None) -> str | None:
    """C2's vector metric: ``current`` when the run has it, else C2_DEFAULT, else the run's first."""
    if current in names:
        return current
    return C2_DEFAULT if C2_DEFAULT in names else (names[0] if names else None)


# A menu with no value shows its default as placeholder and the views draw that default (the view
# model, which reads the menus as Inputs, need not wait for these callbacks on a page load); a value
# the new run lacks is cleared through set_props.
@callbacks.server(Output("c1-metric", "options"), Output("c1-metric", "placeholder"), Input("k-run", "data"),
                  State("sel", "data"), State("c1-metric", "value"))
def c1_metric_options(_k, sel, current):
    options, default = c1_choices(sel)
    if current is not None and current not in [o["value"] for o in options]:
        dash.set_props("c1-metric", {"value": None})
    return options, registry.get_metric(default).option if options else "no properties"


@callbacks.server(Output("c2-metric", "options"), Output("c2-metric", "placeholder"), Output("c2-choice", "style"),
                  Input("k-run", "data"), State("sel", "data"), State("c2-metric", "value"))
def c2_metric_options(_k, sel, current):
    options, default, style = c2_choices(sel)
    if current is not None and current not in [o["value"] for o in options]:
        dash.set_props("c2-metric", {"value": None})
    return options, registry.get_metric(default).label if default else "no vector metric", style


@callbacks.server(Output("c2-title", "children"), Input("c2-metric", "value"), State("sel", "data"), prevent_initial_call=True)
def c2_title(vector, sel):
    vector = vector or c2_choices(sel)[1]
    return f"C2 · {registry.get_metric(vector).label} of the head" if vector else no_update


@cached.view(Output("c1-graph", "figure"), Output("c2-graph", "figure"), Output("c3-graph", "figure"),
              Output("c-msg", "children"), Input("k-image", "data"), Input("k-head", "data"), Input("k-set", "data"),
              Input("c1-metric", "value"), State("sel", "data"), Input("c2-metric", "value"))
def view_c(_ki, _kh, _ks, prop, sel, vector=None):
    """C1: the chosen head property of every head (the image's, or the mean over images); C2: the
    selected head's vector metric ``vector`` (the k-hop strength by default; any vector metric of the
    run, titles from the registry); C3: its C1 property over all images and over the selected set
    (a run-level metric has one value per head: C1 shows it for any image, C3 has nothing to show)."""
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), F.empty(""), F.empty(""), None
    pos, head = selection(index, sel)
    if prop is None:  # the menu before its options came: its default
        prop = c1_choices(sel)[1]
    if prop not in index.properties + index.run_level:
        msg = index.missing.get("properties") if not index.properties else None
        return F.empty(msg or "Choose a head property."), F.empty(""), F.empty(""), message(msg)
    m = registry.get_metric(prop)
    values = index.values(prop) if m.level == "image_head" else None
    if values is None:
        c1 = F.property_overview(index.summary(prop)[0], index.L, index.H, head, "one value per head (run level)",
                                 y_title=m.title, y_range=m.range, height=HEIGHT["c1"])
    elif pos is None:
        mean = index.memo(("mean", prop), lambda: index.summary(prop)[0])
        c1 = F.property_overview(mean, index.L, index.H, head, "mean over all images (select an image in A)",
                                 y_title=m.title, y_range=m.range, height=HEIGHT["c1"])
    else:
        c1 = F.property_overview(values[pos], index.L, index.H, head, image_caption(index, pos),
                                 y_title=m.title, y_range=m.range, height=HEIGHT["c1"])
    if changed_inputs() == {"k-head"}:  # a new head only moves C1's ring, a shape: the points stay as drawn
        c1 = layout_patch(c1, "shapes")
    c2 = profile(index, pos, head, vector)
    if head is None:
        return c1, c2, F.empty("… and its values over all images."), None
    hi = head[0] * index.H + head[1]
    if values is None:
        c3 = F.empty(f"{m.name} is a run-level metric: one value per head, no distribution over images.")
    else:
        current = None if pos is None else float(values[pos, hi])
        subset, name = scope_positions(index, sel)
        c3 = F.distribution(values[:, hi], current, x_title=m.title, x_range=m.range, subset=subset, subset_label=name)
    return c1, c2, c3, None


def profile(index: data.RunIndex, pos, head, vector) -> dict:
    """C2: the head's vector metric ``vector`` (``vector_metric``'s choice; axis title from the
    registry) on the image at ``pos``, or its mean over all images."""
    vector = vector_metric(index.vectors, vector)
    v = None if vector is None else registry.get_metric(vector)
    if head is None:
        return F.empty(f"Click a head to see its {v.label if v else 'vector metric'}.")
    if v is None:
        return F.empty("This run has no vector metric (e.g. the k-hop strength, column strength).")
    hi = head[0] * index.H + head[1]
    x_title, hover = F.VECTOR_INDEX.get(vector, ("entry k", "k"))
    values = index.summary(vector)[0][hi] if pos is None else index.values(vector)[pos, hi]
    return F.vector_bars(values, "mean over all images" if pos is None else None, v.title, x_title, hover)

