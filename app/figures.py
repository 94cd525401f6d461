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
import math

import numpy as np
import plotly.colors as pc

from analysis.safe_text import plotly_text

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


# ---- values that cannot be drawn or ranked ---------------------------------------------------
def unusable(values) -> np.ndarray:
    """Bool mask of the entries of ``values`` where a finite value belongs but none is stored: ±inf
    always, NaN only when some other entry is finite (all NaN: the metric does not apply there,
    e.g. prob_drop of a backbone or of an unlabelled image; that is not a fault and is not counted)."""
    v = np.asarray(values, dtype=np.float64)
    bad = np.isinf(v)
    return bad | np.isnan(v) if np.isfinite(v).any() else bad


def unusable_note(values, H: int, what: str, shown: int = 6) -> str | None:
    """"N heads have no finite WHAT (L0H1, L2H3, ...)" for the unusable entries of per-head
    ``values`` [L*H] (index layer * H + head); None when every head has a usable value."""
    bad = np.flatnonzero(unusable(values))
    if not len(bad):
        return None
    heads = ", ".join(f"L{i // H}H{i % H}" for i in bad[:shown]) + (", ..." if len(bad) > shown else "")
    many = len(bad) > 1
    return f"{len(bad)} head{'s' if many else ''} {'have' if many else 'has'} no finite {what} ({heads})"


def finite_or_none(values) -> list:
    """``values`` as a (nested) list with None for every non-finite entry (plotly draws a gap; JSON
    has no inf/NaN)."""
    v = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(v), v, None).tolist()


def token_names(N: int, T: int, grid) -> list[str]:
    gw = grid[1]
    names = ["CLS" if t == 0 else f"prefix {t}" for t in range(T)]
    names += [f"patch {p} (row {p // gw}, col {p % gw})" for p in range(N - T)]
    return names


def selected_ring(x, y, text=None) -> dict:
    return {"type": "scatter", "x": [x], "y": [y], "mode": "markers", "hoverinfo": "skip",
            "marker": {"size": 18, "color": "rgba(0,0,0,0)", "line": {"color": ACCENT, "width": 3}},
            "name": text or "selected"}


def selected_ring_shape(x, y_paper, size: int = 18) -> dict:
    """The selected head's ring as a layout shape, ``size`` px across at data x and paper y (which the
    plot area does not clip at the axis' end): a new head changes only the figure's shapes, which
    plotly redraws without redrawing its traces."""
    r = size / 2
    return {"type": "circle", "xref": "x", "yref": "paper", "xsizemode": "pixel", "ysizemode": "pixel",
            "xanchor": x, "yanchor": y_paper, "x0": -r, "x1": r, "y0": -r, "y1": r,
            "line": {"color": ACCENT, "width": 3}, "name": "selected"}


# ---- A: image overview ---------------------------------------------------------------------
COLOR_BY = {"class": "class", "prob": "P(true label)", "correct": "correct / wrong", "head": "metric of the head"}
CORRECT_COLOURS = (("correct", "#0072B2", "circle"), ("wrong", ACCENT, "x"))


def _points(x, y, ids, m, name, marker) -> dict:
    return {"type": "scattergl" if m.sum() > 3000 else "scatter", "mode": "markers", "name": name,
            "x": np.asarray(x)[m].tolist(), "y": np.asarray(y)[m].tolist(),
            "customdata": np.asarray(ids)[m].tolist(), "hoverinfo": "none", "marker": marker}


def image_overview(x, y, labels, image_ids, class_names, uirevision=None, color_by: str = "class",
                   values=None, value_label: str | None = None, correct=None) -> dict:
    """A: scatter of images (overview_x/y); customdata = image id.
    ``color_by``: "class" (one trace per class, Okabe-Ito/Safe colours and symbols), "prob" or "head"
    (continuous ``values`` [n] on cividis with a horizontal colour bar titled ``value_label``), "correct"
    (``correct`` [n] bool: two traces). The legend is NOT drawn by plotly (it would squeeze the plot):
    ``legend_items(fig)`` lists (name, colour, symbol) for a compact HTML legend. The selection is
    drawn over it (``overview_selection``)."""
    labels = np.asarray(labels)
    n = len(labels)
    base = {"size": 7, "opacity": 0.85, "line": {"width": 0.5, "color": "white"}}
    data, legend = [], []
    if color_by in ("prob", "head") and values is not None:
        v = np.asarray(values, float)
        ok = ~np.isnan(v)
        lo, hi = (float(np.nanmin(v)), float(np.nanmax(v))) if ok.any() else (0.0, 1.0)
        if color_by == "prob":
            lo, hi = 0.0, 1.0
        marker = dict(base, color=np.where(ok, v, lo).tolist(), colorscale=LAYER_SCALE, cmin=lo, cmax=max(hi, lo + 1e-9),
                      colorbar={"title": {"text": value_label or "", "side": "top", "font": {"size": 10}},
                                "orientation": "h", "thickness": 8, "len": 0.6, "x": 0.5, "y": -0.02,
                                "yanchor": "top", "tickfont": {"size": 9}})
        data.append(_points(x, y, image_ids, np.ones(n, bool), value_label or color_by, marker))
        margin_b = 42
    elif color_by == "correct" and correct is not None:
        correct = np.asarray(correct, bool)
        for (name, colour, symbol), m in zip(CORRECT_COLOURS, (correct, ~correct)):
            if m.any():
                data.append(_points(x, y, image_ids, m, f"{name} ({int(m.sum())})",
                                    dict(base, color=colour, symbol=symbol)))
                legend.append((f"{name} ({int(m.sum())})", colour, symbol))
        margin_b = 6
    else:
        classes = sorted(int(c) for c in np.unique(labels))
        styles = class_style(max(classes, default=-1) + 2)
        for c in classes:
            m = labels == c
            colour, symbol = styles[c] if c >= 0 else (GREY, "circle")
            name = class_names[c] if 0 <= c < len(class_names) else "unknown"
            data.append(_points(x, y, image_ids, m, name, dict(base, color=colour, symbol=symbol)))
            legend.append((name, colour, symbol))
        margin_b = 6
    lay = layout(dragmode="zoom", uirevision=uirevision, hoverdistance=8,
                 xaxis=axis(None, showticklabels=False, showgrid=False, showline=False, ticks=""),
                 yaxis=axis(None, showticklabels=False, showgrid=False, showline=False, ticks=""),
                 margin={"l": 6, "r": 6, "t": 6, "b": margin_b}, meta={"legend": legend})
    return {"data": data, "layout": lay}


def set_outline(x, y) -> dict:
    """Dark outlines around the images of a selected set (A)."""
    return {"type": "scatter", "mode": "markers", "x": np.asarray(x, float).tolist(), "y": np.asarray(y, float).tolist(),
            "hoverinfo": "skip", "name": "selected set",
            "marker": {"size": 11, "color": "rgba(0,0,0,0)", "line": {"color": "#222", "width": 1.5}}}


def overview_selection(x, y, selected_pos=None, selected_set=None) -> list[dict]:
    """A's selection layer (drawn by assets/overlay.js over the images, which then never redraw for
    a selection): the set's outline (positions ``selected_set``) and the ring around the selected
    image (position ``selected_pos``), each in a plot of its own (``meta.layer``: a new image does
    not redraw the set); it takes no mouse events."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    data = []
    if selected_set is not None and len(selected_set):
        data.append(dict(set_outline(x[selected_set], y[selected_set]), meta={"layer": "set"}))
    if selected_pos is not None:
        data.append(dict(selected_ring(float(x[selected_pos]), float(y[selected_pos]), "selected image"),
                         meta={"layer": "image"}))
    return [dict(t, showlegend=False, hoverinfo="skip") for t in data]


def legend_items(fig: dict) -> list[tuple[str, str, str]]:
    """(name, colour, symbol) of A's discrete colour encoding (empty for a colour bar)."""
    return [tuple(i) for i in fig["layout"].get("meta", {}).get("legend", [])]


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


SET_GREEN = "#009E73"  # the head set (pinned heads)
OVERLAY_STYLES = {"taylor": ("#CC79A7", "dash"), "mean": ("#E69F00", "dot")}


def head_importance(L: int, H: int, metric_label: str, mean, std, image_values=None, selected=None,
                    image_label: str | None = None, value_range=(None, None), band_label: str = "mean over images",
                    overlays=(), pinned=(), overlay_notes=(), reference=None) -> dict:
    """B1: the chosen metric over all L*H heads: mean +/- std over images (or over a selected set:
    ``band_label``), the band clipped to the metric's ``value_range`` (lo, hi; None = open), and
    the selected image's curve on top. ``reference`` = (text, y): a labelled value of the image
    (its unpruned P(true)), a dashed line at ``y`` on the metric's axis, or the text alone in the
    upper left when ``y`` is None. ``selected`` = (layer, head) draws a vertical marker;
    ``overlays``: (kind "taylor" | "mean", name, values [L*H]) curves on the same axis (the Taylor
    estimate, the mean-ablated metric); ``overlay_notes``: why a ticked overlay is not drawn (shown in
    the plot's lower right); ``pinned``: the head set's (layer, head), marked in green."""
    x = np.arange(L * H)
    cd = np.stack([x // H, x % H], axis=1).tolist()
    mean, std = np.asarray(mean, float), np.asarray(std, float)
    notes = [unusable_note(mean, H, "mean"),
             None if image_values is None else unusable_note(image_values, H, "value on this image")]
    lo, hi = value_range
    upper, lower = mean + std, mean - std
    if hi is not None:
        upper = np.minimum(upper, hi)
    if lo is not None:
        lower = np.maximum(lower, lo)
    faded = image_values is not None
    band_label, image_label = plotly_text(band_label), image_label and plotly_text(image_label)  # may name a class
    data = [
        {"type": "scatter", "x": x.tolist(), "y": finite_or_none(upper), "mode": "lines", "line": {"width": 0},
         "hoverinfo": "skip", "name": "mean + std"},
        {"type": "scatter", "x": x.tolist(), "y": finite_or_none(lower), "mode": "lines", "line": {"width": 0},
         "fill": "tonexty", "fillcolor": "rgba(0,114,178,0.15)", "hoverinfo": "skip", "name": "mean - std"},
        # under an image's curve the mean is a plain faded line (markers on both curves double the
        # points plotly styles one by one on every redraw); it still hovers and clicks
        {"type": "scatter", "x": x.tolist(), "y": finite_or_none(mean), "mode": "lines" if faded else "lines+markers",
         "name": band_label, "customdata": cd, "line": {"color": MEAN_BLUE, "width": 1.2 if faded else 2},
         "marker": {"size": 5, "color": MEAN_BLUE}, "opacity": 0.6 if faded else 1,
         "hovertemplate": "layer %{customdata[0]} head %{customdata[1]}<br>mean %{y:.4f}<extra></extra>"},
    ]
    if faded:
        data.append({"type": "scatter", "x": x.tolist(), "y": finite_or_none(image_values),
                     "mode": "lines+markers", "name": image_label or "selected image", "customdata": cd,
                     "line": {"color": ACCENT, "width": 2}, "marker": {"size": 5, "color": ACCENT},
                     "hovertemplate": "layer %{customdata[0]} head %{customdata[1]}<br>image %{y:.4f}<extra></extra>"})
    for kind, name, values in overlays:
        colour, dash = OVERLAY_STYLES[kind]
        data.append({"type": "scatter", "x": x.tolist(), "y": finite_or_none(values), "mode": "lines+markers",
                     "name": plotly_text(name), "customdata": cd, "line": {"color": colour, "width": 1.6, "dash": dash},
                     "marker": {"size": 4, "color": colour, "symbol": "diamond"}, "meta": {"overlay": kind},
                     "hovertemplate": "layer %{customdata[0]} head %{customdata[1]}<br>%{fullData.name} %{y:.4f}<extra></extra>"})
    shapes = _layer_shapes(L, H)
    for l, h in pinned:
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": l * H + h, "x1": l * H + h, "y0": 0, "y1": 1,
                       "line": {"color": SET_GREEN, "width": 2}, "opacity": 0.6})
    if selected is not None:
        i = selected[0] * H + selected[1]
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": i, "x1": i, "y0": 0, "y1": 1,
                       "line": {"color": ACCENT, "width": 2, "dash": "dot"}})
    lay = layout(showlegend=True, shapes=shapes, xaxis=_head_axis(L, H), yaxis=axis(metric_label),
                 legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom",
                         "font": {"size": 10}}, margin={"l": 55, "r": 10, "t": 24, "b": 40}, hoverdistance=8)
    lay["legend"]["traceorder"] = "normal"
    note = "; ".join(n for n in notes if n)
    if note:  # ±inf / NaN where the run's tables should hold numbers: not drawn, said so
        lay["annotations"] = [{"text": f"n/a: {note}: not drawn (the run's tables hold ±inf or NaN there).",
                               "xref": "paper", "yref": "paper", "x": 1, "y": 1, "xanchor": "right", "yanchor": "top",
                               "showarrow": False, "font": {"size": 10, "color": ACCENT},
                               "bgcolor": "rgba(255,255,255,0.85)", "name": "unusable-note"}]
    if overlay_notes:  # a ticked overlay that draws nothing for this metric / run says why
        lay.setdefault("annotations", []).append(
            {"text": "<br>".join(plotly_text(n) for n in overlay_notes), "xref": "paper", "yref": "paper", "x": 1,
             "y": 0, "xanchor": "right", "yanchor": "bottom", "align": "right", "showarrow": False,
             "font": {"size": 10, "color": "#555"}, "bgcolor": "rgba(255,255,255,0.85)", "name": "overlay-note"})
    if reference is not None:
        text, y = reference
        if y is not None:
            shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y,
                           "line": {"color": "#555", "width": 1, "dash": "dash"}, "name": "reference"})
        lay.setdefault("annotations", []).append(
            {"text": plotly_text(text), "xref": "paper", "yref": "paper" if y is None else "y", "x": 0 if y is None else 1,
             "y": 1 if y is None else y, "xanchor": "left" if y is None else "right", "yanchor": "top" if y is None else "bottom",
             "showarrow": False, "font": {"size": 10, "color": "#333"}, "bgcolor": "rgba(255,255,255,0.8)",
             "name": "reference"})
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


# B3's probabilities in or beside their bars at a readable size (plotly shrinks a text to fit in its bar)
BAR_TEXT = {"textfont": {"size": 10}, "constraintext": "none"}


def top5(class_names, probs, true_label_name: str | None, caption: str) -> dict:
    """B3: the top-5 classes and probabilities (highest on top); the true label in bold. Class names
    are shown as they are (``plotly_text``: a name is never markup)."""
    names = [f"<b>{plotly_text(n)}</b>" if n == true_label_name else plotly_text(n) for n in class_names]
    data = [{"type": "bar", "orientation": "h", "y": names[::-1], "x": [float(p) for p in probs][::-1],
             "marker": {"color": [ACCENT if n == true_label_name else MEAN_BLUE for n in class_names][::-1]},
             "text": [f"{p:.3f}" for p in probs][::-1], "textposition": "auto", **BAR_TEXT,
             "hovertemplate": "%{y}: %{x:.4f}<extra></extra>"}]
    lay = layout(caption, xaxis=axis("probability", range=[0, 1]), yaxis=axis(None, automargin=True),
                 margin={"l": 10, "r": 10, "t": 28, "b": 40})
    return {"data": data, "layout": lay}


def top5_pair(panels, true_label_name: str | None) -> dict:
    """Two top-5 lists side by side (e.g. one head pruned | the head set pruned): ``panels`` =
    [(caption, class names, probabilities), ...]; the true label in bold and orange."""
    data, ann = [], []
    n = len(panels)
    lay = layout(margin={"l": 10, "r": 10, "t": 22, "b": 30})
    for i, (caption, names, probs) in enumerate(panels):
        xa, ya = ("x", "y") if i == 0 else (f"x{i + 1}", f"y{i + 1}")
        shown = [f"<b>{plotly_text(c)}</b>" if c == true_label_name else plotly_text(c) for c in names]
        data.append({"type": "bar", "orientation": "h", "y": shown[::-1], "x": [float(p) for p in probs][::-1],
                     "xaxis": xa, "yaxis": ya, "name": plotly_text(caption),
                     "marker": {"color": [ACCENT if c == true_label_name else MEAN_BLUE for c in names][::-1]},
                     "text": [f"{p:.3f}" for p in probs][::-1], "textposition": "auto", **BAR_TEXT,
                     "hovertemplate": "%{y}: %{x:.4f}<extra></extra>"})
        lo, hi = i / n + 0.02, (i + 1) / n - 0.02
        lay["xaxis" if i == 0 else f"xaxis{i + 1}"] = axis(None, range=[0, 1], domain=[lo + 0.12, hi], anchor=ya)
        lay["yaxis" if i == 0 else f"yaxis{i + 1}"] = axis(None, anchor=xa, automargin=True, tickfont={"size": 10})
        ann.append({"text": plotly_text(caption), "xref": "paper", "yref": "paper", "x": lo, "y": 1.0, "yanchor": "bottom",
                    "xanchor": "left", "showarrow": False, "font": {"size": 11}})
    lay["annotations"] = ann
    return {"data": data, "layout": lay}


PAIR_ROW_PX = 14                 # the pair heatmap's height per row: a label per row at PAIR_TICK size
PAIR_MARGIN = {"l": 48, "r": 8, "t": 18, "b": 40}


def pair_heatmap_height(k: int, least: int = 0) -> int:
    """Pixels the pair heatmap of ``k`` heads needs to label every row (at least ``least``)."""
    return max(least, PAIR_MARGIN["t"] + PAIR_MARGIN["b"] + PAIR_ROW_PX * k)


def pair_heatmap(heads, interaction, singles, metric_label: str, current=()) -> dict:
    """The pair interactions of k heads (SPEC: m({a,b}) - m({a}) - m({b})) as a symmetric k x k
    heatmap (diverging, 0 = additive; diagonal empty) with the single-head values m({a}) as a
    strip on its right margin. ``heads`` [(layer, head)] in the matrix's order; ``interaction``
    [k, k]; ``singles`` [k]; ``current``: the head set, outlined when it is one of the pairs.
    Cells carry customdata [a_layer, a_head, b_layer, b_head] (a strip cell: the head twice)."""
    k = len(heads)
    names = [f"L{l}H{h}" for l, h in heads]
    M = np.asarray(interaction, float).copy()
    np.fill_diagonal(M, np.nan)
    zmax = float(np.nanmax(np.abs(M))) if k > 1 and np.isfinite(M).any() else 1.0
    zmax = zmax or 1.0
    cd = [[[*heads[i], *heads[j]] for j in range(k)] for i in range(k)]
    z = [[None if np.isnan(v) else float(v) for v in row] for row in M]
    single = [float(v) for v in singles]
    data = [
        {"type": "heatmap", "x": names, "y": names, "z": z, "customdata": cd, "zmid": 0, "zmin": -zmax, "zmax": zmax,
         "colorscale": "RdBu", "reversescale": True, "xgap": 1, "ygap": 1, "name": "interaction",
         "colorbar": {"thickness": 8, "len": 1, "x": 0.92, "xanchor": "left", "xpad": 2, "tickfont": {"size": 9},
                      "title": {"text": "interaction", "side": "right", "font": {"size": 10}}},
         "hovertemplate": "%{y} + %{x}<br>interaction %{z:.4f}<extra></extra>"},
        {"type": "heatmap", "x": ["alone"], "y": names, "z": [[v] for v in single], "xaxis": "x2",
         "customdata": [[[*h, *h]] for h in heads], "colorscale": "Greys", "showscale": False, "name": "single",
         "text": [[f"{v:.3f}"] for v in single], "texttemplate": "%{text}", "textfont": {"size": 9}, "ygap": 1,
         "hovertemplate": f"%{{y}} alone<br>{metric_label} %{{z:.4f}}<extra></extra>"},
    ]
    shapes = []
    pair = sorted(tuple(h) for h in current)
    if len(pair) == 2 and all(tuple(p) in [tuple(h) for h in heads] for p in pair):
        i, j = (names.index(f"L{l}H{h}") for l, h in pair)
        for a, b in ((i, j), (j, i)):
            shapes.append({"type": "rect", "xref": "x", "yref": "y", "x0": a - 0.5, "x1": a + 0.5, "y0": b - 0.5,
                           "y1": b + 0.5, "line": {"color": SET_GREEN, "width": 3}})
    tick = {"size": 9 if k <= 10 else 8}
    # its own height (dcc.Graph then draws it at that height, not at the container's it had before)
    lay = layout(margin=dict(PAIR_MARGIN), shapes=shapes, height=pair_heatmap_height(k),
                 xaxis=axis(None, domain=[0, 0.8], tickangle=-45, tickfont=tick, showgrid=False, dtick=1),
                 xaxis2=axis(None, domain=[0.82, 0.9], anchor="y", tickfont=tick, showgrid=False),
                 yaxis=axis(None, autorange="reversed", tickfont=tick, showgrid=False, dtick=1),
                 title={"text": f"pair interaction of {metric_label} · right: the head alone", "font": {"size": 11},
                        "x": 0.01, "xanchor": "left", "y": 0.99})
    return {"data": data, "layout": lay}


# ---- C: attention strength -----------------------------------------------------------------
def _padded(value_range):
    lo, hi = value_range
    pad = 0.03 * (hi - lo)
    return [lo - pad, hi + pad]


def fold_title(text: str, room_px: float, font_px: float) -> str:
    """``text`` broken into lines (``<br>``) at spaces so that each line fits ``room_px`` (an axis
    title along a plot side that long), a character taken as 0.6 font sizes wide (a word longer than
    the room keeps its own line)."""
    per_line = max(int(room_px / (0.6 * font_px)), 1)
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= per_line:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines)


AXIS_TITLE_PX = 11  # C1's y title (folded to the plot's height: fold_title)


def property_overview(values, L: int, H: int, selected=None, title: str | None = None,
                      y_title: str = "strength entropy", y_range=(0, 1), height: int | None = None) -> dict:
    """C1: every head at x = layer (spread by head), y = a per-head property (default: the
    normalised strength entropy), coloured by layer, ``selected`` = (layer, head) ringed (a layout
    shape on the paper's y, so the y range is fixed: ``y_range`` padded or, None, the values' own).
    ``height``: the graph's height in px, to which the y title is folded (fold_title) so that it
    spans no more than the plot."""
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
    finite = ent[np.isfinite(ent)]
    if y_range:
        lo, hi = _padded(y_range)
    elif len(finite) and finite.max() > finite.min():
        pad = 0.08 * (finite.max() - finite.min())
        lo, hi = float(finite.min() - pad), float(finite.max() + pad)
    else:
        lo, hi = (float(finite[0]) - 0.5, float(finite[0]) + 0.5) if len(finite) else (0.0, 1.0)
    shapes = []
    if selected is not None and np.isfinite(ent[selected[0] * H + selected[1]]):
        i = selected[0] * H + selected[1]
        shapes.append(selected_ring_shape(float(x[i]), (float(ent[i]) - lo) / (hi - lo)))
    margin = {"l": 55, "r": 10, "t": 28 if title else 10, "b": 40}
    shown = y_title if height is None else fold_title(y_title, height - margin["t"] - margin["b"], AXIS_TITLE_PX)
    y_axis = axis(shown, range=[lo, hi])
    if "title" in y_axis:
        y_axis["title"]["font"] = {"size": AXIS_TITLE_PX}
    lay = layout(title, xaxis=axis("layer", tickmode="linear", dtick=1 if L <= 16 else 2, range=[-0.6, L - 0.4]),
                 yaxis=y_axis, margin=margin, shapes=shapes)
    return {"data": data, "layout": lay}


def vector_bars(values, title: str | None = None, y_title: str = "value", x_title: str = "entry k",
                hover: str = "k") -> dict:
    """C2: the selected head's vector metric [K] as bars (entry k on x, ``hover`` names it on hover)."""
    s = np.asarray(values, float)
    data = [{"type": "bar", "x": list(range(len(s))), "y": s.tolist(), "marker": {"color": MEAN_BLUE},
             "hovertemplate": f"{plotly_text(hover)} %{{x}}: %{{y:.4g}}<extra></extra>"}]
    lay = layout(title, xaxis=axis(x_title, tickmode="linear", dtick=1 if len(s) <= 16 else 2),
                 yaxis=axis(y_title, exponentformat="power"),
                 margin={"l": 60, "r": 10, "t": 28 if title else 10, "b": 40}, bargap=0.15)
    return {"data": data, "layout": lay}


# C2's x axis (title, hover name) of a vector metric; any other vector metric gets ("entry k", "k")
VECTOR_INDEX = {"strength": ("hop distance k (patches)", "hop")}


def strength_bars(strength, title: str | None = None) -> dict:
    """C2: the selected head's k-hop strength vector."""
    return vector_bars(strength, title, "attention / patch", *VECTOR_INDEX["strength"])


def distribution(values, current=None, bins: int = 30, title: str | None = None,
                 x_title: str = "strength entropy", x_range=(0, 1), subset=None, subset_label: str = "selected set") -> dict:
    """C3: distribution (area, share of images per bin) of one head's property over all images
    (default: strength entropy in [0, 1]; x_range None: the values' range), a second area over the
    ``subset`` (positions of a selected set, named ``subset_label``) when given, and a line at the
    selected image's value."""
    v_all = np.asarray(values, float)
    if x_range is None:
        v = v_all[~np.isnan(v_all)]
        lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
        x_range = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    data = []
    parts = [("all images", v_all, MEAN_BLUE, "rgba(0,114,178,0.25)")]
    if subset is not None and len(subset):
        parts.append((f"{plotly_text(subset_label)} ({len(subset)})", v_all[np.asarray(subset, int)], ACCENT, "rgba(213,94,0,0.25)"))
    for name, v, colour, fill in parts:
        v = v[~np.isnan(v)]
        hist, edges = np.histogram(v, bins=bins, range=tuple(x_range))
        share = hist / max(len(v), 1)
        centres = (edges[:-1] + edges[1:]) / 2
        data.append({"type": "scatter", "x": centres.tolist(), "y": share.tolist(), "mode": "lines", "fill": "tozeroy",
                     "line": {"color": colour, "shape": "spline", "smoothing": 0.6}, "fillcolor": fill, "name": name,
                     "hovertemplate": "%{x:.3g}: %{y:.1%} of %{fullData.name}<extra></extra>"})
    shapes = []
    if current is not None and not np.isnan(current):
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": current, "x1": current, "y0": 0, "y1": 1,
                       "line": {"color": ACCENT, "width": 2}})
    lay = layout(title, shapes=shapes, xaxis=axis(x_title, range=list(x_range)), showlegend=len(data) > 1,
                 legend={"x": 1, "xanchor": "right", "y": 1, "font": {"size": 10}, "bgcolor": "rgba(255,255,255,0.7)"},
                 yaxis=axis("share of images", tickformat=".0%"), margin={"l": 55, "r": 10, "t": 28 if title else 10, "b": 40})
    return {"data": data, "layout": lay}


# ---- D: attention pattern ------------------------------------------------------------------
D1_STYLES = {"points": "points", "both": "points + contours", "contours": "contours"}


# D1's colours for the basic patterns (SPEC "Attention pattern labels"): diagonal:* share one colour
PATTERN_COLOURS = {"diagonal": "#0072B2", "horizontal": "#E69F00", "vertical": "#009E73", "block": "#CC79A7",
                   "mixed": "#BBBBBB"}


def pattern_family(label: str) -> str:
    """'diagonal:above' -> 'diagonal'; the other labels are their own family ('' -> 'mixed')."""
    return (label or "mixed").split(":")[0]


def category_colours(families, fixed: dict | None = None) -> dict[str, str]:
    """family -> colour of D1's category colouring, in legend order: ``fixed`` (a metric's own colours,
    CATEGORY_COLOURS; other families become "mixed"), else the Okabe-Ito / Safe palette over the sorted
    families; "mixed" (the missing label) grey, last."""
    if fixed is not None:
        return dict(fixed)
    found = sorted(set(families) - {"mixed"})
    palette = OKABE_ITO if len(found) <= len(OKABE_ITO) else SAFE
    return {**{f: palette[i % len(palette)] for i, f in enumerate(found)}, "mixed": PATTERN_COLOURS["mixed"]}


# a category metric's own colours for D1 (any other category metric gets palette colours)
CATEGORY_COLOURS = {"pattern": PATTERN_COLOURS}


def background_groups(xy: np.ndarray, H: int, patterns=None, label: str = "pattern",
                      colours: dict | None = None) -> list[tuple[str, str, np.ndarray]]:
    """D1's point groups: (name, colour, flat indices into ``xy.reshape(-1, 2)``) per layer (cividis),
    or per label family given ``patterns`` (str [n, L*H], a category metric's labels named ``label``;
    'a:b' is of family 'a', '' = "mixed"; colours from ``category_colours(families, colours)``), of
    the heads that have a position. One trace of one colour per group: a per-point colour makes
    plotly convert 10^5 colours on each redraw."""
    n, LH, _ = xy.shape
    ok = ~np.isnan(xy.reshape(-1, 2)).any(1)
    if patterns is None:
        L = LH // H
        layer = (np.arange(n * LH) % LH) // H
        colours = pc.sample_colorscale(LAYER_SCALE, [l / max(L - 1, 1) for l in range(L)])
        return [(f"layer {l}", colours[l], np.flatnonzero(ok & (layer == l))) for l in range(L)]
    families = np.array([pattern_family(v) for v in np.asarray(patterns, dtype=object).reshape(-1)], dtype=object)
    palette = category_colours(families, colours)
    families = np.array([f if f in palette else "mixed" for f in families], dtype=object)
    groups = [(f"{label}: {plotly_text(f)}", c, np.flatnonzero(ok & (families == f))) for f, c in palette.items()]
    return [g for g in groups if len(g[2])]


DENSITY_BINS = 60  # per axis, of D1's density contours


def density_contours(points: np.ndarray, lines: bool = True, bins: int = DENSITY_BINS) -> dict:
    """D1's density of ``points`` [m, 2] as contours of their 2-D histogram (``bins`` x ``bins`` over
    the points' range, counts per bin; z[row = y bin, column = x bin] at the bins' centres), counted
    here: the browser draws a 60 x 60 grid instead of binning 10^5 points itself."""
    if len(points):
        counts, xe, ye = np.histogram2d(points[:, 0], points[:, 1], bins=bins)
    else:
        counts, xe, ye = np.zeros((bins, bins)), np.linspace(0, 1, bins + 1), np.linspace(0, 1, bins + 1)
    return {"type": "contour", "x": typed((xe[:-1] + xe[1:]) / 2), "y": typed((ye[:-1] + ye[1:]) / 2),
            "z": typed(counts.T, "i4"), "ncontours": 14, "showscale": False, "hoverinfo": "skip",
            "colorscale": [[0, "rgba(255,255,255,0)"], [0.05, "#f3f3f3"], [1, "#6b6b6b"]],
            "contours": {"coloring": "fill", "showlines": lines},
            "line": {"width": 0.5, "color": "#999", "smoothing": 1.3}, "name": "density"}


def pattern_density(xy: np.ndarray, lines: bool = True) -> dict:
    """D1's density (``density_contours``) of the heads ``xy`` [n, L*H, 2] that have a position."""
    flat = xy.reshape(-1, 2)
    return density_contours(flat[~np.isnan(flat).any(1)], lines)


def pattern_background(xy: np.ndarray, style: str, H: int, image_ids=None, patterns=None, label: str = "pattern",
                       colours: dict | None = PATTERN_COLOURS) -> list[dict]:
    """D1's context layer (independent of the selection), as in the paper's Fig. 12:
    ``xy`` [n, L*H, 2]. "points": every head of every image, one scattergl trace per layer (cividis,
    with the layer colour bar) or, given ``patterns`` (str [n, L*H], the labels of a category metric
    named ``label``: the registry's ``pattern`` by default), per label family (``colours``:
    PATTERN_COLOURS by default, None = palette colours; a legend entry each, the full label on hover), in
    ``background_groups`` order; customdata [image id, layer, head] for hover and click (a plain
    list, no smaller as a typed array, and Dash's clickData keeps only a list's).
    "contours": the density of all of them (``pattern_density``). "points + contours" draws the
    density under the points in the selection layer (``pattern_overlay``): toggling it redraws no point."""
    n, LH, _ = xy.shape
    flat = xy.reshape(-1, 2)
    L = LH // H
    out = []
    if style == "contours":
        out.append(pattern_density(xy))
    if style == "points":
        ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
        labels = None if patterns is None else np.asarray(patterns, dtype=object).reshape(-1)
        hover = "image %{customdata[0]} · layer %{customdata[1]} head %{customdata[2]}" + ("" if labels is None else " · %{text}")
        for name, colour, idx in background_groups(xy, H, patterns, plotly_text(label), colours):
            cd = np.stack([ids[idx // LH], (idx % LH) // H, idx % H], 1)
            trace = {"type": "scattergl", "mode": "markers", "x": typed(flat[idx, 0]), "y": typed(flat[idx, 1]),
                     "customdata": cd.tolist(), "name": name, "showlegend": False,
                     "marker": {"size": 3, "color": colour, "opacity": 0.55 if labels is None else 0.6},
                     "hovertemplate": hover + "<extra>click: select this head of this image</extra>"}
            if labels is not None:
                trace.update(text=[plotly_text(v or "mixed") for v in labels[idx]], showlegend=True,
                             legendgroup="patterns")
            out.append(trace)
    if patterns is None or style == "contours":  # the layer colour bar, on a point-less trace
        out.append({"type": "scatter", "mode": "markers", "x": [None], "y": [None], "hoverinfo": "skip",
                    "showlegend": False, "name": "layer",
                    "marker": {"color": [0], "colorscale": LAYER_SCALE, "cmin": 0, "cmax": max(L - 1, 1),
                               "showscale": True, "colorbar": {"title": {"text": "layer"}, "thickness": 10, "len": 0.9}}})
    return out


# D1's selected head over more images than this is drawn with WebGL: SVG costs ~35 ms per 1,000 points
# at every head click (the 1000-image run), WebGL ~3 ms once its context exists
OVERLAY_GL_POINTS = 500


def pattern_overlay(xy_image, L: int, H: int, selected=None, head_all_images=None, head_label=None,
                    density: dict | None = None) -> list[dict]:
    """D1's selection layer, drawn by assets/overlay.js as a plot of its own over the background
    (which then never redraws for a selection): the selected head over all images or the selected
    set (orange), the selected image's heads emphasised (large, coloured by layer, black outline) and
    a ring around the selected head. The head's points, the image's and the ring are plots of their
    own (``meta.layer``): a new image does not redraw the head's points, a new head of the same image
    not the image's. It takes no mouse events: hover
    and clicks reach the background points beneath (customdata [image id, layer, head]).
    ``density`` (``pattern_density``, without lines: "points + contours") is drawn under the
    background (``meta.under``), whose points then never redraw when it comes or goes."""
    data = [] if density is None else [dict(density, meta={"layer": "density", "under": True})]
    if head_all_images is not None:
        data.append({"type": "scattergl" if len(head_all_images) > OVERLAY_GL_POINTS else "scatter", "mode": "markers",
                     "x": typed(head_all_images[:, 0]), "y": typed(head_all_images[:, 1]),
                     "name": head_label or "selected head, all images", "meta": {"layer": "head"},
                     "marker": {"size": 6, "color": "rgba(213,94,0,0.45)", "line": {"width": 0}}})
    if xy_image is not None:
        idx = np.arange(L * H)
        data.append({"type": "scatter", "mode": "markers", "x": xy_image[:, 0].tolist(), "y": xy_image[:, 1].tolist(),
                     "name": "heads of the image", "meta": {"layer": "image"},
                     "marker": {"color": (idx // H).tolist(), "colorscale": LAYER_SCALE,
                                "cmin": 0, "cmax": max(L - 1, 1), "size": 10, "line": {"width": 1.2, "color": "#111"}}})
        if selected is not None:
            i = selected[0] * H + selected[1]
            data.append(dict(selected_ring(float(xy_image[i, 0]), float(xy_image[i, 1])), meta={"layer": "ring"}))
    return [dict(t, showlegend=False, hoverinfo="skip") for t in data]


def pattern_layout(background: list[dict], kind: str, uirevision=None) -> dict:
    """D1's background figure (cached per run/kind/style/colouring); the selection is drawn over it
    by assets/overlay.js (``pattern_overlay``), the density under it: a transparent background."""
    title = "CLS attention vectors" if kind == "cls" else "patch attention latents"
    lay = layout(None, paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)",
                 xaxis=axis(None, showticklabels=False, showgrid=False, showline=False, ticks=""),
                 yaxis=axis(None, showticklabels=False, showgrid=False, showline=False, ticks=""), uirevision=uirevision,
                 margin={"l": 6, "r": 6, "t": 6, "b": 6}, hoverdistance=6,
                 annotations=[{"text": f"2-D layout of {title}", "xref": "paper", "yref": "paper", "x": 0, "y": 1,
                               "xanchor": "left", "yanchor": "top", "showarrow": False, "font": {"size": 10, "color": "#666"}}])
    if any(t.get("legendgroup") == "patterns" for t in background):  # coloured by pattern: its legend only
        lay.update(showlegend=True, legend={"orientation": "h", "y": 0, "yanchor": "top", "font": {"size": 10},
                                            "itemsizing": "constant"})
    return {"data": background, "layout": lay}


def _scale_stops(scale: list[str]) -> list[list]:
    return [[i / (len(scale) - 1), c] for i, c in enumerate(scale)]


def _colorbar_trace(scale, vmax: float, title: str, x: float) -> dict:
    """An invisible trace that only draws a colour bar [0, vmax]."""
    return {"type": "scatter", "mode": "markers", "x": [None], "y": [None], "hoverinfo": "skip", "showlegend": False,
            "marker": {"color": [0], "cmin": 0, "cmax": vmax, "colorscale": _scale_stops(scale), "showscale": True,
                       "colorbar": {"title": {"text": title, "side": "right", "font": {"size": 10}}, "thickness": 8,
                                    "x": x, "len": 1, "tickfont": {"size": 9}, "tickformat": ".2~g"}}}


def two_axis(A: np.ndarray, T: int, threshold: float, grid, vmax: float | None = None, max_segments: int = 2000,
             n_levels: int = 6):
    """D3: source tokens on a top axis, target tokens on a bottom axis. Every CLS-related pair
    (source or target a prefix token) is always drawn in blues; patch->patch pairs with a value
    >= ``threshold`` in oranges, at most ``max_segments`` of them (the strongest). Colour = the value
    on one scale [0, ``vmax``] shared by the heads compared (default: this matrix's max), in
    ``n_levels`` steps, with a colour bar per family.
    Returns (figure, patch segments drawn, patch values >= threshold, CLS segments drawn)."""
    N = A.shape[0]
    vmax = float(A.max()) if vmax is None else float(vmax)
    vmax = max(vmax, 1e-12)
    src, dst = np.nonzero(A >= threshold)
    patch = (src >= T) & (dst >= T)
    src, dst = src[patch], dst[patch]
    vals = A[src, dst]
    above = len(vals)
    if above > max_segments:
        keep = np.argsort(-vals, kind="stable")[:max_segments]
        src, dst, vals = src[keep], dst[keep], vals[keep]
    cs, cd_ = np.nonzero(np.zeros_like(A, bool) | (np.arange(N)[:, None] < T) | (np.arange(N)[None, :] < T))
    data = []
    for family, s, d, v, scale in (("CLS-related", cs, cd_, A[cs, cd_], BLUES), ("patch→patch", src, dst, vals, ORANGES)):
        levels = np.minimum((v / vmax * n_levels).astype(int), n_levels - 1)
        colours = pc.sample_colorscale(_scale_stops(scale), [(lev + 0.5) / n_levels for lev in range(n_levels)])
        for lev in range(n_levels):
            sel = levels == lev
            if not sel.any():
                continue
            k = int(sel.sum())
            xs = np.empty(3 * k)
            ys = np.empty(3 * k)
            xs[0::3], xs[1::3], xs[2::3] = s[sel], d[sel], np.nan
            ys[0::3], ys[1::3], ys[2::3] = 1, 0, np.nan
            data.append({"type": "scatter", "mode": "lines", "x": typed(xs), "y": typed(ys), "hoverinfo": "skip",
                         "line": {"color": colours[lev], "width": 0.8 + 0.5 * lev}, "name": f"{family} {lev}",
                         "meta": {"segments": k, "family": family, "level": lev}, "connectgaps": False})
    data.append(_colorbar_trace(BLUES, vmax, "CLS", 1.01))
    data.append(_colorbar_trace(ORANGES, vmax, "patch", 1.09))
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
                 margin={"l": 55, "r": 70, "t": 6, "b": 26}, hoverdistance=8)
    return {"data": data, "layout": lay}, len(vals), above, len(cs)


def threshold_colorscale(scale: list[str], threshold: float, vmax: float) -> list[list]:
    """``scale`` spread over [threshold, vmax] of a [0, vmax] axis, white below ``threshold``
    (D4's patch cells: a new threshold only patches this colour scale)."""
    f = min(max(threshold / max(vmax, 1e-12), 0.0), 1.0)
    if f <= 0:
        return _scale_stops(scale)
    if f >= 1:
        return [[0, "#ffffff"], [1, "#ffffff"]]
    return [[0, "#ffffff"], [f, "#ffffff"]] + [[f + (1 - f) * i / (len(scale) - 1), c] for i, c in enumerate(scale)]


def attention_heatmap(A: np.ndarray, T: int, threshold: float, vmax: float | None = None) -> dict:
    """D4: the attention matrix (row = source, column = target), both families on one value scale
    [0, ``vmax``] shared by the heads compared (default: this matrix's max). The prefix rows and
    columns (drawn wider) are always shown, in blues; patch->patch cells in oranges, white below
    ``threshold`` (``threshold_colorscale``: a new threshold only patches data[1].colorscale)."""
    N = A.shape[0]
    P = N - T
    vmax = float(A.max()) if vmax is None else float(vmax)
    vmax = max(vmax, 1e-12)
    wide = max(2, P // 16)
    widths = np.array([wide] * T + [1] * P, float)
    edges = np.concatenate([[0], np.cumsum(widths)])
    z = np.asarray(A, np.float32)
    cls_part = z.copy()
    cls_part[T:, T:] = np.nan
    patch_part = z.copy()
    patch_part[:T, :] = np.nan
    patch_part[:, :T] = np.nan
    data = []
    # colour bars side by side right of the square, spaced for the Explorer's 350 px D4 column (headscope.css)
    for name, zz, scale, x_bar in (("CLS-related", cls_part, BLUES, 1.0), ("patch→patch", patch_part, ORANGES, 1.24)):
        cs = threshold_colorscale(scale, threshold, vmax) if scale is ORANGES else _scale_stops(scale)
        data.append({"type": "heatmap", "x": typed(edges), "y": typed(edges), "z": typed(zz), "name": name,
                     "colorscale": cs, "zmin": 0, "zmax": vmax, "hoverongaps": False,
                     "colorbar": {"title": {"text": name.split("→")[0].split("-")[0], "side": "right"},
                                  "thickness": 8, "x": x_bar, "len": 0.8, "tickfont": {"size": 9},
                                  "tickformat": ".2~g"},
                     "hovertemplate": "source %{y:.0f}, target %{x:.0f}: %{z:.4f}<extra>" + name + "</extra>"})
    centres = (edges[:-1] + edges[1:]) / 2
    gw = max(1, int(round(P ** 0.5)))
    step = gw * max(1, round(P / gw / 6))
    tick_tokens = [0] + list(range(T + step, N, step))
    ticks = dict(tickvals=[float(centres[t]) for t in tick_tokens], tickangle=0,
                 ticktext=["CLS" if t == 0 else str(t) for t in tick_tokens], showgrid=False, tickfont={"size": 9})
    lay = layout(None, xaxis=axis("target token", range=[0, edges[-1]], **ticks, side="top", constrain="domain",
                                 constraintoward="left"),
                 yaxis=axis("source token", range=[edges[-1], 0], **ticks, scaleanchor="x"),
                 margin={"l": 50, "r": 100, "t": 40, "b": 6})
    return {"data": data, "layout": lay}


def histogram_bins(v: np.ndarray, bins: int, binning: str) -> np.ndarray:
    """Bin edges of attention values ``v``: "log" = log-spaced from the smallest positive value to
    the max (resolves the many small values); "linear" = equal width on [0, max]."""
    hi = max(float(v.max()), 1e-12)
    if binning == "log":
        pos = v[v > 0]
        lo = float(pos.min()) if len(pos) else hi / 1e6
        lo = min(lo, hi / 10)
        return np.geomspace(lo, hi, bins + 1)
    return np.linspace(0.0, hi, bins + 1)


D5_FILL = 0.78  # the fraction of D5's height the tallest bar reaches


def attention_histogram(A: np.ndarray, threshold: float, label: str, bins: int = 40, binning: str = "log") -> dict:
    """D5: histogram of the head's N*N attention values, log-scaled counts, with a draggable
    threshold line (an editable shape: dragging it sends relayoutData ``shapes[0].x0``).
    "log" binning: x is log10(value) on a linear axis labelled in values (the shape's x is log10 of
    the threshold; exact zeros, e.g. float16 underflow, are counted in the first bin);
    "linear": x = value on [0, max]. Clicking a bar sets the threshold at its left edge (customdata)."""
    v = np.asarray(A, float).ravel()
    edges = histogram_bins(v, bins, binning)
    hist, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    to_x = (lambda e: np.log10(e)) if binning == "log" else (lambda e: np.asarray(e, float))
    xe = to_x(edges)
    centres = (xe[:-1] + xe[1:]) / 2
    colours = [ACCENT if e >= threshold else "#9ab7d3" for e in edges[1:]]
    data = [{"type": "bar", "x": centres.tolist(), "y": [int(h) if h else None for h in hist],
             "customdata": np.stack([edges[:-1], edges[1:]], 1).tolist(),
             "width": np.diff(xe).tolist(), "marker": {"color": colours, "line": {"width": 0}},
             "hovertemplate": "%{customdata[0]:.3g} – %{customdata[1]:.3g}: %{y} values<extra>click: threshold here</extra>"}]
    tx = float(to_x(max(threshold, edges[0])))
    shapes = [{"type": "line", "xref": "x", "yref": "paper", "x0": tx, "x1": tx, "y0": 0, "y1": 1,
               "editable": True, "line": {"color": "#222", "width": 3}, "name": "threshold"}]
    ann = [{"x": tx, "y": 0.98, "xref": "x", "yref": "paper", "text": f"{label} ", "showarrow": False,
            "xanchor": "right", "yanchor": "top", "font": {"size": 11}, "bgcolor": "rgba(255,255,255,0.8)"}]
    if binning == "log":
        decades = np.arange(np.floor(xe[0]), np.ceil(xe[-1]) + 1)
        xaxis = axis("attention value (log bins; drag the line)", range=[float(xe[0]), float(xe[-1])],
                     tickvals=decades.tolist(), ticktext=[f"1e{int(d)}" for d in decades])
    else:
        xaxis = axis("attention value (drag the line)", range=[0.0, float(xe[-1])])
    # log counts from 0.8 (a bar of 1 shows) up; the top ~fifth stays clear of the plot toolbar,
    # which covers the top right corner while the pointer is over the plot
    lo, top = math.log10(0.8), math.log10(max(int(hist.max()), 1))
    lay = layout(None, shapes=shapes, annotations=ann, bargap=0, xaxis=xaxis,
                 yaxis=axis("count", type="log", dtick=1, range=[lo, lo + (top - lo) / D5_FILL]),
                 margin={"l": 55, "r": 10, "t": 6, "b": 40},
                 meta={"binning": binning})
    return {"data": data, "layout": lay}


def threshold_from_shape_x(x: float, binning: str) -> float:
    """D5's dragged line position (relayoutData) -> an attention value."""
    return float(10 ** x) if binning == "log" else max(float(x), 0.0)


# ---- D2: image masks -----------------------------------------------------------------------
MASK_SCALE = ORANGES


def mask_colours(f: np.ndarray) -> np.ndarray:
    """RGB [.., 3] in 0-255 for fractions ``f`` in [0, 1] of the shared scale (D2's overlay)."""
    stops = np.array([pc.hex_to_rgb(c) if c.startswith("#") else pc.unlabel_rgb(c) for c in MASK_SCALE], float)
    pos = np.clip(f, 0, 1) * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    t = (pos - i)[..., None]
    return stops[i] * (1 - t) + stops[i + 1] * t


def mask_gradient_css() -> str:
    """CSS linear-gradient of D2's colour scale, for its HTML colour bar."""
    return "linear-gradient(to right, transparent, " + ", ".join(MASK_SCALE) + ")"


def masked_image(image, weights=None, grid=None, highlight=None, size: int = 160, vmax: float | None = None) -> str:
    """The image (PIL) as a JPEG data URI. With ``weights`` [gh*gw] the attention is laid over a
    greyed image as colour (MASK_SCALE) and opacity, both linear in ``weights / vmax`` (one scale
    for all masks compared; default: the mask's own max); ``highlight`` = patch index outlined."""
    from PIL import Image, ImageDraw

    im = image.convert("RGB").resize((size, size), Image.BILINEAR)
    if weights is not None:
        gh, gw = grid
        w = np.asarray(weights, float).reshape(gh, gw)
        top = float(w.max()) if vmax is None else float(vmax)
        f = np.clip(w / top, 0, 1) if top > 0 else np.zeros_like(w)
        fm = np.asarray(Image.fromarray((f * 255).astype(np.uint8), "L").resize((size, size), Image.BILINEAR), float) / 255
        grey = np.asarray(im.convert("L"), float)[..., None] * 0.55 + 255 * 0.3
        alpha = (0.85 * fm)[..., None]
        arr = grey * (1 - alpha) + mask_colours(fm) * alpha
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if highlight is not None and grid is not None:
        gh, gw = grid
        r, c = divmod(int(highlight), gw)
        ch, cw = size / gh, size / gw
        ImageDraw.Draw(im).rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=(0, 114, 178), width=2)
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
    # the legend in a column right of the plot: plotly widens the right margin for it, so it never
    # covers a curve (a row above the plot wraps into it when the panel is narrow)
    lay = layout(None, shapes=shapes, showlegend=True,
                 legend={"orientation": "v", "x": 1.02, "xanchor": "left", "y": 1, "yanchor": "top",
                         "font": {"size": 10}},
                 xaxis=axis("patches removed (top n of the map)"), yaxis=axis(metric_title),
                 margin={"l": 55, "r": 10, "t": 10, "b": 40})
    return {"data": data, "layout": lay}


def pattern_example(E, grid, scores: dict, title: str) -> dict:
    """Help's drawing of one basic pattern (the paper's Fig. 13 style): a binarised patch matrix
    ``E`` (bool [P, P], row = source patch, column = target) on a ``grid`` as a heatmap, titled with
    ``title`` and the label and scores analysis.pattern_scores gives it."""
    E = np.asarray(E, bool)
    P = E.shape[0]
    subtitle = f"label {scores['pattern']} · " + " · ".join(f"{k} {scores[k]:.2f}" for k in
                                                             ("diagonal", "horizontal", "vertical", "block"))
    data = [{"type": "heatmap", "z": E.astype(int).tolist(), "x": list(range(P)), "y": list(range(P)),
             "colorscale": [[0, "#ffffff"], [1, ORANGES[-1]]], "showscale": False, "xgap": 1, "ygap": 1,
             "hovertemplate": "source patch %{y} → target patch %{x}: %{z}<extra></extra>"}]
    lay = layout(f"{title}<br><span style='font-size:10px'>{subtitle}</span>",
                 margin={"l": 40, "r": 10, "t": 48, "b": 36},
                 xaxis=axis(f"target patch ({grid[0]}×{grid[1]} grid)", constrain="domain"),
                 yaxis=axis("source patch", autorange="reversed", scaleanchor="x"))
    return {"data": data, "layout": lay}
