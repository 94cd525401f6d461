"""D6, the Explorer's saliency panel beside D2 (SPEC "Patch attribution"): which patches matter.

The selected image's patch maps (occlusion, token_drop, rollout, grad_rollout: those the run's model
has) from analysis.serving.transport.patch_maps, which uses a run's precomputed maps when it has
them and caches per (run, image): the chosen map over the image with its own colour bar and unit,
the maps' Spearman agreement, and the deletion curves (the model's output after removing the top-n
patches of each map) with a slider marking n. Hover a patch: its value in every map; click a patch:
it becomes the source token of D2/D3 (it writes D3's hover state, which D2 reads).
"""
from __future__ import annotations

import dash_bootstrap_components as dbc
import numpy as np
from dash import Input, Output, Patch, State, callback, clientside_callback, ctx, dcc, html, no_update

from analysis.errors import HeadScopeError
from analysis.metrics.patch_maps import MAPS, OCCLUSION_BASELINES
from analysis.serving import transport
from analysis.serving.transport import OnlineError

from app import config, figures as F
from app.views import graph, load, loading, message

MAP_TITLES = {"occlusion": "occlusion", "token_drop": "token drop", "rollout": "attention rollout",
              "grad_rollout": "gradient rollout"}
DELETION_TITLES = {"prob": "P(true class)", "emb_dist": "embedding distance to the unpruned"}
HEIGHT = {"map": 300, "agree": 210, "deletion": 230}


COMPUTING_MAPS = ("Computing this image's patch maps online: occlusion and token drop run the model once per "
                  "patch (a 224 px ViT-S: 256 forwards each, about 30 s on one busy CPU core). Runs built with "
                  "--patch-maps show them at once.")
COMPUTING_DELETION = "Computing the deletion curves online: 17 forwards per map."


def _computing(children, text: str):
    """``children`` with a note saying what is being computed and why it takes a while, shown with
    a spinner over them (which stay visible) while they recompute (app/views.py loading)."""
    return loading(children, note=[dbc.Spinner(size="sm", color="secondary"), html.Span(text)])


def panel():
    """The panel's layout (placed under D2 by the Explorer)."""
    return html.Div([
        html.Div([html.Span("D6 · which patches matter ", className="sub-title"),
                  dbc.Select(id="sal-map", size="sm", value="occlusion", className="sal-map",
                             options=[{"label": MAP_TITLES[m], "value": m} for m in MAPS]),
                  html.Span("occluded patch:", className="small text-muted ms-2"),
                  dbc.Select(id="sal-baseline", size="sm", value="mean", className="sal-map",
                             options=[{"label": label, "value": b} for b, label in OCCLUSION_BASELINES.items()])],
                 className="d-flex align-items-center gap-2"),
        _computing([html.Div(id="sal-msg"), graph("sal-graph", HEIGHT["map"], clear_on_unhover=True),
                    graph("sal-agree", HEIGHT["agree"])], COMPUTING_MAPS),
        html.Div("deletion curves: remove the top-n patches of each map", className="sub-title"),
        _computing([graph("sal-deletion", HEIGHT["deletion"])], COMPUTING_DELETION),
        html.Div(dcc.Slider(id="sal-n", min=0, max=1, step=None, value=0, marks={0: "0"}, updatemode="mouseup"),
                 className="sal-n"),
        dcc.Store(id="sal-image"), dcc.Store(id="sal-hover"),
    ], className="saliency-panel", id="saliency-panel")


def _maps(sel: dict, baseline: str | None = "mean") -> tuple[dict | None, object, str | None]:
    """(patch-maps payload, index, problem) of the selected image, occlusion filled with ``baseline``."""
    index, err = load(sel)
    if index is None:
        return None, None, err
    pos = index.pos(sel.get("image")) if sel.get("image") is not None else None
    if pos is None:
        return None, index, "Select an image (A) to see which of its patches matter."
    try:
        return (transport.patch_maps(config.run_dir(index.name), int(index.image_ids[pos]), baseline or "mean"),
                index, None)
    except (OnlineError, HeadScopeError) as err:
        return None, index, str(err)


def _source_patch(hover, T: int) -> int | None:
    """The patch that D3's hover state makes the source token, if it is a patch."""
    cd = ((hover or {}).get("points") or [{}])[0].get("customdata")
    if isinstance(cd, list) and len(cd) == 2 and cd[0] == 0 and int(cd[1]) >= T:
        return int(cd[1]) - T
    return None


def _arrays(out: dict) -> dict[str, np.ndarray]:
    return {k: np.array([[np.nan if v is None else v for v in row] for row in rows], float)
            for k, rows in out["maps"].items()}


# The panel computes only while it shows (the maps of a new image may cost the model seconds), and
# a hidden panel costs no request: sal-image follows k-image, and sal-hover D3's hover (the source
# patch; a click on the map sets it), only while ``d-panel`` shows the panel, and at once when shown.
clientside_callback(
    """
    function(image, panel) { return panel === 'saliency' ? image : window.dash_clientside.no_update; }
    """,
    Output("sal-image", "data"), Input("k-image", "data"), Input("d-panel", "value"),
)
clientside_callback(
    """
    function(hover, panel) { return panel === 'saliency' ? hover : window.dash_clientside.no_update; }
    """,
    Output("sal-hover", "data"), Input("d3-graph", "hoverData"), State("d-panel", "value"),
    prevent_initial_call=True,
)


@callback(Output("sal-map", "options"), Output("sal-map", "value"), Output("sal-graph", "figure"),
          Output("sal-agree", "figure"), Output("sal-msg", "children"),
          Input("sal-image", "data"), Input("sal-map", "value"), Input("sal-baseline", "value"),
          Input("sal-hover", "data"), State("d-panel", "value"), State("sel", "data"))
def view_saliency(_image, chosen, baseline, hover, panel, sel):
    """The chosen map over the image (a D3 hover only moves the source-patch frame), the agreement."""
    if panel != "saliency":
        return (no_update,) * 5
    out, index, problem = _maps(sel or {}, baseline)
    if out is None:
        return no_update, no_update, F.empty(problem or ""), F.empty(""), None
    T = int(out["num_prefix_tokens"])
    if ctx.triggered_id == "sal-hover":
        p = Patch()
        patch = _source_patch(hover, T)
        fig = F.saliency_map(np.zeros(out["grid"]), "", "", selected_patch=patch)
        p["layout"]["shapes"] = fig["layout"]["shapes"]
        return no_update, no_update, p, no_update, no_update
    maps = _arrays(out)
    name = chosen if chosen in maps else next(iter(maps))
    options = [{"label": MAP_TITLES[m], "value": m} for m in maps]
    try:
        image = index.thumbnail(index.image_ids[index.pos(sel["image"])])
    except HeadScopeError as err:
        return options, name, F.empty(str(err)), F.empty(""), message(str(err))
    precomputed = out["occlusion_precomputed"] if name == "occlusion" else out["precomputed"]
    title = (MAP_TITLES[name] + (f" · {OCCLUSION_BASELINES[out['baseline']]}" if name == "occlusion" else "")
             + f" ({out['units'][name]})" + ("" if precomputed else " · computed now"))
    fig = F.saliency_map(maps[name], title, out["units"][name], others=maps, image_uri=F.masked_image(image),
                         selected_patch=_source_patch(hover, T))
    return options, name, fig, F.map_agreement(out["agreement"]), _absent_note(out, maps)


def _absent_note(out: dict, maps: dict) -> html.Div | None:
    """Why a map of MAPS is not in the menu (a backbone has no class logit for grad_rollout, a model
    without a prefix token no CLS row to roll out), and what the ablation maps measure instead."""
    notes = []
    if out.get("target") is None:
        notes.append("This run's model is a backbone without a classifier head: "
                     + ("gradient rollout (it needs the gradient of a class logit) is not available, and " if
                        "grad_rollout" not in maps else "")
                     + "occlusion and token drop show the cosine distance of the pooled embedding, not a P(y) drop.")
    if int(out["num_prefix_tokens"]) == 0:
        notes.append("The model has no CLS/prefix token: the rollouts (which read the CLS row) are not available.")
    return html.Div(" ".join(notes), className="small text-muted sal-note") if notes else None


@callback(Output("d3-graph", "hoverData"), Input("sal-graph", "clickData"), State("sal-baseline", "value"),
          State("sel", "data"), prevent_initial_call=True)
def pick_source(click, baseline, sel):
    """A click on a patch of the map makes that patch the source token of D2/D3."""
    out, _, _ = _maps(sel or {}, baseline)
    patch = ((click or {}).get("points") or [{}])[0].get("customdata")
    if out is None or not isinstance(patch, int) or not 0 <= patch < out["grid"][0] * out["grid"][1]:
        return no_update
    return {"points": [{"customdata": [0, int(out["num_prefix_tokens"]) + patch]}]}


def _slider_step(steps: list[int]) -> int:
    """The slider's step: the curves' spacing when even (keys and drags land on computed n), else 1."""
    gaps = set(np.diff(steps).tolist())
    return gaps.pop() if len(gaps) == 1 else 1


@callback(Output("sal-deletion", "figure"), Output("sal-n", "max"), Output("sal-n", "marks"), Output("sal-n", "step"),
          Input("sal-image", "data"), Input("sal-n", "value"), Input("sal-baseline", "value"), State("d-panel", "value"),
          State("sel", "data"))
def view_deletion(_image, n, baseline, panel, sel):
    """Deletion curves of the image's maps (occlusion's with the chosen baseline), the computed n
    nearest the slider's marked (while the panel shows)."""
    if panel != "saliency":
        return (no_update,) * 4
    _, index, problem = _maps(sel or {}, baseline)
    if problem:
        return F.empty(problem), no_update, no_update, no_update
    try:
        image_id = int(index.image_ids[index.pos(sel["image"])])
        out = transport.deletion_curves(config.run_dir(index.name), image_id, baseline or "mean")
    except (OnlineError, HeadScopeError) as err:
        return F.empty(str(err)), no_update, no_update, no_update
    steps = [int(v) for v in out["n"]]
    nearest = None if n is None else min(steps, key=lambda s: abs(s - float(n)))
    fig = F.deletion_curves(steps, out["curves"], DELETION_TITLES.get(out["metric"], out["metric"]),
                            selected_n=nearest)
    if ctx.triggered_id == "sal-n":
        return fig, no_update, no_update, no_update
    label_every = max(1, len(steps) // 6)
    marks = {s: (str(s) if i % label_every == 0 or s == steps[-1] else "") for i, s in enumerate(steps)}
    return fig, max(steps), marks, _slider_step(steps)
