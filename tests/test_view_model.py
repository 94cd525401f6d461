"""The Explorer's view models (app/views.py ViewModel): one request per state change that computes
only the views whose inputs differ from what the browser shows, with the views' own functions and
declarations."""
from __future__ import annotations

import json
import threading

from dash import Input, Output, State, no_update

from app.views import ViewModel


def _model(parallel=False):
    model, calls = ViewModel("t", parallel=parallel), []

    @model.view(Output("a", "figure"), Output("a-msg", "children"), Input("k-image", "data"), State("sel", "data"))
    def view_a(image, sel):
        calls.append(("a", image, sel, threading.get_ident()))
        return f"a{image}", f"msg{sel}"

    @model.view(Output("b", "figure"), Input("k-head", "data"), State("sel", "data"), Input("k-image", "data"))
    def view_b(head, sel, image):  # arguments in the view's own order, an Input after a State
        calls.append(("b", head, sel, image, threading.get_ident()))
        return f"b{head}{image}"

    @model.view(Output("c", "figure"), Input("c-metric", "value"), State("k-head", "data"))
    def view_c(metric, head):  # k-head: an Input of the callback (view_b's), a State of this view
        calls.append(("c", metric, head))
        return f"c{metric}{head}"
    return model, calls


def test_the_union_of_the_views_dependencies_is_one_callback():
    model, _ = _model()
    outputs, inputs, states = model.dependencies()
    key = lambda d: f"{d.component_id}.{d.component_property}"
    assert [key(o) for o in outputs] == ["a.figure", "a-msg.children", "b.figure", "c.figure"]
    assert [key(i) for i in inputs] == ["k-image.data", "k-head.data", "c-metric.value"]
    assert [key(s) for s in states] == ["sel.data"]  # k-head is an Input of the callback, not also a State


def test_only_the_views_whose_inputs_differ_from_the_record_are_computed():
    model, calls = _model()
    values = {"k-image.data": 3, "k-head.data": 7, "sel.data": "S", "c-metric.value": "m"}
    out, shown = model.run(values, None)
    assert out == ["a3", "msgS", "b73", "cm7"]  # the page's first call: every view
    calls.clear()
    out, shown = model.run({**values, "k-head.data": 8}, shown)
    assert out == [no_update, no_update, "b83", no_update]
    assert [c[0] for c in calls] == ["b"]  # view_c reads k-head as a State: not recomputed
    out, _ = model.run({**values, "k-head.data": 8, "sel.data": "T"}, shown)
    assert out == [no_update] * 4  # a State alone recomputes nothing
    # a response the browser dropped (superseded by a newer request) leaves the record as it was:
    # the next call recomputes what that response held too
    dropped, _ = model.run({**values, "k-head.data": 9, "k-image.data": 4}, shown)
    assert dropped == ["a4", "msgS", "b94", no_update]
    out, _ = model.run({**values, "k-head.data": 9, "k-image.data": 4, "c-metric.value": "n"}, shown)
    assert out == ["a4", "msgS", "b94", "cn9"]


def test_a_view_knows_which_of_its_inputs_changed():
    from app.views import changed_inputs

    model, seen = ViewModel("t"), []

    @model.view(Output("x", "figure"), Input("k-head", "data"), Input("k-thr", "data"))
    def view_x(head, thr):
        seen.append(changed_inputs())
        return "x"

    _, shown = model.run({"k-head.data": 1, "k-thr.data": "q1"}, None)
    model.run({"k-head.data": 1, "k-thr.data": "q2"}, shown)
    assert seen == [{"k-head", "k-thr"}, {"k-thr"}] and changed_inputs() == set()


def test_the_explorer_answers_a_state_change_in_two_requests():
    from dash import _callback

    from app import create_app
    from app.explorer import selection

    create_app()
    fns = [getattr(entry.get("callback"), "__wrapped__", None) for entry in _callback.GLOBAL_CALLBACK_MAP.values()]
    assert {f.__name__ for f in fns if f is not None and f.__name__.startswith("view_model")} == {
        "view_model_cached", "view_model_online"}
    views = {v.fn.__name__ for v in selection.cached.views + selection.online.views}
    assert views == {"view_a", "view_b1", "view_c", "view_d1", "selection_summary", "view_b2_b3", "view_d3_d5", "view_d2"}
    assert not {f.__name__ for f in fns if f is not None} & views  # no view has a callback of its own
    on_head = {v.name for v in selection.cached.views if "k-head.data" in v.inputs}
    assert on_head == {"view_b1", "view_c", "view_d1", "selection_summary"}  # A only with colour by head (k-color)


def _apply(figure: dict, patch) -> dict:
    """``figure`` with a dash Patch of assignments applied, as dash-renderer applies it."""
    out = json.loads(json.dumps(figure))
    for op in patch.to_plotly_json()["operations"]:
        *path, last = op["location"]
        node = out
        for key in path:
            node = node[key]
        assert op["operation"] == "Assign", op
        node[last] = op["params"]["value"]
    return json.loads(json.dumps(out))


def test_a_new_head_sends_b1_and_c1_only_their_shapes(tmp_path):
    """A head click moves B1's marker and C1's ring, layout shapes: the view model sends each a Patch of
    its shapes (plotly redraws them without replotting the curves and points), which applied to what
    the browser shows gives the figure drawn from scratch for the new head."""
    from dash import Patch

    from app import config
    from app.explorer import importance, selection, strength
    from conftest import make_synthetic_run

    make_synthetic_run(tmp_path / "syn", n_images=6, layers=3, heads=2, grid=3, n_classes=2, seed=2)
    config.configure(tmp_path, "syn")
    model = ViewModel("t", version=selection.run_version)
    model.views.extend(v for v in selection.cached.views if v.name in ("view_b1", "view_c"))
    sel = {"run": "syn", "image": 2, "layer": 0, "head": 1, "metric": "prob_drop"}
    values = {"k-image.data": 2, "k-head.data": [0, 1], "k-metric.data": "prob_drop", "k-set.data": None,
              "k-heads.data": None, "b1-overlay.value": [], "c1-metric.value": None, "c2-metric.value": None,
              "sel.data": sel}
    (b1, c1, *_), shown = model.run(values, None)
    moved = {**sel, "layer": 2, "head": 0}
    (b1_new, c1_new, c2_new, c3_new, _), _ = model.run({**values, "k-head.data": [2, 0], "sel.data": moved}, shown)
    assert isinstance(b1_new, Patch) and isinstance(c1_new, Patch)
    assert [op["location"] for op in b1_new.to_plotly_json()["operations"]] == [["layout", "shapes"]]
    full_b1 = importance.view_b1(None, None, None, None, None, [], moved)
    full_c = strength.view_c(None, None, None, None, moved)
    assert _apply(b1, b1_new) == json.loads(json.dumps(full_b1))
    assert _apply(c1, c1_new) == json.loads(json.dumps(full_c[0]))
    assert full_c[0]["layout"]["shapes"] != c1["layout"]["shapes"]  # the ring moved
    assert not isinstance(c2_new, Patch) and c2_new == full_c[1]  # C2, C3 draw the new head's data
    # a new image with the head redraws B1's curves: a whole figure
    (b1_img, *_), _ = model.run({**values, "k-image.data": 3, "sel.data": {**sel, "image": 3}}, shown)
    assert not isinstance(b1_img, Patch) and len(b1_img["data"]) >= 3
    # the run replaced in place (rebuilt): the same head change draws both anew, with the new run's numbers
    import shutil
    shutil.rmtree(tmp_path / "syn")
    make_synthetic_run(tmp_path / "syn", n_images=6, layers=3, heads=2, grid=3, n_classes=2, seed=5)
    (b1_new, c1_new, *_), _ = model.run({**values, "k-head.data": [2, 0], "sel.data": moved}, shown)
    assert not isinstance(b1_new, Patch) and not isinstance(c1_new, Patch)
    assert json.loads(json.dumps(b1_new)) == json.loads(json.dumps(importance.view_b1(None, None, None, None, None, [], moved)))
    assert json.dumps(b1_new["data"][3]["y"]) != json.dumps(b1["data"][3]["y"])  # the image's values of the new run



def test_d1_draws_its_density_under_the_points_without_redrawing_them(tmp_path):
    """D1 from "points" to "points + contours": the background of points stays as the browser shows it
    (no_update) and the density comes in the selection layer, marked to be drawn under the graph;
    "contours" alone is a background of its own (the density with its lines)."""
    import numpy as np
    from dash import no_update

    from app import config, data, figures as F
    from app.explorer import patterns
    from conftest import make_synthetic_run

    make_synthetic_run(tmp_path / "syn", n_images=6, layers=3, heads=2, grid=3, n_classes=2, seed=2)
    config.configure(tmp_path, "syn")
    sel = {"run": "syn", "image": 2, "layer": 0, "head": 1, "d1": "cls", "d1s": "points"}
    points, over, key, _ = patterns.view_d1(None, None, None, None, "layer", sel, None)
    assert [t["type"] for t in points["data"][:-1]] == ["scattergl"] * 3 and not any(t["meta"].get("under") for t in over)
    assert points["layout"]["plot_bgcolor"] == points["layout"]["paper_bgcolor"] == "rgba(0,0,0,0)"
    fig, over_both, key_both, _ = patterns.view_d1(None, None, None, None, "layer", {**sel, "d1s": "both"}, key)
    assert fig is no_update and key_both is no_update and over_both[1:] == over
    density = over_both[0]
    assert density["type"] == "contour" and density["meta"] == {"layer": "density", "under": True}
    xy = data.get_index("syn").layouts["cls"].reshape(-1, 2)
    counts = np.zeros((F.DENSITY_BINS, F.DENSITY_BINS), int)  # a counting loop over the 36 heads' positions
    lo, hi = xy.min(0), xy.max(0)
    for x, y in xy:
        i, j = (min(int((v - a) / (b - a) * F.DENSITY_BINS), F.DENSITY_BINS - 1) for v, a, b in ((x, lo[0], hi[0]), (y, lo[1], hi[1])))
        counts[j, i] += 1
    assert np.array_equal(F.untyped(density["z"]), counts) and density["contours"]["showlines"] is False
    contours, _, key_contours, _ = patterns.view_d1(None, None, None, None, "layer", {**sel, "d1s": "contours"}, key)
    assert contours["data"][0]["type"] == "contour" and contours["data"][0]["contours"]["showlines"] is True
    assert key_contours != key
