"""The Explorer's view models (app/views.py ViewModel): one request per state change that computes
only the views whose inputs differ from what the browser shows, with the views' own functions and
declarations."""
from __future__ import annotations

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
