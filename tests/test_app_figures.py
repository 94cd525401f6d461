"""Unit tests of the dashboard's figure builders, run index and URL parsing (no browser)."""
import json
import sys

import numpy as np
import pytest
from plotly.io.json import to_json_plotly

from analysis.metrics import registry
from analysis.runs.reader import open_run
from analysis.runs.schema import IMAGE_COLUMNS, head_columns, summary_columns
from analysis.runs.tables import write_table
from app import config, data, figures as F
from app.state import parse_selection
from conftest import make_synthetic_run as make_run

L, H = 4, 3


def roundtrip(fig):
    """Figures must serialise the way Dash sends them."""
    return json.loads(to_json_plotly(fig))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_run(root / "syn", n_images=24, layers=L, heads=H, grid=5, n_classes=4, seed=1)
    return root



@pytest.fixture
def index(cache):
    config.configure(cache, "syn")
    return data.get_index("syn")


def test_synthetic_run_is_schema_valid(cache):

    run = open_run(cache / "syn")
    assert len(run.images) == 24 and len(run.head_metrics) == 24 * L * H
    assert set(IMAGE_COLUMNS) <= set(run.images.columns)
    assert set(head_columns()) <= set(run.head_metrics.columns)
    # every registered metric of a classifier, but consistency: it needs the build's patch bits, which a
    # synthetic run has not
    assert run.metrics == [m.name for m in registry.metrics()
                           if m.name != "consistency" and "classifier" in m.applies_to]
    assert run.manifest["metrics"] == run.metrics
    assert (cache / "syn" / "thumbs" / "0.png").is_file()
    ent = run.head_metrics.strength_entropy
    assert ent.between(0, 1).all() and len(run.head_metrics.strength.iloc[0]) == 5
    assert list(run.head_summary.columns) == list(summary_columns())  # the build's writer


def test_index_arrays(index, cache):

    hm = open_run(cache / "syn").head_metrics
    assert index.L == L and index.H == H and index.n == 24
    assert index.values("jsd").shape == (24, L * H)
    row = hm[(hm.image_id == 5) & (hm.layer == 2) & (hm["head"] == 1)].iloc[0]
    assert index.values("jsd")[index.pos(5), 2 * H + 1] == pytest.approx(row.jsd)
    assert index.values("strength").shape == (24, L * H, 5)
    mean, std = index.summary("prob")
    assert np.allclose(mean, hm.groupby(["layer", "head"]).prob.mean().to_numpy(), atol=1e-6)
    assert np.allclose(std, hm.groupby(["layer", "head"]).prob.std(ddof=0).to_numpy(), atol=1e-6)
    assert index.pos(999) is None and index.head_index(L, 0) is None and index.head_index(1, 2) == 1 * H + 2
    assert data.get_index("syn") is index  # built once


def test_index_reports_missing_columns(tmp_path):
    import pandas as pd


    run = make_run(tmp_path / "gaps", n_images=6, layers=2, heads=2, grid=3, n_classes=2)
    hm = pd.read_parquet(run / "head_metrics.parquet")
    hm[["patch_x", "patch_y", "prob", "prob_drop", "jsd"]] = np.nan
    write_table(run / "head_metrics.parquet", hm, head_columns())
    index = data.build_index(open_run(run))
    assert "patch" in index.missing and "cls" not in index.missing
    assert index.importance == [m.name for m in registry.metrics("image_head", importance=True)
                                if m.name not in ("prob", "prob_drop", "jsd") and "classifier" in m.applies_to]


def test_bad_run_names_are_refused(cache):
    config.configure(cache, None)
    from analysis.errors import CacheError

    with pytest.raises(CacheError):
        data.get_index("../etc")
    with pytest.raises(CacheError, match="manifest.json missing"):
        data.get_index("nope")


def test_parse_selection():
    from app.state import STATE_KEYS, selection_query

    blank = dict.fromkeys(STATE_KEYS)
    assert parse_selection("?run=a&image=3&layer=1&head=2", "d") == {**blank, "run": "a", "image": 3, "layer": 1, "head": 2}
    assert parse_selection("", "d") == {**blank, "run": "d"}
    assert parse_selection("?run=../x&image=oops&metric=<b>&set=1,x", "d") == {**blank, "run": "d", "set": [1]}
    # the whole view state round-trips through the URL, canonically
    state = {**blank, "run": "a", "image": 3, "layer": 1, "head": 2, "mode": 4, "metric": "jsd", "thr": "a0.05",
             "d1": "patch", "d1s": "both", "color": "correct", "scale": "image", "bins": "linear", "set": [2, 5, 9]}
    q = selection_query(state)
    assert q == ("?run=a&image=3&layer=1&head=2&mode=4&metric=jsd&thr=a0.05&d1=patch&d1s=both&color=correct"
                 "&scale=image&bins=linear&set=2,5,9")
    assert parse_selection(q, "d") == state
    assert selection_query(parse_selection("?head=2&run=a&set=9,2,2", "d")) == "?run=a&head=2&set=2,9"
    assert selection_query({}) == ""


def test_threshold_parsing():
    from app.state import parse_threshold

    assert parse_threshold(None) == ("q", 0.01) and parse_threshold("q10") == ("q", pytest.approx(0.1))
    assert parse_threshold("a0.05") == ("a", 0.05)
    assert parse_threshold("a7") == ("q", 0.01) and parse_threshold("zz") == ("q", 0.01)


def test_typed_roundtrip():
    a = np.random.rand(3, 4).astype(np.float32)
    assert np.array_equal(F.untyped(F.typed(a)), a)
    assert F.typed(a)["shape"] == "3,4"


def test_image_overview_one_trace_per_class_and_ring():
    x, y = np.arange(6.0), np.arange(6.0)
    fig = roundtrip(F.image_overview(x, y, [0, 1, 0, 2, 1, -1], np.arange(10, 16), ["a", "b", "c"]))
    names = [t["name"] for t in fig["data"]]
    assert names == ["unknown", "a", "b", "c"]
    assert fig["data"][1]["customdata"] == [10, 12]
    # the selection layer: the set's outline, the ring around the selected image; no hover, no legend
    layer = roundtrip({"data": F.overview_selection(x, y, 3, [1, 4])})["data"]
    assert [t["name"] for t in layer] == ["selected set", "selected image"]
    assert layer[0]["x"] == [1.0, 4.0] and layer[1]["x"] == [3.0]
    assert all(t["hoverinfo"] == "skip" and t["showlegend"] is False for t in layer)
    assert F.overview_selection(x, y) == []
    # the legend is HTML (never squeezes the plot): plotly's is off, the items travel in layout.meta
    assert fig["layout"]["showlegend"] is False
    assert [n for n, _, _ in F.legend_items(fig)] == ["unknown", "a", "b", "c"]


def test_image_overview_colour_modes():
    x, y, ids = np.arange(5.0), np.arange(5.0), np.arange(100, 105)
    labels = [0, 1, 0, 1, 1]
    fig = roundtrip(F.image_overview(x, y, labels, ids, ["a", "b"], color_by="prob",
                                     values=np.array([0.1, 0.9, 0.5, np.nan, 0.3]), value_label="P(true label)"))
    (pts,) = fig["data"]
    assert pts["customdata"] == [100, 101, 102, 103, 104] and pts["marker"]["cmin"] == 0 and pts["marker"]["cmax"] == 1
    assert pts["marker"]["colorbar"]["orientation"] == "h" and F.legend_items(fig) == []
    fig = roundtrip(F.image_overview(x, y, labels, ids, ["a", "b"], color_by="head", values=np.array([2.0, 4, 3, 5, 1])))
    assert (fig["data"][0]["marker"]["cmin"], fig["data"][0]["marker"]["cmax"]) == (1, 5)
    fig = roundtrip(F.image_overview(x, y, labels, ids, ["a", "b"], color_by="correct",
                                     correct=np.array([True, False, True, True, False])))
    assert [t["name"] for t in fig["data"]] == ["correct (3)", "wrong (2)"]
    assert fig["data"][1]["customdata"] == [101, 104]


def test_class_colours_are_distinct_up_to_many_classes():
    styles = F.class_style(30)
    assert len(set(styles)) == 30
    assert F.class_style(5)[0][0] == F.OKABE_ITO[0]


def test_head_importance_band_and_selected_curve():
    mean, std = np.linspace(0, 1, L * H), np.full(L * H, 0.1)
    fig = roundtrip(F.head_importance(L, H, "P(true)", mean, std))
    assert len(fig["data"]) == 3 and fig["data"][2]["mode"] == "lines+markers"
    assert fig["data"][0]["y"][0] == pytest.approx(0.1) and fig["data"][1]["fill"] == "tonexty"
    fig = roundtrip(F.head_importance(L, H, "P(true)", mean, std, image_values=mean * 2, selected=(1, 2)))
    assert len(fig["data"]) == 4 and fig["data"][3]["y"][-1] == pytest.approx(2)
    assert [t["mode"] for t in fig["data"][2:]] == ["lines", "lines+markers"]  # the mean fades to a line
    assert fig["data"][2]["customdata"][5] == [1, 2]
    boundaries = [s for s in fig["layout"]["shapes"] if s["type"] == "line" and s.get("line", {}).get("dash") is None]
    assert sorted(s["x0"] for s in boundaries) == [H - 0.5, 2 * H - 0.5, 3 * H - 0.5]
    assert any(s.get("line", {}).get("dash") == "dot" and s["x0"] == 1 * H + 2 for s in fig["layout"]["shapes"])
    assert fig["layout"]["xaxis"]["ticktext"] == ["L0", "L1", "L2", "L3"]
    # the band is clipped to the metric's range (a probability stays in [0, 1])
    fig = roundtrip(F.head_importance(L, H, "P(true)", mean, np.full(L * H, 0.3), value_range=(0, 1),
                                      band_label="mean over the set (3)"))
    upper, lower = np.array(fig["data"][0]["y"]), np.array(fig["data"][1]["y"])
    assert upper.max() == pytest.approx(1) and lower.min() == pytest.approx(0)
    assert upper[0] == pytest.approx(0.3) and lower[-1] == pytest.approx(0.7)
    assert fig["data"][2]["name"] == "mean over the set (3)"


def test_pruning_modes_and_top5():
    fig = roundtrip(F.pruning_modes(["none", "R1+R2+R3"] + ["x"] * 6, [0.9, 0.2, None, 0.8, 0.5, 0.3, 0.7, 0.1],
                                    "P(true)", selected_mode=3, reference=0.9))
    bars = fig["data"][0]
    assert len(bars["y"]) == 8 and bars["y"][2] is None and bars["x"][1] == "1: R1+R2+R3"
    assert bars["marker"]["color"][3] == F.ACCENT and bars["marker"]["color"][0] != F.ACCENT
    assert fig["layout"]["shapes"][0]["y0"] == 0.9
    fig = roundtrip(F.top5(["cat", "dog", "fox", "owl", "eel"], [0.5, 0.2, 0.1, 0.1, 0.05], "dog", "mode 1"))
    assert fig["data"][0]["y"][0] == "eel" and "<b>dog</b>" in fig["data"][0]["y"]


def test_strength_views():
    ent = np.linspace(0, 1, L * H)
    fig = roundtrip(F.property_overview(ent, L, H, selected=(2, 0)))
    pts = fig["data"][0]
    assert pts["marker"]["color"] == [l for l in range(L) for _ in range(H)]
    assert all(abs(x - l) < 0.5 for x, l in zip(pts["x"], pts["marker"]["color"]))
    ring = fig["layout"]["shapes"][0]  # the selected head's ring, a shape (a new head moves only the shapes)
    assert len(fig["data"]) == 1 and ring["type"] == "circle" and ring["xsizemode"] == ring["ysizemode"] == "pixel"
    lo, hi = fig["layout"]["yaxis"]["range"]  # on the paper's y (the plot area does not clip it at y = 1)
    assert (ring["xref"], ring["yref"]) == ("x", "paper") and lo < 0 and hi > 1
    assert (ring["xanchor"], lo + ring["yanchor"] * (hi - lo)) == (pytest.approx(pts["x"][2 * H]), pytest.approx(ent[2 * H]))
    free = roundtrip(F.property_overview(ent * 5 - 1, L, H, selected=(2, 0), y_range=None))  # no range: the values'
    lo, hi = free["layout"]["yaxis"]["range"]
    assert lo < -1 and hi > 4 and lo + free["layout"]["shapes"][0]["yanchor"] * (hi - lo) == pytest.approx(ent[2 * H] * 5 - 1)
    assert "shapes" not in roundtrip(F.property_overview(ent, L, H))["layout"] or \
        not roundtrip(F.property_overview(ent, L, H))["layout"]["shapes"]
    fig = roundtrip(F.strength_bars([0.5, 0.2, 0.1]))
    assert fig["data"][0]["x"] == [0, 1, 2]
    fig = roundtrip(F.distribution(np.array([0.1, 0.1, 0.9, np.nan]), current=0.9, bins=10))
    assert sum(fig["data"][0]["y"]) == pytest.approx(1) and len(fig["data"]) == 1
    assert fig["layout"]["shapes"][0]["x0"] == 0.9
    # a selected set gets its own distribution on top of all images'
    fig = roundtrip(F.distribution(np.array([0.1, 0.1, 0.9, 0.95]), bins=10, subset=[2, 3]))
    assert fig["data"][1]["name"] == "selected set (2)" and fig["data"][1]["y"][9] == pytest.approx(1)
    assert fig["data"][0]["y"][1] == pytest.approx(0.5)


def test_pattern_layout_background_and_overlay():
    n = 5
    xy = np.random.rand(n, L * H, 2)
    ids = np.arange(50, 50 + n)
    kinds = {"points": ["scattergl"] * L + ["scatter"], "contours": ["contour", "scatter"]}
    for style, types in kinds.items():
        assert [t["type"] for t in F.pattern_background(xy, style, H, ids)] == types
    # "points + contours": the density (without lines) comes first in the selection layer, drawn under the points
    under = F.pattern_overlay(xy[0], L, H, (0, 1), density=F.pattern_density(xy, lines=False))
    assert under[0]["type"] == "contour" and under[0]["meta"] == {"layer": "density", "under": True}
    assert not under[0]["contours"]["showlines"] and F.pattern_background(xy, "contours", H, ids)[0]["contours"]["showlines"]
    # the density: counts of a 60 x 60 grid over the points' range, as a plain loop counts them
    dens = F.pattern_background(xy, "contours", H, ids)[0]
    pts, x, y, z = xy.reshape(-1, 2), F.untyped(dens["x"]), F.untyped(dens["y"]), F.untyped(dens["z"]).reshape(60, 60)
    step = [(pts[:, a].max() - pts[:, a].min()) / 60 for a in (0, 1)]
    ref = np.zeros((60, 60), int)
    for px, py in pts:
        col = min(int((px - pts[:, 0].min()) / step[0]), 59)
        row = min(int((py - pts[:, 1].min()) / step[1]), 59)
        ref[row, col] += 1
    assert (z == ref).all() and z.sum() == n * L * H
    assert x[0] == pytest.approx(pts[:, 0].min() + step[0] / 2, rel=1e-5) and y[-1] == pytest.approx(pts[:, 1].max() - step[1] / 2, rel=1e-5)
    # the selected head over many images is drawn with WebGL (SVG's cost grows with every point), over few with SVG
    for images, kind in ((F.OVERLAY_GL_POINTS + 1, "scattergl"), (F.OVERLAY_GL_POINTS, "scatter")):
        assert F.pattern_overlay(None, L, H, (0, 1), np.random.rand(images, 2))[0]["type"] == kind
    # the layer colour bar on a point-less trace (the points and the overlay's heads are coloured by layer)
    bar = F.pattern_background(xy, "contours", H, ids)[1]
    assert bar["x"] == [None] and bar["marker"]["showscale"] and bar["marker"]["cmax"] == L - 1
    traces = F.pattern_background(xy, "points", H, ids)[:L]
    # one trace of one colour per layer (a per-point colour costs plotly a colour conversion per point)
    assert [t["name"] for t in traces] == [f"layer {l}" for l in range(L)]
    assert len({t["marker"]["color"] for t in traces}) == L and all(isinstance(t["marker"]["color"], str) for t in traces)
    assert sum(len(F.untyped(t["x"])) for t in traces) == n * L * H
    # every head of every image names its image id, layer and head: image 2, layer 1, head 2 is the
    # (2 * H + 2)-th point of layer 1's trace
    pts = traces[1]
    assert pts["customdata"][2 * H + 2] == [52, 1, 2]
    assert F.untyped(pts["x"])[2 * H + 2] == pytest.approx(xy[2, H + 2, 0])
    assert "image %{customdata[0]}" in pts["hovertemplate"]
    # heads without a position are left out
    holes = xy.copy()
    holes[0, :H] = np.nan
    assert len(F.pattern_background(holes, "points", H, ids)[0]["customdata"]) == (n - 1) * H
    # by pattern: one trace per family present, in PATTERN_COLOURS' order, each its legend entry
    labels = np.array([["diagonal:self", "block"] * (L * H // 2)] * n, dtype=object)
    by_pattern = F.pattern_background(xy, "points", H, ids, patterns=labels)
    assert [(t["name"], t["marker"]["color"], t["showlegend"]) for t in by_pattern] == \
           [("pattern: diagonal", F.PATTERN_COLOURS["diagonal"], True), ("pattern: block", F.PATTERN_COLOURS["block"], True)]
    assert by_pattern[0]["text"][0] == "diagonal:self" and len(by_pattern[1]["customdata"]) == n * L * H // 2
    fig = roundtrip(F.pattern_layout(F.pattern_background(xy, "points", H, ids), "cls"))
    assert [t["type"] for t in fig["data"]] == kinds["points"]
    assert fig["layout"]["plot_bgcolor"] == "rgba(0,0,0,0)"  # the density under it shows through
    # the selection layer: the head over all images, the image's heads (by layer), the ring; no events
    overlay = roundtrip({"data": F.pattern_overlay(xy[2], L, H, selected=(1, 1), head_all_images=xy[:, 4]),
                         "layout": {}})["data"]
    assert [t["type"] for t in overlay] == ["scatter"] * 3
    assert F.untyped(overlay[0]["x"]).tolist() == pytest.approx(xy[:, 4, 0].tolist())
    assert overlay[1]["x"][H + 1] == pytest.approx(xy[2, H + 1, 0]) and overlay[1]["marker"]["color"][H + 1] == 1
    assert "colorbar" not in overlay[1]["marker"] and overlay[1]["marker"]["size"] > 3
    assert overlay[2]["x"] == [pytest.approx(xy[2, H + 1, 0])]
    assert all(t["hoverinfo"] == "skip" for t in overlay)
    assert [t["meta"]["layer"] for t in overlay] == ["head", "image", "ring"]  # one plot each (assets/overlay.js)
    assert F.pattern_overlay(None, L, H) == []


def attention(N=10, T=1, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.random((N, N)) ** 4
    return (A / A.sum(1, keepdims=True)).astype(np.float32)


def line_segments(fig, family=None):
    """[(source, target)] of D3's drawn segments (of one family)."""
    out = []
    for t in fig["data"]:
        if t.get("mode") == "lines" and (family is None or t["meta"]["family"] == family):
            xs = F.untyped(t["x"]).reshape(-1, 3)[:, :2]
            out += [tuple(int(v) for v in p) for p in xs]
    return out


def test_two_axis_always_draws_cls_and_caps_the_patch_lines():
    N, T = 10, 1
    A = attention(N)
    for q in (0.01, 0.1, 0.5):
        thr = data.threshold_for(A, q)
        fig, drawn, above, n_cls = F.two_axis(A, T, thr, (3, 3))
        patch = line_segments(fig, "patch→patch")
        expected = {(int(s), int(d)) for s, d in zip(*np.nonzero(A >= thr)) if s >= T and d >= T}
        assert set(patch) == expected and drawn == above == len(expected)
        cls = line_segments(fig, "CLS-related")
        assert n_cls == len(cls) == 2 * N - 1  # every CLS row and column pair, whatever the threshold
        assert set(cls) == {(s, d) for s in range(N) for d in range(N) if s < T or d < T}
    fig, drawn, above, _ = F.two_axis(A, T, 0.0, (3, 3), max_segments=20)
    assert drawn == 20 and above == (N - T) ** 2
    strongest = sorted(((A[s, d], (s, d)) for s in range(T, N) for d in range(T, N)), reverse=True)[:20]
    assert set(line_segments(fig, "patch→patch")) == {p for _, p in strongest}
    tokens = [t for t in fig["data"] if t.get("mode") == "markers" and "customdata" in t]
    assert [t["customdata"][3] for t in tokens] == [[0, 3], [1, 3]]


def test_two_axis_colour_is_the_value_on_the_shared_scale():
    A = attention()
    weak = A * 0.5
    # on one scale (vmax) the same cell of a weaker head falls in a lower colour level
    fig_strong, *_ = F.two_axis(A, 1, 0.0, (3, 3), vmax=float(A.max()), n_levels=4)
    fig_weak, *_ = F.two_axis(weak, 1, 0.0, (3, 3), vmax=float(A.max()), n_levels=4)

    def level_of(fig, pair):
        for t in fig["data"]:
            if t.get("mode") == "lines" and pair in [tuple(int(v) for v in p) for p in F.untyped(t["x"]).reshape(-1, 3)[:, :2]]:
                return t["meta"]["level"]
    s, d = np.unravel_index(np.argmax(A[1:, 1:]), (9, 9))
    pair = (int(s) + 1, int(d) + 1)
    f = A[pair] / A.max()
    assert level_of(fig_strong, pair) == min(int(f * 4), 3) and level_of(fig_weak, pair) == min(int(f * 2), 3)
    assert level_of(fig_weak, pair) < level_of(fig_strong, pair)
    bars = [t["marker"] for t in fig_strong["data"] if t.get("marker", {}).get("showscale")]
    assert len(bars) == 2 and all(b["cmin"] == 0 and b["cmax"] == pytest.approx(A.max()) for b in bars)


def test_heatmap_shared_scale_and_threshold_colours():
    A = attention()
    thr = data.threshold_for(A, 0.2)
    fig = roundtrip(F.attention_heatmap(A, 1, thr, vmax=0.9))
    cls, patch = (F.untyped(t["z"]) for t in fig["data"])
    assert np.isnan(cls[1:, 1:]).all() and np.isnan(patch[0]).all() and np.isnan(patch[:, 0]).all()
    np.testing.assert_allclose(cls[0], A[0]) and np.testing.assert_allclose(patch[1:, 1:], A[1:, 1:])
    assert all(t["zmin"] == 0 and t["zmax"] == 0.9 for t in fig["data"])  # one scale for both, and for other heads
    cs = fig["data"][1]["colorscale"]
    assert cs[0] == [0, "#ffffff"] and cs[1] == [pytest.approx(thr / 0.9), "#ffffff"] and cs[2][1] == F.ORANGES[0]
    assert fig["data"][0]["colorscale"][0][1] == F.BLUES[0]  # the CLS cells ignore the threshold
    edges = F.untyped(fig["data"][0]["x"])
    assert edges[1] - edges[0] > edges[2] - edges[1]  # the CLS column is drawn wider
    assert F.threshold_colorscale(F.ORANGES, 0.0, 1.0)[0][1] == F.ORANGES[0]


def test_histogram_log_bins_and_draggable_threshold():
    A = attention(40)
    A[0, 0] = 0.0  # e.g. a float16 underflow
    thr = data.threshold_for(A, 0.05)
    fig = roundtrip(F.attention_histogram(A, thr, "top 5%", bins=30))
    bars = fig["data"][0]
    assert sum(v or 0 for v in bars["y"]) == A.size and len(bars["y"]) == 30
    lo, hi = bars["customdata"][0][0], bars["customdata"][-1][1]
    assert lo == pytest.approx(A[A > 0].min()) and hi == pytest.approx(A.max())
    ratios = [b / a for a, b in bars["customdata"]]
    assert max(ratios) == pytest.approx(min(ratios))  # log-spaced
    shape = fig["layout"]["shapes"][0]
    assert shape["editable"] and shape["x0"] == pytest.approx(np.log10(thr))
    assert F.threshold_from_shape_x(shape["x0"], "log") == pytest.approx(thr)
    assert fig["layout"]["xaxis"]["range"] == [pytest.approx(np.log10(lo)), pytest.approx(np.log10(hi))]
    fig = roundtrip(F.attention_histogram(A, thr, "top 5%", bins=30, binning="linear"))
    assert fig["layout"]["xaxis"]["range"] == [0, pytest.approx(A.max())]  # never below 0
    assert fig["layout"]["shapes"][0]["x0"] == pytest.approx(thr) and F.threshold_from_shape_x(-0.1, "linear") == 0


def test_masked_image_is_a_colour_overlay_on_a_shared_scale():
    import base64
    import io

    from PIL import Image

    im = Image.new("RGB", (48, 48), (128, 128, 128))

    def pixels(uri):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",")[1]))).convert("RGB"), float)

    w = np.zeros(9)
    w[4] = 0.5
    strong = pixels(F.masked_image(im, w, (3, 3), size=48, vmax=0.5))
    weak = pixels(F.masked_image(im, w / 2, (3, 3), size=48, vmax=0.5))
    centre, corner = (24, 24), (2, 2)
    # colour (red > blue, not only darker) where the attention is, more of it for the larger value
    assert strong[centre][0] - strong[centre][2] > 60 and weak[centre][0] - weak[centre][2] > 10
    assert strong[centre][0] - strong[centre][2] > weak[centre][0] - weak[centre][2] + 20
    assert abs(strong[corner][0] - strong[corner][2]) < 8  # grey where there is none
    np.testing.assert_allclose(F.mask_colours(np.array([1.0]))[0], pc_rgb(F.MASK_SCALE[-1]))
    assert F.masked_image(im, w, (3, 3), highlight=4, size=48).startswith("data:image/jpeg;base64,")


def pc_rgb(colour):
    import plotly.colors as pc

    return pc.hex_to_rgb(colour) if colour.startswith("#") else pc.unlabel_rgb(colour)


def test_empty_figure_says_why():
    fig = roundtrip(F.empty("This run has no patch layout"))
    assert fig["layout"]["annotations"][0]["text"] == "This run has no patch layout"


def test_heads_page_ranks_importance_and_head_properties(cache):
    from app import create_app

    create_app(cache, "syn")
    heads = sys.modules["app.pages.heads"]
    options, value = heads.heads_metric({"run": "syn"}, None)
    values = [o["value"] for o in options]
    assert value == "prob_drop" and "semantic_concentration" in values and "mean_distance_px" in values
    fig, table, msg = heads.heads_view({"run": "syn", "layer": 1, "head": 2}, "semantic_concentration")
    hm = open_run(cache / "syn").head_metrics
    expected = hm.groupby(["layer", "head"]).semantic_concentration.mean().to_numpy().reshape(L, H)
    np.testing.assert_allclose(np.array(fig["data"][0]["z"], dtype=float), expected, rtol=1e-5)
    assert msg is None and fig["data"][1]["x"] == [2] and fig["data"][1]["y"] == [1]  # selected head marked


def test_responses_are_gzip_compressed(cache):
    from app import create_app

    client = create_app(cache, "syn").server.test_client()
    r = client.get("/_dash-layout", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip"
    import gzip

    assert gzip.decompress(r.data).startswith(b"{")


def test_heads_page_on_a_run_from_an_older_writer(tmp_path):
    """A run whose manifest lists no metrics and whose head_summary lacks a metric's columns (runs
    written before those existed): every Heads choice still draws, from the per-image values."""
    import pandas as pd

    from app import create_app

    run = make_run(tmp_path / "older", n_images=6, layers=2, heads=2, grid=3, n_classes=2)
    hs = pd.read_parquet(run / "head_summary.parquet")
    hs.drop(columns=["strength_mean", "semantic_concentration_mean", "semantic_concentration_std"]).to_parquet(
        run / "head_summary.parquet")
    mf = json.loads((run / "manifest.json").read_text())
    del mf["metrics"]
    (run / "manifest.json").write_text(json.dumps(mf))
    create_app(tmp_path, "older")
    heads = sys.modules["app.pages.heads"]
    options, _ = heads.heads_metric({"run": "older"}, None)
    assert "semantic_concentration" in [o["value"] for o in options]
    for o in options:
        fig, _, msg = heads.heads_view({"run": "older"}, o["value"])
        assert msg is None and np.isfinite(np.array(fig["data"][0]["z"], float)).all(), o["value"]
    hm = open_run(run).head_metrics
    expected = hm.groupby(["layer", "head"]).semantic_concentration.mean().to_numpy().reshape(2, 2)
    fig, _, _ = heads.heads_view({"run": "older"}, "semantic_concentration")
    np.testing.assert_allclose(np.array(fig["data"][0]["z"], float), expected, rtol=1e-5)


def test_saliency_panel_figures():
    occ = np.array([[0.2, -0.1], [0.0, 0.05]])
    roll = np.array([[0.1, 0.2], [0.3, 0.4]])
    fig = roundtrip(F.saliency_map(occ, "occlusion", "P(y) drop", others={"rollout": roll},
                                   image_uri="data:image/jpeg;base64,xx", selected_patch=3))
    hm = fig["data"][0]
    np.testing.assert_allclose(F.untyped(hm["z"]), occ, rtol=1e-6)
    assert hm["zmid"] == 0 and hm["colorbar"]["title"]["text"] == "P(y) drop"   # signed: diverging at 0
    assert hm["customdata"] == [[0, 1], [2, 3]]
    assert "occlusion: -0.1" in hm["text"][0][1] and "rollout: 0.2" in hm["text"][0][1]
    assert fig["layout"]["images"][0]["source"].startswith("data:image")
    assert fig["layout"]["shapes"][0]["x0"] == 0.5 and fig["layout"]["shapes"][0]["y0"] == 0.5
    plain = F.saliency_map(roll, "rollout", "rollout weight")
    assert "zmid" not in plain["data"][0] and plain["layout"]["images"] == []
    agree = roundtrip(F.map_agreement({"a": {"a": 1.0, "b": -0.5}, "b": {"a": -0.5, "b": None}}))
    assert agree["data"][0]["text"] == [["1.00", "-0.50"], ["-0.50", "–"]]
    curves = roundtrip(F.deletion_curves([0, 1, 4], {"occlusion": [0.9, 0.7, 0.2], "rollout": [0.9, 0.8, 0.6]},
                                         "P(true)", selected_n=1))
    assert [t["name"] for t in curves["data"]] == ["occlusion", "rollout"]
    assert curves["data"][0]["x"] == [0, 1, 4] and curves["data"][1]["y"] == [0.9, 0.8, 0.6]
    assert curves["layout"]["yaxis"]["title"]["text"] == "P(true)" and curves["layout"]["shapes"][0]["x0"] == 1


# ---- issue 25 item 5: the header's numbers, B1's unpruned P(true), C1's y title ------------------
def test_head_rank_counts_the_more_important_heads():
    from app.explorer.header import head_rank

    v = np.random.default_rng(0).random(24)
    v[[3, 7]] = np.nan
    v[6] = v[5]  # a tie
    for important in ("high", "low"):
        for hi in range(24):
            if np.isnan(v[hi]):
                assert head_rank(v, hi, important) is None
                continue
            better = 0  # the plain reference: count, head by head, those strictly more important
            for j in range(24):
                if not np.isnan(v[j]) and (v[j] > v[hi] if important == "high" else v[j] < v[hi]):
                    better += 1
            assert head_rank(v, hi, important) == (better + 1, 22)
    assert head_rank(v, 5, "high") == head_rank(v, 6, "high")


def test_header_names_rank_pattern_label_and_p_true_as_whole_numbers(index):
    from app.explorer.header import head_rank, summary_parts

    sel = {"run": "syn", "image": int(index.image_ids[2]), "layer": 1, "head": 2, "metric": "prob"}
    parts = summary_parts(index, sel)
    nums = [p.children for p in parts if getattr(p, "className", "") == "sel-num"]
    rank = head_rank(index.values("prob")[2], 1 * H + 2, "low")
    row = index.images.iloc[2]
    assert f"rank {rank[0]}/{rank[1]}" in nums and f"P(true) = {float(row.prob):.3f}" in nums
    if index.categories:
        assert f"{registry.get_metric(index.categories[0]).label}: {index.values(index.categories[0])[2, 1 * H + 2]}" in nums
    prose = [p.children for p in parts if getattr(p, "className", "") == "sel-prose"]
    assert prose == [f"label {index.class_name(row.label)} · predicted {index.class_name(row.pred)}"]
    keys = [p.children for p in parts if getattr(p, "className", "") == "sel-key"]
    assert keys == [f"image {int(row.image_id)}", F.head_name(1, 2)]


def test_b1_shows_the_images_unpruned_p_true(index):
    from app.explorer.importance import unpruned_reference

    p = float(index.images["prob"].iat[2])
    assert unpruned_reference(index, "prob", 2) == (f"unpruned P(true) = {p:.3f}", p)
    assert unpruned_reference(index, "prob_drop", 2) == (f"unpruned P(true) = {p:.3f}", None)
    assert unpruned_reference(index, "jsd", 2) is None and unpruned_reference(index, "prob", None) is None
    args = (L, H, "P(true)", np.full(L * H, 0.5), np.zeros(L * H))
    fig = roundtrip(F.head_importance(*args, image_values=np.ones(L * H), reference=("unpruned P(true) = 0.900", 0.9)))
    line = [s for s in fig["layout"]["shapes"] if s.get("name") == "reference"]
    assert len(line) == 1 and line[0]["y0"] == line[0]["y1"] == 0.9 and (line[0]["x0"], line[0]["x1"]) == (0, 1)
    label = [a for a in fig["layout"]["annotations"] if a.get("name") == "reference"]
    assert label[0]["text"] == "unpruned P(true) = 0.900" and label[0]["yref"] == "y" and label[0]["y"] == 0.9
    fig = roundtrip(F.head_importance(*args, reference=("unpruned P(true) = 0.900", None)))  # beside a drop: the value only
    assert not [s for s in fig["layout"]["shapes"] if s.get("name") == "reference"]
    assert [a["yref"] for a in fig["layout"]["annotations"] if a.get("name") == "reference"] == ["paper"]
    assert "annotations" not in roundtrip(F.head_importance(*args))["layout"]


def test_c1_y_title_is_folded_to_the_plot_height():
    values = np.linspace(0, 1, L * H)
    for title in ("mean attention distance (px)", "strength entropy", "block"):
        fig = roundtrip(F.property_overview(values, L, H, title="caption", y_title=title, y_range=None, height=168))
        shown = fig["layout"]["yaxis"]["title"]["text"]
        room = 168 - fig["layout"]["margin"]["t"] - fig["layout"]["margin"]["b"]
        lines = shown.split("<br>")
        assert " ".join(lines) == title  # the words, in order, only broken into lines
        size = fig["layout"]["yaxis"]["title"]["font"]["size"]
        assert all(len(line) * 0.6 * size <= room or " " not in line for line in lines), (title, lines)
        assert (len(lines) > 1) == (len(title) * 0.6 * size > room)  # folded only when too long for the plot
