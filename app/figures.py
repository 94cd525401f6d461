"""Figure builders: pure functions from arrays to Plotly figure dicts (no Dash, no I/O).

Figures are plain dicts ({"data": [...], "layout": {...}}), which dcc.Graph takes as they are;
building them is ~100x faster than validated ``go.Figure`` objects. Large arrays travel as
plotly.js typed arrays (``typed``). Colours are colour-blind safe: Okabe-Ito / Plotly "Safe"
for classes, cividis for layers (the same in every view), blue for CLS-related attention and
orange for patch-to-patch attention (the paper's encoding).
"""
from __future__ import annotations

import base64
import io

import numpy as np
import plotly.colors as pc

FONT = {"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "size": 12, "color": "#222"}
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
SAFE = pc.qualitative.Safe
SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "cross", "triangle-down", "star"]
LAYER_SCALE = "Cividis"
BLUES = pc.sequential.Blues[2:]      # CLS-related attention (light -> dark)
ORANGES = pc.sequential.Oranges[2:]  # patch -> patch attention
ACCENT = "#D55E00"                   # the selected image / head
MEAN_BLUE = "#0072B2"
GREY = "#9a9a9a"


# ---- helpers -------------------------------------------------------------------------------
def typed(a, dtype="f4") -> dict:
    """A numpy array as a plotly.js typed array (base64), far smaller and faster than a list."""
    a = np.ascontiguousarray(a, dtype={"f4": "<f4", "i4": "<i4", "u1": "u1"}[dtype])
    out = {"dtype": dtype, "bdata": base64.b64encode(a.tobytes()).decode()}
    if a.ndim > 1:
        out["shape"] = ",".join(str(s) for s in a.shape)
    return out


def untyped(v) -> np.ndarray:
    """Inverse of ``typed`` (and plain lists): for tests and callbacks."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype={"f4": "<f4", "i4": "<i4", "u1": "u1"}[v["dtype"]])
        return a.reshape([int(s) for s in v["shape"].split(",")]) if "shape" in v else a
    return np.asarray(v)


def axis(title=None, **kw) -> dict:
    d = {"gridcolor": "#ececec", "zeroline": False, "linecolor": "#888", "showline": True, "ticks": "outside",
         "tickcolor": "#888", "automargin": True}
    if title:
        d["title"] = {"text": title, "standoff": 6}
    d.update(kw)
    return d


def layout(title=None, **kw) -> dict:
    d = {"font": FONT, "paper_bgcolor": "white", "plot_bgcolor": "white", "hovermode": "closest",
         "margin": {"l": 50, "r": 12, "t": 30 if title else 10, "b": 40}, "showlegend": False,
         "hoverlabel": {"font": {"size": 12}}}
    if title:
        d["title"] = {"text": title, "font": {"size": 13}, "x": 0.01, "xanchor": "left"}
    d.update(kw)
    return d


def empty(message: str, height: int | None = None) -> dict:
    """A blank figure that says what is missing or what to do."""
    lay = layout(xaxis={"visible": False}, yaxis={"visible": False},
                 annotations=[{"text": message, "showarrow": False, "xref": "paper", "yref": "paper",
                               "x": 0.5, "y": 0.5, "font": {"size": 13, "color": "#555"}}])
    if height:
        lay["height"] = height
    return {"data": [], "layout": lay}


def layer_colors(L: int) -> list[str]:
    """One colour per layer from cividis (the same mapping as the colour bars)."""
    return pc.sample_colorscale(LAYER_SCALE, [l / max(L - 1, 1) for l in range(L)])


def class_style(n_classes: int) -> list[tuple[str, str]]:
    """(colour, symbol) per class: Okabe-Ito up to 8 classes, Safe beyond, then symbols cycle."""
    if n_classes <= len(OKABE_ITO):
        return [(OKABE_ITO[c], "circle") for c in range(n_classes)]
    return [(SAFE[c % len(SAFE)], SYMBOLS[(c // len(SAFE)) % len(SYMBOLS)]) for c in range(n_classes)]


def head_name(layer: int, head: int) -> str:
    return f"layer {layer} head {head}"


def token_names(N: int, T: int, grid) -> list[str]:
    gw = grid[1]
    names = ["CLS" if t == 0 else f"prefix {t}" for t in range(T)]
    names += [f"patch {p} (row {p // gw}, col {p % gw})" for p in range(N - T)]
    return names


def selected_ring(x, y, text=None) -> dict:
    return {"type": "scatter", "x": [x], "y": [y], "mode": "markers", "hoverinfo": "skip",
            "marker": {"size": 18, "color": "rgba(0,0,0,0)", "line": {"color": ACCENT, "width": 3}},
            "name": text or "selected"}


# ---- A: image overview ---------------------------------------------------------------------
def image_overview(x, y, labels, image_ids, class_names, selected_pos=None, uirevision=None) -> dict:
    """Scatter of images (overview_x/y) coloured by class; customdata = image id.
    Hover text is left to the page's tooltip (thumbnail); the selected image gets a ring."""
    labels = np.asarray(labels)
    classes = sorted(int(c) for c in np.unique(labels))
    styles = class_style(max(classes, default=-1) + 2)
    data = []
    for c in classes:
        m = labels == c
        colour, symbol = styles[c] if c >= 0 else (GREY, "circle")
        name = class_names[c] if 0 <= c < len(class_names) else "unknown"
        data.append({"type": "scattergl" if m.sum() > 3000 else "scatter", "mode": "markers", "name": name,
                     "x": np.asarray(x)[m].tolist(), "y": np.asarray(y)[m].tolist(),
                     "customdata": np.asarray(image_ids)[m].tolist(), "hoverinfo": "none",
                     "marker": {"color": colour, "symbol": symbol, "size": 7, "opacity": 0.85,
                                "line": {"width": 0.5, "color": "white"}}})
    if selected_pos is not None:
        data.append(selected_ring(float(x[selected_pos]), float(y[selected_pos]), "selected image"))
        data[-1]["showlegend"] = False
    lay = layout(showlegend=True, dragmode="zoom", uirevision=uirevision,
                 legend={"font": {"size": 10}, "itemsizing": "constant", "title": {"text": "class"}},
                 xaxis=axis(None, showticklabels=False, showgrid=False, showline=False, ticks=""),
                 yaxis=axis(None, showticklabels=False, showgrid=False, showline=False, ticks=""),
                 margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return {"data": data, "layout": lay}


# ---- B: head importance --------------------------------------------------------------------
def _head_axis(L: int, H: int) -> dict:
    step = 1 if L <= 16 else 2
    return axis("head (grouped by layer)", tickvals=[l * H + (H - 1) / 2 for l in range(0, L, step)],
                ticktext=[f"L{l}" for l in range(0, L, step)], range=[-0.5, L * H - 0.5], showgrid=False)


def _layer_shapes(L: int, H: int) -> list[dict]:
    """Shaded bands behind every other layer plus thin boundaries between layers."""
    shapes = []
    for l in range(L):
        if l % 2:
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": l * H - 0.5, "x1": (l + 1) * H - 0.5,
                           "y0": 0, "y1": 1, "fillcolor": "rgba(0,0,0,0.035)", "line": {"width": 0}, "layer": "below"})
        if l:
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": l * H - 0.5, "x1": l * H - 0.5,
                           "y0": 0, "y1": 1, "line": {"color": "#c8c8c8", "width": 1}, "layer": "below"})
    return shapes


def head_importance(L: int, H: int, metric_label: str, mean, std, image_values=None, selected=None,
                    image_label: str | None = None) -> dict:
    """B1: the chosen metric over all L*H heads: mean +/- std over images, and the selected
    image's curve on top. ``selected`` = (layer, head) draws a vertical marker."""
    x = np.arange(L * H)
    cd = np.stack([x // H, x % H], axis=1).tolist()
    mean, std = np.asarray(mean, float), np.asarray(std, float)
    faded = image_values is not None
    data = [
        {"type": "scatter", "x": x.tolist(), "y": (mean + std).tolist(), "mode": "lines", "line": {"width": 0},
         "hoverinfo": "skip", "name": "mean + std"},
        {"type": "scatter", "x": x.tolist(), "y": (mean - std).tolist(), "mode": "lines", "line": {"width": 0},
         "fill": "tonexty", "fillcolor": "rgba(0,114,178,0.15)", "hoverinfo": "skip", "name": "mean - std"},
        {"type": "scatter", "x": x.tolist(), "y": mean.tolist(), "mode": "lines+markers", "name": "mean over images",
         "customdata": cd, "line": {"color": MEAN_BLUE, "width": 1.2 if faded else 2},
         "marker": {"size": 4 if faded else 5, "color": MEAN_BLUE}, "opacity": 0.6 if faded else 1,
         "hovertemplate": "layer %{customdata[0]} head %{customdata[1]}<br>mean %{y:.4f}<extra></extra>"},
    ]
    if faded:
        data.append({"type": "scatter", "x": x.tolist(), "y": np.asarray(image_values, float).tolist(),
                     "mode": "lines+markers", "name": image_label or "selected image", "customdata": cd,
                     "line": {"color": ACCENT, "width": 2}, "marker": {"size": 5, "color": ACCENT},
                     "hovertemplate": "layer %{customdata[0]} head %{customdata[1]}<br>image %{y:.4f}<extra></extra>"})
    shapes = _layer_shapes(L, H)
    if selected is not None:
        i = selected[0] * H + selected[1]
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": i, "x1": i, "y0": 0, "y1": 1,
                       "line": {"color": ACCENT, "width": 2, "dash": "dot"}})
    lay = layout(showlegend=True, shapes=shapes, xaxis=_head_axis(L, H), yaxis=axis(metric_label),
                 legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom",
                         "font": {"size": 10}}, margin={"l": 55, "r": 10, "t": 24, "b": 40})
    lay["legend"]["traceorder"] = "normal"
    for t in data[:2]:
        t["showlegend"] = False
    return {"data": data, "layout": lay}


def pruning_modes(mode_labels, values, metric_label: str, selected_mode: int = 1, reference=None) -> dict:
    """B2: the metric under every pruning mode (bars); the chosen mode (for B3) is dark.
    ``reference`` draws a dashed line (e.g. the unpruned probability)."""
    vals = [None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v) for v in values]
    colours = [ACCENT if m == selected_mode else "#7aa6c8" for m in range(len(vals))]
    labels = [f"{m}: {lab}" for m, lab in enumerate(mode_labels)]
    data = [{"type": "bar", "x": labels, "y": vals, "customdata": list(range(len(vals))),
             "marker": {"color": colours}, "hovertemplate": "mode %{x}<br>%{y:.4f}<extra></extra>"}]
    shapes = []
    if reference is not None:
        shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": reference, "y1": reference,
                       "line": {"color": "#444", "dash": "dash", "width": 1}})
    lay = layout(shapes=shapes, xaxis=axis("pruned regions (mode)", tickangle=-35, tickfont={"size": 10}),
                 yaxis=axis(metric_label), margin={"l": 62, "r": 10, "t": 10, "b": 70}, bargap=0.25)
    return {"data": data, "layout": lay}


def top5(class_names, probs, true_label_name: str | None, caption: str) -> dict:
    """B3: the top-5 classes and probabilities (highest on top); the true label in bold."""
    names = [f"<b>{n}</b>" if n == true_label_name else n for n in class_names]
    data = [{"type": "bar", "orientation": "h", "y": names[::-1], "x": [float(p) for p in probs][::-1],
             "marker": {"color": [ACCENT if n == true_label_name else MEAN_BLUE for n in class_names][::-1]},
             "text": [f"{p:.3f}" for p in probs][::-1], "textposition": "auto",
             "hovertemplate": "%{y}: %{x:.4f}<extra></extra>"}]
    lay = layout(caption, xaxis=axis("probability", range=[0, 1]), yaxis=axis(None, automargin=True),
                 margin={"l": 10, "r": 10, "t": 28, "b": 40})
    return {"data": data, "layout": lay}


# ---- C: attention strength -----------------------------------------------------------------
def _padded(value_range):
    lo, hi = value_range
    pad = 0.03 * (hi - lo)
    return [lo - pad, hi + pad]


def property_overview(values, L: int, H: int, selected=None, title: str | None = None,
                      y_title: str = "strength entropy", y_range=(0, 1)) -> dict:
    """C1: every head at x = layer (spread by head), y = a per-head property (default: the
    normalised strength entropy), coloured by layer. y_range None: automatic."""
    idx = np.arange(L * H)
    layer, head = idx // H, idx % H
    jitter = (head - (H - 1) / 2) * (0.6 / max(H, 1))
    x = layer + jitter
    ent = np.asarray(values, float)
    data = [{"type": "scatter", "mode": "markers", "x": x.tolist(), "y": ent.tolist(),
             "customdata": np.stack([layer, head], 1).tolist(),
             "marker": {"color": layer.tolist(), "colorscale": LAYER_SCALE, "cmin": 0, "cmax": max(L - 1, 1),
                        "size": 8, "line": {"width": 0.5, "color": "#333"},
                        "colorbar": {"title": {"text": "layer"}, "thickness": 10, "len": 0.9}},
             "hovertemplate": "layer %{customdata[0]} head %{customdata[1]}<br>" + y_title
                              + " %{y:.4g}<extra></extra>"}]
    if selected is not None:
        i = selected[0] * H + selected[1]
        data.append(selected_ring(float(x[i]), float(ent[i])))
    y_axis = axis(y_title, range=_padded(y_range)) if y_range else axis(y_title)
    lay = layout(title, xaxis=axis("layer", tickmode="linear", dtick=1 if L <= 16 else 2, range=[-0.6, L - 0.4]),
                 yaxis=y_axis,
                 margin={"l": 55, "r": 10, "t": 28 if title else 10, "b": 40})
    return {"data": data, "layout": lay}


def strength_bars(strength, title: str | None = None) -> dict:
    """C2: the selected head's k-hop strength vector."""
    s = np.asarray(strength, float)
    data = [{"type": "bar", "x": list(range(len(s))), "y": s.tolist(), "marker": {"color": MEAN_BLUE},
             "hovertemplate": "hop %{x}: %{y:.4g}<extra></extra>"}]
    lay = layout(title, xaxis=axis("hop distance k (patches)", tickmode="linear", dtick=1 if len(s) <= 16 else 2),
                 yaxis=axis("attention per patch", exponentformat="power"),
                 margin={"l": 60, "r": 10, "t": 28 if title else 10, "b": 40}, bargap=0.15)
    return {"data": data, "layout": lay}


def distribution(values, current=None, bins: int = 30, title: str | None = None,
                 x_title: str = "strength entropy", x_range=(0, 1)) -> dict:
    """C3: distribution (area) of one head's property over all images (default: strength entropy
    in [0, 1]; x_range None: the values' range), with a line at the selected image's value."""
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if x_range is None:
        lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
        x_range = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    hist, edges = np.histogram(v, bins=bins, range=tuple(x_range))
    share = hist / max(len(v), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    data = [{"type": "scatter", "x": centres.tolist(), "y": share.tolist(), "mode": "lines", "fill": "tozeroy",
             "line": {"color": MEAN_BLUE, "shape": "spline", "smoothing": 0.6}, "fillcolor": "rgba(0,114,178,0.25)",
             "hovertemplate": "%{x:.3g}: %{y:.1%} of images<extra></extra>"}]
    shapes = []
    if current is not None and not np.isnan(current):
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": current, "x1": current, "y0": 0, "y1": 1,
                       "line": {"color": ACCENT, "width": 2}})
    lay = layout(title, shapes=shapes, xaxis=axis(x_title, range=list(x_range)),
                 yaxis=axis("share of images", tickformat=".0%"), margin={"l": 55, "r": 10, "t": 28 if title else 10, "b": 40})
    return {"data": data, "layout": lay}


# ---- D: attention pattern ------------------------------------------------------------------
def density_grid(xy: np.ndarray, bins: int = 80):
    """2-D histogram of all points: (x centres, y centres, counts [bins, bins] transposed for plotly)."""
    xy = xy.reshape(-1, 2)
    xy = xy[~np.isnan(xy).any(1)]
    h, xe, ye = np.histogram2d(xy[:, 0], xy[:, 1], bins=bins)
    return (xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2, h.T


def pattern_background(xy: np.ndarray, style: str) -> list[dict]:
    """D1's context layer (independent of the selection): all heads of all images as tiny points
    (pointIndex = image_position * L*H + head_index) or as a density."""
    if style == "points":
        flat = xy.reshape(-1, 2)
        return [{"type": "scattergl", "mode": "markers", "x": typed(flat[:, 0]), "y": typed(flat[:, 1]),
                 "marker": {"size": 3, "color": "rgba(110,110,110,0.25)"}, "name": "all heads",
                 "hovertemplate": "a head of another image (click to select)<extra></extra>"}]
    xc, yc, z = density_grid(xy)
    z = np.where(z > 0, np.log1p(z), np.nan)
    return [{"type": "heatmap", "x": typed(xc), "y": typed(yc), "z": typed(z), "showscale": False,
             "colorscale": [[0, "#f2f2f2"], [1, "#5a5a5a"]], "hoverinfo": "skip", "name": "density", "zsmooth": "best"}]


def pattern_overlay(xy_image, L: int, H: int, selected=None, head_all_images=None, head_label=None) -> list[dict]:
    """D1's selection layer, always three traces (so a selection can patch them in place):
    the selected head over all images (light), the selected image's heads (coloured by layer,
    customdata = [layer, head]) and a ring around the selected head; unused slots are empty."""
    blank = {"type": "scatter", "mode": "markers", "x": [], "y": [], "hoverinfo": "skip"}
    data = [dict(blank, name="selected head, all images"), dict(blank, name="heads of the image"),
            dict(blank, name="selected")]
    if head_all_images is not None:
        data[0] = {"type": "scattergl" if len(head_all_images) > 5000 else "scatter", "mode": "markers",
                   "x": typed(head_all_images[:, 0]), "y": typed(head_all_images[:, 1]),
                   "name": head_label or "selected head, all images",
                   "marker": {"size": 5, "color": "rgba(213,94,0,0.35)"}, "hoverinfo": "skip"}
    if xy_image is not None:
        idx = np.arange(L * H)
        data[1] = {"type": "scatter", "mode": "markers", "x": xy_image[:, 0].tolist(), "y": xy_image[:, 1].tolist(),
                   "customdata": np.stack([idx // H, idx % H], 1).tolist(), "name": "heads of the image",
                   "marker": {"color": (idx // H).tolist(), "colorscale": LAYER_SCALE, "cmin": 0,
                              "cmax": max(L - 1, 1), "size": 8, "line": {"width": 0.6, "color": "#333"},
                              "colorbar": {"title": {"text": "layer"}, "thickness": 10, "len": 0.9}},
                   "hovertemplate": "layer %{customdata[0]} head %{customdata[1]}<extra></extra>"}
        if selected is not None:
            i = selected[0] * H + selected[1]
            data[2] = selected_ring(float(xy_image[i, 0]), float(xy_image[i, 1]))
    return data


def pattern_layout(background: list[dict], overlay: list[dict], kind: str, uirevision=None) -> dict:
    """D1: background (cached per run/kind/style) + overlay (per selection)."""
    title = "CLS attention vectors" if kind == "cls" else "patch attention latents"
    lay = layout(None, xaxis=axis(None, showticklabels=False, showgrid=False, showline=False, ticks=""),
                 yaxis=axis(None, showticklabels=False, showgrid=False, showline=False, ticks=""), uirevision=uirevision,
                 margin={"l": 10, "r": 10, "t": 10, "b": 10},
                 annotations=[{"text": f"2-D layout of {title}", "xref": "paper", "yref": "paper", "x": 0, "y": 1,
                               "xanchor": "left", "yanchor": "top", "showarrow": False, "font": {"size": 10, "color": "#666"}}])
    return {"data": background + overlay, "layout": lay}


def _strength_levels(values: np.ndarray, n_levels: int) -> np.ndarray:
    """0..n_levels-1 per value, by rank among the drawn values (darker = stronger)."""
    if len(values) == 0:
        return np.zeros(0, int)
    ranks = values.argsort().argsort()
    return np.minimum((ranks * n_levels) // len(values), n_levels - 1)


def two_axis(A: np.ndarray, T: int, threshold: float, grid, max_segments: int = 20000, n_levels: int = 4):
    """D3: source tokens on a top axis, target tokens on a bottom axis, one segment per attention
    value >= threshold (blue: CLS-related, orange: patch->patch; darker = stronger).
    Returns (figure, number of segments drawn, number of values above the threshold)."""
    N = A.shape[0]
    src, dst = np.nonzero(A >= threshold)
    vals = A[src, dst]
    above = len(vals)
    if above > max_segments:
        keep = np.argsort(-vals)[:max_segments]
        src, dst, vals = src[keep], dst[keep], vals[keep]
    cls_related = (src < T) | (dst < T)
    data = []
    for family, mask, scale in (("CLS-related", cls_related, BLUES), ("patch→patch", ~cls_related, ORANGES)):
        if not mask.any():
            continue
        levels = _strength_levels(vals[mask], n_levels)
        s, d = src[mask], dst[mask]
        for lev in range(n_levels):
            sel = levels == lev
            if not sel.any():
                continue
            k = int(sel.sum())
            xs = np.empty(3 * k)
            ys = np.empty(3 * k)
            xs[0::3], xs[1::3], xs[2::3] = s[sel], d[sel], np.nan
            ys[0::3], ys[1::3], ys[2::3] = 1, 0, np.nan
            colour = scale[int(round(lev * (len(scale) - 1) / max(n_levels - 1, 1)))]
            data.append({"type": "scatter", "mode": "lines", "x": typed(xs), "y": typed(ys), "hoverinfo": "skip",
                         "line": {"color": colour, "width": 1 + 0.5 * lev}, "name": f"{family} {lev}",
                         "meta": {"segments": k}, "connectgaps": False})
    names = token_names(N, T, grid)
    tok = np.arange(N)
    tok_colour = [MEAN_BLUE if t < T else "#c26a1b" for t in tok]
    for role, y, label in ((0, 1, "source"), (1, 0, "target")):
        data.append({"type": "scatter", "mode": "markers", "x": tok.tolist(), "y": [y] * N, "name": f"{label} tokens",
                     "customdata": [[role, int(t)] for t in tok], "text": names,
                     "marker": {"size": 6 if N <= 100 else 4, "color": tok_colour, "symbol": "line-ns-open" if N > 100 else "circle"},
                     "hovertemplate": f"{label}: %{{text}}<extra></extra>"})
    gw = grid[1]
    step = max(1, grid[0] // 7)
    rows = range(step, grid[0], step)
    ticks = [0] + [T + r * gw for r in rows]
    ticktext = ["CLS" if T == 1 else "prefix"] + [f"row {r}" for r in rows]
    lay = layout(None, xaxis=axis(None, tickvals=ticks, ticktext=ticktext, range=[-1, N], showgrid=False, tickfont={"size": 9}),
                 yaxis=axis(None, tickvals=[0, 1], ticktext=["target", "source"], range=[-0.12, 1.12], showgrid=False),
                 margin={"l": 55, "r": 10, "t": 10, "b": 30}, hoverdistance=8)
    return {"data": data, "layout": lay}, len(vals), above


def attention_heatmap(A: np.ndarray, T: int, threshold: float) -> dict:
    """D4: the attention matrix (row = source, column = target); the prefix rows/columns are drawn
    wider; CLS-related cells in blues, patch->patch in oranges; values below the threshold blank."""
    N = A.shape[0]
    P = N - T
    wide = max(2, P // 16)
    widths = np.array([wide] * T + [1] * P, float)
    edges = np.concatenate([[0], np.cumsum(widths)])
    shown = np.where(A >= threshold, A, np.nan).astype(np.float32)
    cls_part = shown.copy()
    cls_part[T:, T:] = np.nan
    patch_part = shown.copy()
    patch_part[:T, :] = np.nan
    patch_part[:, :T] = np.nan
    vmax = float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0
    data = []
    for name, z, scale, x_bar in (("CLS-related", cls_part, BLUES, 1.02), ("patch→patch", patch_part, ORANGES, 1.12)):
        data.append({"type": "heatmap", "x": typed(edges), "y": typed(edges), "z": typed(z), "name": name,
                     "colorscale": [[i / (len(scale) - 1), c] for i, c in enumerate(scale)],
                     "zmin": threshold, "zmax": max(vmax, threshold + 1e-9), "hoverongaps": False,
                     "colorbar": {"title": {"text": name.split("→")[0].split("-")[0], "side": "right"},
                                  "thickness": 8, "x": x_bar, "len": 0.8, "tickfont": {"size": 9},
                                  "tickformat": ".3~g"},
                     "hovertemplate": "source %{y:.0f}, target %{x:.0f}: %{z:.4f}<extra>" + name + "</extra>"})
    centres = (edges[:-1] + edges[1:]) / 2
    gw = max(1, int(round(P ** 0.5)))
    step = gw * max(1, round(P / gw / 6))
    tick_tokens = [0] + list(range(T + step, N, step))
    ticks = dict(tickvals=[float(centres[t]) for t in tick_tokens], tickangle=0,
                 ticktext=["CLS" if t == 0 else str(t) for t in tick_tokens], showgrid=False, tickfont={"size": 9})
    lay = layout(None, xaxis=axis("target token", range=[0, edges[-1]], **ticks, side="top"),
                 yaxis=axis("source token", range=[edges[-1], 0], **ticks, scaleanchor="x"),
                 margin={"l": 50, "r": 60, "t": 40, "b": 10})
    return {"data": data, "layout": lay}


def attention_histogram(A: np.ndarray, threshold: float, q: float, bins: int = 60) -> dict:
    """D5: histogram of the head's N*N attention values (log counts) with the threshold line.
    Clicking a bar sets the threshold at its left edge (customdata)."""
    v = np.asarray(A, float).ravel()
    lo, hi = float(v.min()), float(v.max())
    hist, edges = np.histogram(v, bins=bins, range=(lo, max(hi, lo + 1e-9)))
    centres = (edges[:-1] + edges[1:]) / 2
    colours = [ACCENT if e >= threshold else "#9ab7d3" for e in edges[1:]]
    data = [{"type": "bar", "x": centres.tolist(), "y": hist.tolist(), "customdata": edges[:-1].tolist(),
             "width": float(edges[1] - edges[0]), "marker": {"color": colours, "line": {"width": 0}},
             "hovertemplate": "%{x:.4f}: %{y} values<extra>click to set the threshold</extra>"}]
    shapes = [{"type": "line", "xref": "x", "yref": "paper", "x0": threshold, "x1": threshold, "y0": 0, "y1": 1,
               "line": {"color": "#222", "width": 2}}]
    ann = [{"x": threshold, "y": 0.98, "xref": "x", "yref": "paper", "text": f"top {q * 100:.3g}% ≥ {threshold:.3g} ",
            "showarrow": False, "xanchor": "right", "yanchor": "top", "font": {"size": 11},
            "bgcolor": "rgba(255,255,255,0.8)"}]
    lay = layout(None, shapes=shapes, annotations=ann, bargap=0,
                 xaxis=axis("attention value"), yaxis=axis("count", type="log", dtick=1),
                 margin={"l": 55, "r": 10, "t": 10, "b": 40})
    return {"data": data, "layout": lay}


# ---- D2: image masks -----------------------------------------------------------------------
def masked_image(image, weights=None, grid=None, highlight=None, size: int = 160) -> str:
    """The image (PIL) as a JPEG data URI; with ``weights`` [gh*gw] it is overlaid as a transparency
    mask (stronger attention -> more visible); ``highlight`` = patch index outlined."""
    from PIL import Image, ImageDraw

    im = image.convert("RGB").resize((size, size), Image.BILINEAR)
    if weights is not None:
        gh, gw = grid
        w = np.asarray(weights, float).reshape(gh, gw)
        w = w / w.max() if w.max() > 0 else w
        mask = Image.fromarray((w * 255).astype(np.uint8), "L").resize((size, size), Image.BILINEAR)
        m = np.asarray(mask, float)[..., None] / 255
        arr = np.asarray(im, float) * (0.12 + 0.88 * m) + 255 * 0.0
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if highlight is not None and grid is not None:
        gh, gw = grid
        r, c = divmod(int(highlight), gw)
        ch, cw = size / gh, size / gw
        ImageDraw.Draw(im).rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=(213, 94, 0), width=2)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)  # ~10x faster to encode than PNG
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# ---- saliency panel (patch attribution maps, SPEC "Patch attribution") -----------------------
def saliency_map(values, name: str, unit: str, others: dict | None = None, image_uri: str | None = None,
                 selected_patch: int | None = None) -> dict:
    """One patch map [gh, gw] as a colour overlay on the image (``image_uri``, e.g. masked_image()),
    with its own colour bar in ``unit``: diverging around 0 when the map has both signs (ablation
    maps), cividis otherwise. Hover shows the patch's value in every map of ``others``
    ({name: [gh, gw]}); customdata is the flat patch index (click -> source token)."""
    z = np.asarray(values, float)
    gh, gw = z.shape
    others = {name: z, **(others or {})}
    idx = np.arange(gh * gw).reshape(gh, gw)
    text = [[f"patch {idx[r, c]} (row {r}, col {c})<br>" + "<br>".join(
        f"{'<b>' if k == name else ''}{k}: {float(np.asarray(v, float)[r, c]):.4g}{'</b>' if k == name else ''}"
        for k, v in others.items()) for c in range(gw)] for r in range(gh)]
    signed = np.nanmin(z) < 0 < np.nanmax(z)
    scale = {"colorscale": "RdBu", "reversescale": True, "zmid": 0} if signed else {"colorscale": LAYER_SCALE}
    data = [{"type": "heatmap", "z": typed(np.where(np.isfinite(z), z, np.nan).astype(np.float32)),
             "x": list(range(gw)), "y": list(range(gh)), "customdata": idx.tolist(), "text": text,
             "hovertemplate": "%{text}<extra></extra>", "opacity": 0.6 if image_uri else 1.0, "xgap": 0, "ygap": 0,
             "colorbar": {"title": {"text": unit, "side": "right"}, "thickness": 10, "tickformat": ".3~g"}, **scale}]
    images = ([{"source": image_uri, "xref": "x", "yref": "y", "x": -0.5, "y": -0.5, "sizex": gw, "sizey": gh,
                "sizing": "stretch", "layer": "below"}] if image_uri else [])
    shapes = []
    if selected_patch is not None:
        r, c = divmod(int(selected_patch), gw)
        shapes.append({"type": "rect", "x0": c - 0.5, "x1": c + 0.5, "y0": r - 0.5, "y1": r + 0.5,
                       "line": {"color": ACCENT, "width": 2}})
    lay = layout(name, images=images, shapes=shapes, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                 xaxis=axis(None, visible=False, range=[-0.5, gw - 0.5], constrain="domain"),
                 yaxis=axis(None, visible=False, range=[gh - 0.5, -0.5], scaleanchor="x"))
    return {"data": data, "layout": lay}


def map_agreement(agreement: dict) -> dict:
    """Spearman agreement between maps ({name: {name: rho}}) as an annotated square heatmap."""
    names = list(agreement)
    z = np.array([[np.nan if agreement[a][b] is None else agreement[a][b] for b in names] for a in names], float)
    data = [{"type": "heatmap", "z": z.tolist(), "x": names, "y": names, "zmin": -1, "zmax": 1,
             "colorscale": "RdBu", "reversescale": True, "showscale": False,
             "text": [[f"{v:.2f}" if np.isfinite(v) else "–" for v in row] for row in z],
             "texttemplate": "%{text}", "hovertemplate": "%{y} vs %{x}: Spearman %{text}<extra></extra>"}]
    lay = layout("agreement (Spearman over patches)", margin={"l": 90, "r": 10, "t": 30, "b": 70},
                 xaxis=axis(None, tickangle=-30), yaxis=axis(None, autorange="reversed"))
    return {"data": data, "layout": lay}


def deletion_curves(n, curves: dict, metric_title: str, selected_n: int | None = None) -> dict:
    """Deletion curves: the model's output (``metric_title``, e.g. P(true)) after removing the top-n
    patches of each map ({map: [value per n]}), one line per map; a line marks the slider's n."""
    data = [{"type": "scatter", "mode": "lines+markers", "name": name, "x": list(n), "y": list(values),
             "line": {"color": OKABE_ITO[i % len(OKABE_ITO)], "width": 2}, "marker": {"size": 5},
             "hovertemplate": f"{name}: n=%{{x}}, %{{y:.4g}}<extra></extra>"}
            for i, (name, values) in enumerate(curves.items())]
    shapes = ([{"type": "line", "xref": "x", "yref": "paper", "x0": selected_n, "x1": selected_n, "y0": 0, "y1": 1,
                "line": {"color": GREY, "width": 1, "dash": "dot"}}] if selected_n is not None else [])
    lay = layout(None, shapes=shapes, showlegend=True, legend={"orientation": "h", "y": 1.12},
                 xaxis=axis("patches removed (top n of the map)"), yaxis=axis(metric_title),
                 margin={"l": 55, "r": 10, "t": 30, "b": 40})
    return {"data": data, "layout": lay}
