"""What a researcher missed while doing the case studies (issue 25, item 5), without a browser:
Compare's runs and metric in the view state, why a B1 overlay draws nothing, the pair heatmap's
and the class heatmap's labels, D6's legend, and what bounds the Curves page's 1-point count."""
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from dash import no_update

from analysis.metrics.head_sets import heads_before_drop
from analysis.runs.synthetic import make_run
from app import config, data, figures as F, state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("case-studies")
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        make_run(root / name, n_images=12, layers=3, heads=4, grid=4, n_classes=3, seed=seed)
    from app import create_app

    create_app(root, "a")
    return root


@pytest.fixture
def pages(runs):
    """The page modules of the app built on ``runs`` (conftest resets the config after each test)."""
    config.configure(runs, "a")
    return SimpleNamespace(compare=sys.modules["app.pages.compare"], heads=sys.modules["app.pages.heads"])


# ---- 1. Compare's runs and metric are the view state's ------------------------------------------
def test_the_compare_url_parses_its_runs_in_order_and_names_what_it_drops():
    sel, notes = state.parse_query("runs=b,a,b,../x,c&metric=prob_drop", "a")
    assert sel["runs"] == ["b", "a", "c"] and sel["metric"] == "prob_drop"  # the comparison's order, once each
    assert notes == ["runs: 1 of 5 entries ignored ('../x'): expected run names (letters, digits, '_', '.', '-')."]
    assert state.selection_query({"run": "a", "metric": "prob_drop", "runs": ["b", "a"]}) == \
        "?run=a&metric=prob_drop&runs=b,a"
    assert state.parse_query(state.selection_query(sel), None)[0] == sel  # the canonical URL round-trips
    many = ",".join(f"r{i}" for i in range(state.MAX_RUNS + 3))
    sel, notes = state.parse_query(f"runs={many}", None)
    assert sel["runs"] == [f"r{i}" for i in range(state.MAX_RUNS)] and "the first 16 kept" in notes[0]
    for bad in (["a", "a"], [], ["a/b"], "a,b", [1]):  # the guard's rule (check_state) refuses what the parser would not give
        with pytest.raises(state.Invalid):
            state.check_state({"runs": bad})


def test_on_compare_the_metric_is_judged_against_the_compared_runs():
    a = state.RunFacts("a", frozenset(range(3)), 3, 4, ("prob", "prob_drop"), ("prob", "prob_drop", "mean_distance_px"))
    b = state.RunFacts("b", frozenset(range(3)), 3, 4, ("emb_dist",), ("emb_dist", "mean_distance_px"))
    sel = {"run": "a", "runs": ["a", "gone", "b"], "metric": "mean_distance_px"}
    judged, notes = state.judge(sel, a, {"a": a, "gone": "Unknown run 'gone'.", "b": b})
    assert judged["runs"] == ["a", "b"] and judged["metric"] == "mean_distance_px"  # a property, fine on Compare
    assert notes == ["runs=gone ignored: Unknown run 'gone'."]
    # on the Explorer the same metric is not B1's: dropped, as before, and the note says why
    judged, notes = state.judge(sel, a)
    assert judged["metric"] is None and notes == [
        "metric=mean_distance_px ignored: B1 shows importance metrics only (prob, prob_drop)."]
    judged, notes = state.judge({"run": "a", "runs": ["b"], "metric": "prob_drop"}, a, {"b": b})
    assert judged["metric"] is None and notes == [
        "metric=prob_drop ignored: none of the compared runs (b) has a scalar metric of that name."]
    judged, notes = state.judge({"run": "a", "metric": "nonsense"}, None, {})  # no runs named: the registry judges
    assert judged["metric"] is None and "no scalar metric has that name" in notes[0]
    assert state.judge({"run": "a", "metric": "strength_entropy"}, None, {}) == (
        {"run": "a", "metric": "strength_entropy"}, [])


def test_the_compare_menus_follow_the_state_and_write_back_only_a_change(pages):
    cmp = pages.compare
    sel = {**dict.fromkeys(state.names()), "run": "b"}
    options, value = cmp.compare_runs(sel, None)
    assert [o["value"] for o in options] == ["a", "b", "c"] and value == ["b", "a"]  # no runs: the run and the next
    assert cmp.compare_runs({**sel, "runs": ["c", "a"]}, None)[1] == ["c", "a"]
    assert cmp.compare_runs({**sel, "runs": ["c", "a"]}, ["c", "a"])[1] is no_update
    _, metric = cmp.compare_metric(["b", "a"], sel, None)
    assert metric == "mean_distance_px"  # the default
    assert cmp.compare_metric(["b", "a"], {**sel, "metric": "prob_drop"}, None)[1] == "prob_drop"
    # what the page opened with (defaults, or the state's own values) is not written back ...
    assert cmp.write_state(["b", "a"], "mean_distance_px", sel) is no_update
    assert cmp.write_state(["c", "a"], "prob_drop", {**sel, "runs": ["c", "a"], "metric": "prob_drop"}) is no_update
    # ... a change is, as a patch of the two keys (assets/url.js then writes the URL)
    ops = cmp.write_state(["a", "c"], "jsd", sel).to_plotly_json()["operations"]
    assert sorted((o["location"][0], o["params"]["value"]) for o in ops) == [("metric", "jsd"), ("runs", ["a", "c"])]


# ---- 2. a B1 overlay that draws nothing says why ---------------------------------------------------
def test_a_ticked_overlay_that_cannot_draw_says_why(pages):
    from app.panels.head_sets import b1_extras

    index = data.get_index("a")  # a synthetic run with the Taylor and mean-ablation metrics
    out = b1_extras(index, "prob", None, ["taylor"], None)
    assert out["overlays"] == [] and len(out["overlay_notes"]) == 1
    assert "prob_drop only" in out["overlay_notes"][0] and "now prob" in out["overlay_notes"][0]
    out = b1_extras(index, "taylor_prob_drop", None, ["mean"], None)
    assert out["overlays"] == [] and "taylor_prob_drop has no mean-ablated twin" in out["overlay_notes"][0]
    assert b1_extras(index, "prob", None, [], None)["overlay_notes"] == []  # nothing ticked: nothing said
    fig = F.head_importance(3, 4, "P(true)", np.zeros(12), np.zeros(12), **b1_extras(index, "prob", None, ["taylor"], None))
    note = [a for a in fig["layout"]["annotations"] if a["name"] == "overlay-note"]
    assert len(note) == 1 and "prob_drop only" in note[0]["text"]
    # where they can draw, they draw (the run mean of the other metric) and say nothing
    out = b1_extras(index, "prob_drop", None, ["taylor", "mean"], None)
    assert out["overlay_notes"] == [] and [o[0] for o in out["overlays"]] == ["taylor", "mean"]
    np.testing.assert_array_equal(out["overlays"][0][2], index.summary("taylor_prob_drop")[0])
    np.testing.assert_array_equal(out["overlays"][1][2], index.summary("mean_prob_drop")[0])
    # a run without those stages: the build flag that adds them
    bare = SimpleNamespace(name="bare", importance=["prob", "prob_drop"])
    out = b1_extras(bare, "prob_drop", None, ["taylor", "mean"], None)
    assert out["overlays"] == [] and [n.split(":")[0] for n in out["overlay_notes"]] == ["Taylor (approx.)", "mean abl."]
    assert "--taylor" in out["overlay_notes"][0] and "--mean-ablation" in out["overlay_notes"][1]


# ---- 3. every row of the pair heatmap and every head of the class heatmap labelled ---------------
def test_the_pair_heatmap_labels_every_row_and_grows_with_them():
    heads = [(l, h) for l in range(4) for h in range(4)]  # 16 heads, the most the panel compares
    k = len(heads)
    fig = F.pair_heatmap(heads, np.zeros((k, k)), np.zeros(k), "ΔP(true)")
    assert fig["layout"]["yaxis"]["dtick"] == 1 and fig["layout"]["xaxis"]["dtick"] == 1  # no label skipped
    assert fig["data"][0]["y"] == [f"L{l}H{h}" for l, h in heads]
    assert fig["layout"]["height"] == F.pair_heatmap_height(k)
    rows_px = F.pair_heatmap_height(k) - F.PAIR_MARGIN["t"] - F.PAIR_MARGIN["b"]
    assert rows_px / k >= 12  # a row at least as tall as a 9 px label with its gap
    assert F.pair_heatmap_height(2, least=140) == 140 and F.pair_heatmap_height(16) > F.pair_heatmap_height(8)


def test_the_class_heatmap_labels_every_head_and_is_as_wide_as_they_need(pages):
    fig, _, _ = pages.heads.heads_class_view({"run": "a"}, "prob_drop", "all")
    assert fig["layout"]["xaxis"]["dtick"] == 1 and len(fig["data"][0]["x"]) == 3 * 4
    style = pages.heads.heads_class_size({"run": "a"})
    px = pages.heads.CLASS_MAP_FRAME_PX + pages.heads.CLASS_MAP_HEAD_PX * 12
    assert style["width"] == f"max(100%, {px}px)"


# ---- 4. D6's legend beside its plot, not on it -------------------------------------------------------
def test_the_deletion_curves_legend_sits_outside_the_plot():
    fig = F.deletion_curves([0, 4, 8], {m: [0.9, 0.5, 0.2] for m in ("occlusion", "token_drop", "rollout", "grad_rollout")},
                            "P(true class)", selected_n=4)
    legend = fig["layout"]["legend"]
    assert legend["x"] > 1 and legend["xanchor"] == "left"  # right of the plot area: plotly widens the margin


# ---- 5. what bounds "heads before a 1-point drop" -----------------------------------------------------
def curve(order, k, acc, seed=None):
    return pd.DataFrame({"order": order, "k": k, "accuracy": acc, "mean_prob": acc, "seed": seed})


def test_the_1_point_count_says_its_grid_bracket_and_its_image_resolution():
    from app.pages.curves import drop_bracket, drop_limits

    k = [0, 6, 12, 18, 24]
    exact = curve("exact", k, [0.80, 0.80, 0.795, 0.70, 0.5])    # within 0.01 up to k = 12, not at 18
    taylor = curve("taylor", k, [0.80, 0.80, 0.80, 0.80, 0.795])  # never drops on the grid
    rand = pd.concat([curve("random", k, [0.8, 0.6, 0.6, 0.5, 0.4], 0), curve("random", k, [0.8, 0.8, 0.6, 0.5, 0.4], 1)])
    for c, want in ((exact, (12, 18)), (taylor, (24, None))):
        assert drop_bracket(c) == want and drop_bracket(c)[0] == heads_before_drop(c)
    lines = drop_limits(pd.concat([exact, taylor, rand]), images=30, total=24)
    assert lines[0] == "k grid: accuracy is measured only at k = 0, 6, 12, 18, 24; each count is the last of these k " \
                       "before the drop."
    assert lines[1] == ("exact (leave-one-out): the first 1-point drop lies between k = 12 and 18: one head at a time, "
                        "at most 17 heads could go (12 or more unless accuracy dips between grid points).")
    assert lines[2] == "taylor (approximate): no 1-point drop at any k of the grid up to its last, k = 24 (every head pruned)."
    assert lines[3] == ("random: the first 1-point drop lies between k = 0 and 6 (1 seed); 6 and 12 (1 seed): one head "
                        "at a time, at most 5, 11 heads could go (0, 6 or more unless accuracy dips between grid points).")
    # 30 images: accuracy moves by 3.33 points per image, so the count ends at the first image lost
    assert lines[4].startswith("image-limited: accuracy is measured on 30 labelled images") and "3.33 points" in lines[4]
    # 250 images: one point is 2 images (and a grid that stops short of every head: the drop may lie beyond)
    lines = drop_limits(taylor, images=250, total=72)
    assert lines[1:] == ["taylor (approximate): no 1-point drop at any k of the grid up to its last, k = 24: the drop, "
                     "if any, is beyond k = 24.",
                     "1 point of accuracy = 2 of the 250 labelled images (steps of 0.4 points)."]
    assert drop_limits(taylor, images=100, total=24)[-1].startswith("1 point of accuracy = 1 of the 100")
