"""The one gate in front of every Dash callback request (``POST /_dash-update-component``).

The browser sends each callback its inputs and states as JSON; anyone can forge that body. Before
Dash runs a callback, ``guard`` checks that the body is a known callback with exactly its declared
inputs and states, and that every value has the type and range the pages expect (``RULES``, one
entry per component property). Malformed requests get HTTP 400 with a one-line reason and no
traceback; bodies above ``max_request_bytes()`` get 413 before they are read.
"""
from __future__ import annotations

import logging
import math
import os

from flask import jsonify, request

from analysis.metrics import registry
from analysis.metrics.patch_maps import OCCLUSION_BASELINES
from analysis.models.pruning import MODE_LABELS
from analysis.values import strict_int

from . import config, state
from .panels import D_PANELS
from .state import MAX_HEADS, MAX_INDEX, MAX_RUNS, MAX_URL, STATE, STATE_PARTS

MAX_REQUEST_BYTES = 8 * 1024 * 1024  # default cap on a request body (HEADSCOPE_MAX_REQUEST_BYTES)
MAX_POINTS = 1_000_000               # points in one selection / hover event
log = logging.getLogger("headscope.callbacks")


class Invalid(ValueError):
    """A callback value that the pages would not accept."""


def max_request_bytes() -> int:
    """$HEADSCOPE_MAX_REQUEST_BYTES, default 8 MiB."""
    text = os.environ.get("HEADSCOPE_MAX_REQUEST_BYTES", "").strip()
    try:
        value = strict_int(text) if text else MAX_REQUEST_BYTES
    except ValueError:
        value = 0
    if value < 1024:
        raise ValueError(f"HEADSCOPE_MAX_REQUEST_BYTES must be a number of bytes >= 1024, got {text!r}.")
    return value


# ---- value rules: each raises Invalid or returns None ---------------------------------------
def _int(v, lo=-(2 ** 31), hi=2 ** 31 - 1, what="an integer"):
    try:
        n = strict_int(v)
    except ValueError:
        raise Invalid(f"expected {what}, got {type(v).__name__}") from None
    if not lo <= n <= hi:
        raise Invalid(f"expected {what} within {lo}..{hi}, got {n}")
    return n


def _opt(rule):
    return lambda v: None if v is None else rule(v)


def _str(max_len=2048):
    def check(v):
        if not isinstance(v, str) or len(v) > max_len:
            raise Invalid(f"expected a string of at most {max_len} characters")
    return check


def _choice(*options):
    def check(v):
        if v not in options:
            raise Invalid(f"expected one of {', '.join(map(repr, options))}")
    return check


def _d1_colour(v):
    """D1's colouring: "layer" or a registered category metric (app/explorer/patterns.py)."""
    _choice("layer", *(m.name for m in registry.metrics("image_head", value="category")))(v)


def _number(lo=-math.inf, hi=math.inf):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise Invalid(f"expected a number within {lo}..{hi}")
    return check


def _state(v):
    """The view state (app/state.py STATE) or a part of it (the Explorer's k-* stores): the
    declaration's own check, the one the URL parser's output passes."""
    try:
        state.check_state(v)
    except state.Invalid as err:
        raise Invalid(str(err)) from None


def _head_keys(v):
    """The head-set chip box's value: ["layer:head", ...]."""
    if not isinstance(v, list) or len(v) > MAX_HEADS:
        raise Invalid(f"expected a list of at most {MAX_HEADS} 'layer:head'")
    for key in v:
        parts = key.split(":") if isinstance(key, str) and len(key) <= 12 else []
        if len(parts) != 2:
            raise Invalid("expected 'layer:head'")
        for x in parts:
            _int(x, 0, MAX_INDEX, "a layer / head")


def _ints(*lengths):
    """customdata: a list of ``lengths`` integers (e.g. [layer, head], D1's [image id, layer, head])."""
    def check(v):
        if not (isinstance(v, list) and len(v) in lengths):
            raise Invalid(f"expected a list of {' or '.join(map(str, lengths))} integers")
        for x in v:
            _int(x)
    return check


def _overlay_traces(v):
    """A's or D1's selection layer (at most 4 small traces: D1's density, the head's points, the image's,
    the ring; drawn in the browser, never run on the server)."""
    if not (isinstance(v, list) and len(v) <= 4 and all(isinstance(t, dict) for t in v)):
        raise Invalid("expected a list of at most 4 traces")


def _popped(v):
    """assets/url.js after Back/Forward: {"search": the URL's query string, "at": ms} (any length the
    browser allows: the parser reads the first MAX_QUERY characters and says so)."""
    if not (isinstance(v, dict) and set(v) <= {"search", "at"} and isinstance(v.get("search"), str)
            and len(v["search"]) <= MAX_URL):
        raise Invalid("expected {search: the query string, at: a time}")


def _parsed(v):
    """app/server.py parse_url's record of the URL it parsed: {"from": query string, "query": canonical}."""
    if not (isinstance(v, dict) and set(v) == {"from", "query"} and all(isinstance(x, str) and len(x) <= MAX_URL
                                                                       for x in v.values())):
        raise Invalid("expected {from: the query string parsed, query: the canonical one}")


def _numbers(v):
    """A number or a short list of numbers (D5's bar edges)."""
    for x in (v if isinstance(v, list) and 0 < len(v) <= 4 else [v]):
        _number()(x)


def _relayout(v):
    """Plotly relayoutData: a flat object of numbers, strings, booleans and short lists."""
    if not isinstance(v, dict) or len(v) > 64:
        raise Invalid("expected a relayout object")
    for k, x in v.items():
        if not isinstance(k, str) or len(k) > 128:
            raise Invalid("expected short property names")
        if isinstance(x, (int, float, str, bool)) or x is None:
            continue
        if not (isinstance(x, list) and len(x) <= 8 and all(isinstance(y, (int, float, str)) for y in x)):
            raise Invalid(f"{k}: expected a number, string or short list")


def _points(customdata=None, need=(), nonempty=True):
    """Plotly event data {"points": [{...}, ...]}: customdata checked by ``customdata``; ``need``:
    point fields that must be present (integers, or a dict for bbox)."""
    def check(v):
        points = v.get("points") if isinstance(v, dict) else None
        if not isinstance(points, list) or len(points) > MAX_POINTS or (nonempty and not points):
            raise Invalid("expected {points: [...]} with at least one point")
        for p in points:
            if not isinstance(p, dict):
                raise Invalid("expected each point to be an object")
            for k in need:
                if k == "bbox":
                    if not isinstance(p.get("bbox"), dict):
                        raise Invalid("expected a bbox in each hovered point")
                else:
                    _int(p.get(k), 0, 2 ** 31 - 1, f"point field {k}")
            for k in ("curveNumber", "pointIndex", "pointNumber"):
                if k in p and not isinstance(p[k], list):
                    _opt(lambda x: _int(x, 0))(p[k])
            if customdata is not None:
                try:
                    customdata(p.get("customdata"))
                except Invalid as err:
                    raise Invalid(f"customdata: {err}") from None
    return _opt(check)


def _d3_token(v):
    if v is not None and not (isinstance(v, list) and len(v) == 2 and v[0] in (0, 1)):
        raise Invalid("expected [0 or 1, token]")
    if v is not None:
        _int(v[1], 0)


_image_id = _opt(lambda v: _int(v, what="an image id"))
_head_cd = _opt(_ints(2))
_clicks = _opt(lambda v: _int(v, 0))

def _dict(v):
    if not isinstance(v, dict):
        raise Invalid("expected an object")


def _run_names(v):
    if not isinstance(v, list) or len(v) > MAX_RUNS:
        raise Invalid(f"expected a list of at most {MAX_RUNS} run names")
    for name in v:
        if config.name_problem(name):
            raise Invalid(config.name_problem(name))


def _circuit_exact(v):
    """The circuit panel's record of what its exact values were computed for (app/panels/circuit.py)."""
    if not isinstance(v, dict) or not set(v) <= {"image", "layer", "head", "source", "via", "k", "thr"}:
        raise Invalid("expected {image, layer, head, source, via, k, thr}")
    for k in ("image", "layer", "head"):
        _opt(_int)(v.get(k))
    _opt(_choice("image", "mean"))(v.get("source"))
    _opt(_choice("qkv", "q", "k", "v"))(v.get("via"))
    for k in ("k", "thr"):
        _opt(_number())(v.get(k))


def _view_record(v):
    """A view model's record of what the browser shows (app/views.py): {view: {input: fingerprint}}."""
    if not isinstance(v, dict) or len(v) > 32:
        raise Invalid("expected {view: {input: fingerprint}}")
    for name, inputs in v.items():
        if not (isinstance(name, str) and len(name) <= 64 and isinstance(inputs, dict) and len(inputs) <= 32):
            raise Invalid("expected {view: {input: fingerprint}}")
        for key, fp in inputs.items():
            if not (isinstance(key, str) and len(key) <= 128 and isinstance(fp, str) and len(fp) <= 32):
                raise Invalid("expected {view: {input: fingerprint}}")


def _flags(*options):
    def check(v):
        if not isinstance(v, list) or not set(v) <= set(options):
            raise Invalid(f"expected a list of {', '.join(map(repr, options))}")
    return check


RULES = {
    # Dash's page router (use_pages)
    ("_pages_location", "pathname"): _opt(_str(MAX_URL)),
    ("_pages_location", "search"): _opt(_str(MAX_URL)),  # long queries reach the parser (app/state.py)
    ("_pages_store", "data"): _opt(_dict),
    # the shell and the pages
    ("url", "search"): _opt(_str(MAX_URL)),
    ("url", "pathname"): _opt(_str(MAX_URL)),
    ("url-popped", "data"): _opt(_popped),
    ("url-parsed", "data"): _opt(_parsed),
    ("sel", "data"): _opt(_state),
    ("metric", "value"): _opt(_str(64)),
    ("heads-metric", "value"): _opt(_str(64)),
    ("c1-metric", "value"): _opt(_str(64)),
    ("c2-metric", "value"): _opt(_str(64)),
    ("curves-metric", "value"): _opt(_str(64)),
    ("heads-class-metric", "value"): _opt(_str(64)),
    ("heads-class-images", "value"): _opt(_choice("all", "correct", "wrong")),
    ("compare-runs", "value"): _opt(_run_names),
    ("compare-metric", "value"): _opt(_str(64)),
    ("compare-layer", "value"): _opt(lambda v: _int(v, 0, 4096, "a layer")),
    ("compare-head", "value"): _opt(lambda v: _int(v, 0, 4096, "a head")),
    ("q-slider", "value"): _opt(_number(-1, 2)),
    ("d1-kind", "value"): _opt(_choice(*STATE["d1"].choices)),
    ("d1-style", "value"): _opt(_choice(*STATE["d1s"].choices)),
    ("d1-key", "data"): _opt(_str(512)),
    ("d1-selection", "data"): _opt(_overlay_traces),
    ("a-key", "data"): _opt(_str(512)),
    ("a-selection", "data"): _opt(_overlay_traces),
    # the head-set panels (app/panels/head_sets.py)
    ("k-heads", "data"): _opt(_state),
    ("hs-view", "value"): _opt(_choice("b23", "set", "pairs")),
    ("hs-pin", "n_clicks"): _clicks,
    ("hs-clear", "n_clicks"): _clicks,
    ("hs-set", "value"): _opt(_head_keys),
    ("hs-k", "value"): _opt(_number(2, 16)),
    ("hs-pairs-from", "value"): _opt(_choice("top", "set")),
    ("hs-pairs-graph", "clickData"): _points(_opt(_ints(4))),
    ("b1-overlay", "value"): _opt(_flags("taylor", "mean")),
    ("image-box", "value"): _opt(_number()),  # select_image takes only an id the state accepts
    ("image-box", "n_submit"): _clicks,
    ("image-go", "n_clicks"): _clicks,
    ("a-graph", "clickData"): _points(_image_id),
    ("a-graph", "hoverData"): _points(_image_id, need=("bbox",)),
    ("a-graph", "selectedData"): _points(_image_id, nonempty=False),
    ("b1-graph", "clickData"): _points(_head_cd),
    ("c1-graph", "clickData"): _points(_head_cd),
    ("d1-graph", "clickData"): _points(_opt(_ints(2, 3))),
    ("head-click", "data"): _opt(_ints(3)),  # [image id, layer, head] of a held click on D1's background
    ("head-pick", "data"): _opt(_ints(2)),  # [layer, head] of a held click in B1 / C1
    ("heads-map", "clickData"): _points(need=("x", "y")),
    ("heads-effects", "clickData"): _points(_opt(_ints(2))),
    ("b2-graph", "clickData"): _points(lambda v: _int(v, 0, len(MODE_LABELS) - 1, "a pruning mode")),
    ("d5-graph", "clickData"): _points(_numbers),
    ("d5-graph", "relayoutData"): _opt(_relayout),
    ("d3-graph", "hoverData"): _points(_d3_token),
    ("sal-hover", "data"): _points(_d3_token),  # D3's hover, while D6 shows
    # the Explorer's controls and its per-part state stores
    ("goto-layer", "value"): _opt(lambda v: _int(v, 0, MAX_INDEX, "a layer")),
    ("goto-head", "value"): _opt(lambda v: _int(v, 0, MAX_INDEX, "a head")),
    ("set-clear", "n_clicks"): _clicks,
    ("a-color", "value"): _opt(_choice(*STATE["color"].choices)),
    ("fig-format", "value"): _opt(_choice("png", "svg")),
    ("scale", "value"): _opt(_choice(*STATE["scale"].choices)),
    ("bins", "value"): _opt(_choice(*STATE["bins"].choices)),
    ("thr-kind", "value"): _opt(_choice("q", "a")),
    ("thr-abs", "value"): _opt(_number(0, 1)),
    ("thr-current", "data"): _opt(_number()),
    ("d1-color", "value"): _opt(_d1_colour),
    ("band-scope", "value"): _opt(_choice(*STATE["scope"].choices)),
    ("d-panel", "value"): _opt(_choice(*D_PANELS)),
    ("d2-own", "value"): _opt(_flags("own")),  # D2: each mask to its own max (app/explorer/patterns.py)
    # D6, the saliency panel (app/panels/saliency.py)
    ("sal-map", "value"): _opt(_choice("occlusion", "token_drop", "rollout", "grad_rollout")),
    ("sal-baseline", "value"): _opt(_choice(*OCCLUSION_BASELINES)),
    ("sal-n", "value"): _opt(lambda v: _int(v, 0, 1 << 20, "a patch count")),
    ("sal-graph", "clickData"): _points(_opt(lambda v: _int(v, 0, 1 << 20, "a patch index"))),
    **{(f"k-{k}", "data"): _opt(_state) for k in STATE_PARTS},
    **{(f"vm-{k}", "data"): _opt(_view_record) for k in ("cached", "online")},  # the view models' records
    # stores that follow k-* parts while a panel shows (app/panels/: a hidden panel costs no request)
    # the circuit and sinks panels (app/panels/circuit.py, sinks.py)
    ("circ-source", "value"): _opt(_choice("image", "mean")),
    ("circ-via", "value"): _opt(_choice("qkv", "q", "k", "v")),
    ("circ-k", "value"): _opt(_number(1, 64)),
    ("circ-thr", "value"): _opt(_number(0)),
    ("circ-exact-btn", "n_clicks"): _clicks,
    ("circ-exact", "data"): _opt(_circuit_exact),
    ("circ-graph", "clickData"): _points(_opt(_ints(2, 4))),
    ("sink-f", "value"): _opt(_number(0, 1000)),
    ("sink-layer", "value"): _opt(_str(8)),
    ("sink-scale", "value"): _opt(_choice("ratio", "norm")),
    **{(store, "data"): _opt(_state) for store in ("sal-image", "hs-set-key", "hs-pairs-key", "circ-key", "sink-key")},
    **{(f"dl-{k}", "n_clicks"): _clicks for k in ("att-csv", "att-parquet", "heads-csv", "heads-parquet", "prune-csv", "report")},
}


# ---- the payload ------------------------------------------------------------------------------
def _items(sent, declared, kind: str) -> list:
    if not isinstance(sent, list) or len(sent) != len(declared):
        raise Invalid(f"expected {len(declared)} {kind}")
    for item, want in zip(sent, declared):
        if not isinstance(item, dict) or item.get("id") != want["id"] or item.get("property") != want["property"]:
            raise Invalid(f"{kind} do not match the callback's ({want['id']}.{want['property']} expected)")
    return sent


def check_payload(body, callback_map: dict) -> str | None:
    """Why a callback request body is malformed, or None when Dash may run it."""
    try:
        if not isinstance(body, dict):
            raise Invalid("the body is not a JSON object")
        output = body.get("output")
        if not isinstance(output, str) or output not in callback_map:
            raise Invalid("unknown callback output")
        spec = callback_map[output]
        if not isinstance(body.get("outputs"), (dict, list)):
            raise Invalid("outputs missing")
        items = _items(body.get("inputs"), spec["inputs"], "inputs") + _items(body.get("state", []), spec["state"], "states")
        changed = body.get("changedPropIds", [])
        names = {f"{d['id']}.{d['property']}" for d in spec["inputs"]}
        if not isinstance(changed, list) or not all(isinstance(c, str) and c in names for c in changed):
            raise Invalid("changedPropIds name properties that are not inputs of this callback")
        for item in items:
            rule = RULES.get((item["id"], item["property"]))
            if rule is None:
                raise Invalid(f"{item['id']}.{item['property']} has no validation rule")
            try:
                rule(item.get("value"))
            except Invalid as err:
                raise Invalid(f"{item['id']}.{item['property']}: {err}") from None
    except Invalid as err:
        return str(err).rstrip(".")
    return None


def guard(app) -> None:
    """Cap request bodies and check every callback request before Dash dispatches it."""
    server = app.server
    server.config["MAX_CONTENT_LENGTH"] = max_request_bytes()
    route = app.config.routes_pathname_prefix + "_dash-update-component"

    @server.before_request
    def check_callback_request():
        if request.path != route or request.method != "POST":
            return None
        problem = check_payload(request.get_json(silent=True), app.callback_map)
        if problem is None:
            return None
        log.info("refused a malformed callback request: %s", problem)
        return jsonify(error=f"Malformed callback request: {problem}."), 400
