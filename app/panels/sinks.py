"""The attention-sinks panel of view D (SPEC "Beyond the paper (v3)": attention to prefix and high-norm tokens).

For the selected image: the token norms ||x_l[t]||_2 of every block's input stream (layers 0..L x
tokens, prefix tokens first and marked, the high-norm patch tokens of each block marked), the
high-norm patch tokens of one block over the image (the patch grid with the norms, D6's drawing), and
the selected head's prefix_share and high_norm_share. Norms and shares come from
analysis.serving.transport.sinks (one forward of the image, cached per (run, image, f)); the factor f
of the high-norm rule is the run's, and can be changed here.
"""
from __future__ import annotations

import dash_bootstrap_components as dbc
import numpy as np
import torch
from dash import Input, Output, State, callback, clientside_callback, dcc, html, no_update

from analysis.errors import HeadScopeError
from analysis.metrics.sinks import DEFAULT_FACTOR, high_norm_tokens
from analysis.serving import transport
from analysis.serving.transport import OnlineError

from app import config, figures as F
from app.views import graph, load, loading, message

HEIGHT = 300
NORM_TITLE = "‖x_l[t]‖₂"


def panel():
    """The panel's layout (view D's right part while the switch names it)."""
    return html.Div([
        html.Div([html.Span("Token norms across layers · high-norm tokens ", className="sub-title"),
                  html.Span("f", className="small text-muted"),
                  dbc.Input(id="sink-f", type="number", min=1, max=100, step="any", size="sm", debounce=True,
                            placeholder=str(DEFAULT_FACTOR), className="circ-num"),
                  dbc.RadioItems(id="sink-scale", options=[{"label": v, "value": k} for k, v in SCALES.items()],
                                 value="ratio", inline=True, className="small toggle"),
                  html.Span("block", className="small text-muted"),
                  dbc.Select(id="sink-layer", size="sm", className="sal-map")],
                 className="d-flex align-items-center gap-2 flex-wrap"),
        html.Div(id="sink-head", className="small sink-head"),
        loading([html.Div(id="sink-msg"),
                 html.Div([graph("sink-norms", HEIGHT), graph("sink-image", HEIGHT)], className="sink-graphs")]),
        dcc.Store(id="sink-key"),
    ], className="sinks-panel", id="sinks-panel")


# ---- the data --------------------------------------------------------------------------------
def high_norm_mask(norms: np.ndarray, num_prefix: int, factor: float) -> np.ndarray:
    """bool [L + 1, P]: the high-norm patch tokens of every stream row of ``norms`` [L + 1, N] (the
    engine's rule, SPEC: n > f x the median patch-token norm of that row)."""
    return high_norm_tokens(torch.as_tensor(np.asarray(norms, np.float64)), num_prefix, factor).numpy()


SCALES = {"ratio": "÷ median patch norm", "norm": "norm"}


def norm_ratio(norms: np.ndarray, num_prefix: int) -> np.ndarray:
    """Each token's norm divided by the median patch-token norm of its stream [L + 1, N]: the
    quantity the high-norm rule compares with f."""
    n = np.asarray(norms, np.float64)
    return n / np.median(n[:, num_prefix:], axis=1, keepdims=True)


def norms_figure(norms: np.ndarray, num_prefix: int, high: np.ndarray, grid, factor: float, scale: str = "ratio",
                 title: str = "") -> dict:
    """Heatmap of token norms [L + 1, N] (y = stream l, x = token; prefix tokens first, set off by
    a line and named), coloured by the norm or (``scale`` "ratio") by the norm over the median
    patch-token norm of its stream; high-norm patch tokens ``high`` [L + 1, P] marked with a ring."""
    n = np.asarray(norms, np.float64)
    ratio = norm_ratio(n, num_prefix)
    rows, N = n.shape
    names = F.token_names(N, num_prefix, grid)
    text = [[f"stream {l} ({'after the last block' if l == rows - 1 else f'block {l} input'}) · {names[t]}<br>norm {n[l, t]:.4g} · {ratio[l, t]:.3g} × the median patch norm"
             for t in range(N)] for l in range(rows)]
    z = ratio if scale == "ratio" else n
    data = [{"type": "heatmap", "z": F.finite_or_none(z), "x": list(range(N)), "y": list(range(rows)),
             "colorscale": F.LAYER_SCALE, "text": text, "hovertemplate": "%{text}<extra></extra>",
             "colorbar": {"title": {"text": NORM_TITLE + (" ÷ median" if scale == "ratio" else ""), "side": "right"},
                          "thickness": 10}}]
    ls, ps = np.nonzero(high)
    data.append({"type": "scatter", "mode": "markers", "name": f"high-norm (> {factor:g} × median)",
                 "x": (ps + num_prefix).tolist(), "y": ls.tolist(), "hoverinfo": "skip",
                 "marker": {"symbol": "circle-open", "size": 7, "color": F.ACCENT, "line": {"width": 2}}})
    shapes = ([{"type": "line", "x0": num_prefix - 0.5, "x1": num_prefix - 0.5, "y0": -0.5, "y1": rows - 0.5,
                "line": {"color": "white", "width": 2}}] if num_prefix else [])
    step = max(1, (N - num_prefix) // 8)
    ticks = list(range(num_prefix)) + list(range(num_prefix + step, N, step))  # patch 0 sits beside CLS: unlabelled
    lay = F.layout(title, shapes=shapes, margin={"l": 46, "r": 10, "t": 30, "b": 36},
                   xaxis=F.axis("token (prefix first, then patches row by row)", tickvals=ticks,
                                ticktext=[("CLS" if t == 0 else f"p{t}") if t < num_prefix else str(t - num_prefix)
                                          for t in ticks]),
                   yaxis=F.axis("stream l", dtick=1, autorange="reversed"))
    if title:
        lay["title"]["font"] = {"size": 11}
    return {"data": data, "layout": lay}


def image_figure(norms_row: np.ndarray, num_prefix: int, high_row: np.ndarray, grid, image_uri: str | None,
                 title: str) -> dict:
    """One stream's patch-token norms over the image (D6's patch map), high-norm patches framed."""
    gh, gw = grid
    values = np.asarray(norms_row, np.float64)[num_prefix:].reshape(gh, gw)
    fig = F.saliency_map(values, title, NORM_TITLE, image_uri=image_uri)
    fig["layout"]["shapes"] = [{"type": "rect", "x0": p % gw - 0.5, "x1": p % gw + 0.5, "y0": p // gw - 0.5,
                                "y1": p // gw + 0.5, "line": {"color": F.ACCENT, "width": 2}}
                               for p in np.flatnonzero(high_row)]
    if title:
        fig["layout"]["title"]["font"] = {"size": 11}
    return fig


# ---- the callbacks ---------------------------------------------------------------------------
clientside_callback(
    """
    function(image, head, panel) {
        return panel === 'sinks' ? Object.assign({}, image, head) : window.dash_clientside.no_update;
    }
    """,
    Output("sink-key", "data"), Input("k-image", "data"), Input("k-head", "data"), Input("d-panel", "value"),
)


def _factor(f) -> float | None:
    try:
        f = float(f)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


@callback(Output("sink-norms", "figure"), Output("sink-image", "figure"), Output("sink-head", "children"),
          Output("sink-msg", "children"), Output("sink-layer", "options"), Output("sink-layer", "value"),
          Input("sink-key", "data"), Input("sink-f", "value"), Input("sink-layer", "value"),
          Input("sink-scale", "value"), State("d-panel", "value"), State("sel", "data"))
def view_sinks(key, factor, layer, scale, panel, sel):
    """Token norms of the image, one block's high-norm tokens over it, the selected head's shares."""
    if panel != "sinks" or not key:
        return (no_update,) * 6
    index, err = load(sel)
    if index is None:
        return F.empty(err or "No run"), F.empty(""), None, None, no_update, no_update
    pos = index.pos(key.get("image"))
    if pos is None:
        return F.empty("Select an image (A) to see its token norms."), F.empty(""), None, None, no_update, no_update
    image_id = int(index.image_ids[pos])
    try:
        out = transport.sinks(config.run_dir(index.name), image_id, _factor(factor))
        image = index.thumbnail(image_id)
    except (OnlineError, HeadScopeError) as err:
        return F.empty(""), F.empty(""), None, message(str(err), "danger"), no_update, no_update
    norms = np.array([[np.nan if v is None else v for v in row] for row in out["norms"]], float)
    T, grid, f = int(out["num_prefix_tokens"]), out["grid"], float(out["factor"])
    high = high_norm_mask(norms, T, f)
    L = norms.shape[0] - 1
    head = index.head_index(key.get("layer"), key.get("head"))
    head = None if head is None else (int(key["layer"]), int(key["head"]))
    counts = high.sum(1)
    options = [{"label": f"{l}{' (after the last)' if l == L else ''} · {int(counts[l])} high", "value": str(l)}
               for l in range(L + 1)]
    if layer is None or not str(layer).isdigit() or int(layer) > L:
        layer = head[0] if head is not None else int(np.argmax(counts))
    layer = int(layer)
    where = "from the run" if out.get("stored") else "computed now"
    fig = norms_figure(norms, T, high, grid, f, scale, title=f"image {image_id} · token norms ({where}; f = {f:g}: "
                       f"{int(counts[:L].sum())} high-norm patch tokens over the {L} block inputs)")
    over = image_figure(norms[layer], T, high[layer], grid, F.masked_image(image),
                        f"block {layer} input: {int(counts[layer])} high-norm patch tokens")
    return fig, over, _head_text(out, head, f), None, options, str(layer)


def _head_text(out: dict, head, factor: float):
    """The selected head's prefix_share and high_norm_share on this image (attention fractions)."""
    if head is None:
        return html.Span("Select a head (B1, C1, D1 or the circuit) for its prefix_share and high_norm_share.",
                         className="text-muted")
    l, h = head
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    return html.Span([html.B(f"L{l}H{h}: "), f"prefix_share {fmt(out['prefix_share'][l][h])} · high_norm_share "
                      f"{fmt(out['high_norm_share'][l][h])} (f = {factor:g}; {out['high_norm_count'][l]} high-norm "
                      f"patch tokens in block {l}'s input) · the patches' attention parked on prefix tokens / on "
                      "high-norm tokens"])
