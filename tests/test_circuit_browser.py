"""The circuit and sinks panels of view D and the Heads page's direct-vs-total scatter in a real
(headless chromium) browser, on a run of the REAL default model (HEADSCOPE_REAL_RUN; see
conftest.real_default). Expected values come from the engine's public API on the run's model
(head_paths, held to autograd and full forwards in tests/test_circuits.py) and the run's tables.
"""
import shutil

import numpy as np
import pytest

pytest.importorskip("selenium")
if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
    pytest.skip("browser tests need chromium and chromedriver", allow_module_level=True)

from dash.testing.wait import until  # noqa: E402

from app import create_app  # noqa: E402
from app.panels import circuit  # noqa: E402
from test_app_browser import TIMEOUT, into_view, js, no_console_errors, query, record_server_errors, settle, \
    visit, wait_js  # noqa: E402
from test_saliency_browser import pointer  # noqa: E402

IMAGE, LAYER, HEAD = 3, 11, 4  # the 4th image of the run; the paper's case study's head


@pytest.fixture(scope="module")
def model(real):
    """(run, vit, image [3, H, W], label) of the run's 4th image."""
    from analysis.datasets import open_image
    from analysis.models.adapter import model_from_manifest
    from analysis.runs.reader import open_run

    cache_dir, run = real
    r = open_run(cache_dir / run)
    row = r.images.iloc[IMAGE]
    vit = model_from_manifest(r.model)
    return run, r, vit, vit.preprocess([open_image(row.path)])[0], int(row.label), int(row.image_id)


def show(dash_duo, panel, graph_id):
    """View D's panel ``panel`` (its switch clicked), its graph scrolled into view and drawn."""
    dash_duo.driver.execute_script("arguments[0].click();", dash_duo.find_element(f"input[value={panel}]"))
    until(lambda: dash_duo.find_element(f"#{graph_id}").is_displayed(), timeout=TIMEOUT, msg=f"{panel} shown")
    into_view(dash_duo, dash_duo.find_element(f"#{graph_id}"))
    wait_js(dash_duo, graph_id, "gd.data.length", lambda n: bool(n), f"{graph_id} drawn", timeout=180)


def point_xy(dash_duo, graph_id, x, y):
    """Viewport (x, y) of the data point (x, y) of ``graph_id``."""
    return js(dash_duo, graph_id, f"""(() => {{ const L = gd._fullLayout, b = gd.getBoundingClientRect();
        return [b.left + L.xaxis._offset + L.xaxis.l2p({x}), b.top + L.yaxis._offset + L.yaxis.l2p({y})]; }})()""")


def shown_edges(dash_duo):
    """[[a_layer, a_head, b_layer, b_head], ...] and hover texts of the drawn edges' markers."""
    return js(dash_duo, "circ-graph", "(() => { const t = gd.data.find(t => t.name === 'edges');"
                                      " return t ? [t.customdata, t.text] : [[], []]; })()")


def eap_top(vit, image, label, via, k=20):
    from analysis import head_paths

    df = head_paths(vit, image, label, via=via, method="eap")
    df = df[df.path_logit_eap != 0]
    df = df.reindex(df.path_logit_eap.abs().sort_values(ascending=False, kind="stable").index)[:k]
    return [[int(v) for v in r] for r in df.iloc[:, :4].to_numpy()], df.path_logit_eap.to_numpy()


def test_circuit_view_edges_via_exact_values_and_clicks(dash_duo, real, model):
    from analysis import head_paths

    run, _, vit, image, label, image_id = model
    app = create_app(*real)
    server_errors = record_server_errors(app)
    visit(dash_duo, app, f"/?run={run}&image={image_id}&layer={LAYER}&head={HEAD}")
    show(dash_duo, "circuit", "circ-graph")
    wait_js(dash_duo, "circ-graph", "gd.layout.title.text", lambda t: bool(t) and "APPROXIMATE" in t, "EAP edges",
            timeout=180)

    # the top 20 edges by |path_logit_eap| via QKV, as the engine ranks them, labelled approximate
    edges, texts = shown_edges(dash_duo)
    want, values = eap_top(vit, image, label, "qkv")
    assert edges == want and all("APPROXIMATE" in t for t in texts)
    assert texts[0].endswith(f"{values[0]:.4g}")

    # via Q: other edges, the engine's for Q
    dash_duo.driver.execute_script("arguments[0].click();", dash_duo.find_element("#circ-via input[value=q]"))
    wait_js(dash_duo, "circ-graph", "gd.layout.title.text", lambda t: bool(t) and "via Q:" in t, "via Q")
    edges_q, _ = shown_edges(dash_duo)
    assert edges_q == eap_top(vit, image, label, "q")[0] and edges_q != edges

    # exact values for the shown edges: path patching, relabelled
    dash_duo.find_element("#circ-exact-btn").click()
    wait_js(dash_duo, "circ-graph", "gd.layout.title.text", lambda t: bool(t) and "exact, path patching" in t,
            "exact values", timeout=180)
    edges_exact, texts_exact = shown_edges(dash_duo)
    assert edges_exact == edges_q and all("path_logit (exact, path patching)" in t for t in texts_exact)
    exact = head_paths(vit, image, label, via="q", method="exact", edges=[(e[:2], e[2:]) for e in edges_q[:3]])
    for text, value in zip(texts_exact, exact.path_logit):
        assert float(text.rsplit(": ", 1)[1]) == pytest.approx(value, rel=2e-3, abs=1e-4)
    no_console_errors(dash_duo)

    # a click on a node selects that head everywhere (the URL, B1's ring)
    settle(dash_duo)
    pointer(dash_duo, point_xy(dash_duo, "circ-graph", 3, 2), click=True)
    until(lambda: (query(dash_duo).get("layer"), query(dash_duo).get("head")) == ("3", "2"), timeout=TIMEOUT,
          msg="node click selects L3H2")
    wait_js(dash_duo, "circ-graph", "gd.data[gd.data.length - 1].x", lambda x: x == [3], "the node ringed")

    # a click on an edge's marker makes the pair the head set
    settle(dash_duo)
    a_l, a_h, b_l, b_h = edges_exact[0]
    pointer(dash_duo, point_xy(dash_duo, "circ-graph", circuit.handle(a_l, b_l), circuit.handle(a_h, b_h)), click=True)
    pair = ",".join(f"{l}:{h}" for l, h in sorted([(a_l, a_h), (b_l, b_h)]))
    until(lambda: query(dash_duo).get("heads") == pair, timeout=TIMEOUT, msg=f"edge click sets heads={pair}")
    no_console_errors(dash_duo)
    assert server_errors == []


def test_sinks_view_and_heads_scatter(dash_duo, real, model):
    run, r, vit, _, _, image_id = model
    if not (r.has_token_norms and "direct_logit" in r.metrics):
        pytest.skip(f"run {run} was built before the v3 metrics (token norms, direct_logit)")
    app = create_app(*real)
    visit(dash_duo, app, f"/?run={run}&image={image_id}&layer={LAYER}&head={HEAD}")
    show(dash_duo, "sinks", "sink-norms")
    norms = r.token_norms(image_id)
    T = vit.num_prefix_tokens
    z = np.array(js(dash_duo, "sink-norms", "gd.data[0].z"), float)
    np.testing.assert_allclose(z, norms / np.median(norms[:, T:], axis=1, keepdims=True), rtol=1e-4)
    assert "from the run" in js(dash_duo, "sink-norms", "gd.layout.title.text")
    wait_js(dash_duo, "sink-image", "gd.layout.images.length", lambda n: n == 1, "norms over the image")
    text = dash_duo.find_element("#sink-head").text
    assert f"L{LAYER}H{HEAD}" in text and f"prefix_share {r.dense('prefix_share')[IMAGE, LAYER, HEAD]:.3f}" in text
    no_console_errors(dash_duo)

    # the Heads page: run-mean direct vs total effect, the regions named, a click selects the head
    dash_duo.wait_for_page(f"{dash_duo.server_url}/heads?run={run}", timeout=TIMEOUT)
    wait_js(dash_duo, "heads-effects", "gd.data.length", lambda n: bool(n), "scatter drawn")
    names = js(dash_duo, "heads-effects", "gd.data.map(t => t.name)")
    assert {"acts directly", "through later heads", "cancels"} <= set(names)
    into_view(dash_duo, dash_duo.find_element("#heads-effects"))
    points = js(dash_duo, "heads-effects", "gd.data.filter(t => t.customdata).flatMap(t => t.customdata.map("
                                           "(cd, i) => [cd, t.x[i], t.y[i]]))")
    assert len(points) == r.L * r.H
    for (l, h), x, y in points:
        assert x == pytest.approx(np.nanmean(r.dense("logit_drop")[:, l, h]), rel=1e-4, abs=1e-7)
        assert y == pytest.approx(np.nanmean(r.dense("direct_logit")[:, l, h]), rel=1e-4, abs=1e-7)
    head, x, y = max(points, key=lambda p: abs(p[1]) + abs(p[2]))  # the farthest out: no neighbour under the pointer
    settle(dash_duo)
    pointer(dash_duo, point_xy(dash_duo, "heads-effects", x, y), click=True)
    until(lambda: "layer" in query(dash_duo), timeout=TIMEOUT, msg="scatter click selects a head")
    assert (query(dash_duo)["layer"], query(dash_duo).get("head")) == (str(head[0]), str(head[1]))
    no_console_errors(dash_duo)
