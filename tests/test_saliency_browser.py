"""The Explorer's saliency panel (D6, issue 14) in a real (headless chromium) browser on a run of the
REAL default model with precomputed patch maps (HEADSCOPE_REAL_RUN=/work/runs/default reuses a built
one; see conftest.real_default).

Expected values come from the run's tables and plain references written here (scipy's Spearman
over the stored maps, the images table's P(true)), not from the panel's own code.
"""
import shutil

import numpy as np
import pytest

pytest.importorskip("selenium")
if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
    pytest.skip("browser tests need chromium and chromedriver", allow_module_level=True)

from dash.testing.wait import until  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from app import create_app  # noqa: E402
from test_app_browser import TIMEOUT, api_attention, choose_each, into_view, js, no_console_errors, record_server_errors, \
    settle, visit, wait_js  # noqa: E402

# SPEC "Patch attribution": the unit of each map on a classifier run (the colour bar's title)
UNITS = {"occlusion": "P(y) drop", "token_drop": "P(y) drop", "rollout": "rollout weight", "grad_rollout": "relevance"}
TITLES = {"occlusion": "occlusion", "token_drop": "token drop", "rollout": "attention rollout",
          "grad_rollout": "gradient rollout"}


@pytest.fixture(scope="module")
def target(real):
    """(run, maps {name: [gh, gw]}, image id, its images-table row, (layer, head)) of the 4th image: the
    run's stored maps when it was built with --patch-maps, else the engine's (which the panel computes
    online then)."""
    from analysis.runs.reader import open_run

    cache_dir, run = real
    r = open_run(cache_dir / run)
    row = r.images.iloc[3]
    maps = r.patch_maps(int(row.image_id))
    return run, maps if maps is not None else engine_maps(r, row), int(row.image_id), row, (11, 0)


def engine_maps(r, row, **kw) -> dict:
    """analysis.patch_maps of the run's model on the image of ``row`` (tests/test_patch_maps.py holds it
    to plain references)."""
    from analysis import patch_maps
    from analysis.datasets import open_image
    from analysis.models.adapter import model_from_manifest

    vit = model_from_manifest(r.model)
    return patch_maps(vit, vit.preprocess([open_image(row.path)])[0], int(row.label), **kw)


def show_saliency(dash_duo):
    """The saliency panel, scrolled into view; when the Explorer hides it behind a switch (an input
    whose value is 'saliency'), the switch is clicked first."""
    switch = dash_duo.find_elements("input[value=saliency]")
    if switch and not dash_duo.find_element("#sal-graph").is_displayed():
        dash_duo.driver.execute_script("arguments[0].click();", switch[0])
    until(lambda: dash_duo.find_element("#sal-graph").is_displayed(), timeout=TIMEOUT, msg="saliency panel shown")
    into_view(dash_duo, dash_duo.find_element("#sal-graph"))


def patch_point(dash_duo, graph_id, r, c):
    """Viewport (x, y) of the centre of heatmap cell (row r, column c) of ``graph_id``."""
    return js(dash_duo, graph_id, f"""(() => {{ const L = gd._fullLayout, b = gd.getBoundingClientRect();
        return [b.left + L.xaxis._offset + L.xaxis.l2p({c}), b.top + L.yaxis._offset + L.yaxis.l2p({r})]; }})()""")


def pointer(dash_duo, xy, click=False):
    actions = ActionBuilder(dash_duo.driver)
    actions.pointer_action.move_to_location(int(xy[0]), int(xy[1])).pause(0.4)
    if click:
        actions.pointer_action.click()
    actions.perform()


def spearman(a, b):
    """Spearman's rho over the patches (scipy, average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)


def test_saliency_panel_maps_agreement_hover_click_and_deletion(dash_duo, real, target):
    run, maps, image, row, (layer, head) = target
    assert set(maps) == set(UNITS)  # a classifier run: all four maps
    app = create_app(*real)
    server_errors = record_server_errors(app)
    visit(dash_duo, app, f"/?run={run}&image={image}&layer={layer}&head={head}")
    show_saliency(dash_duo)
    wait_js(dash_duo, "sal-graph", "gd.data.length", lambda n: bool(n), "map drawn", timeout=180)

    # every map: drawn over the image with its colour bar in its unit, its values on the patch grid
    select = Select(dash_duo.find_element("#sal-map"))
    assert {o.get_attribute("value") for o in select.options} - {""} == set(UNITS)  # "" = the placeholder
    for name in ("token_drop", "rollout", "grad_rollout", "occlusion"):
        select.select_by_value(name)
        wait_js(dash_duo, "sal-graph", "gd.layout.title.text", lambda t, n=name: bool(t) and t.startswith(TITLES[n]),
                f"map {name}")
        fig = js(dash_duo, "sal-graph", "[gd.data[0].colorbar.title.text, gd.layout.title.text, gd.layout.images.length,"
                                        " gd._fullData[0].z.map(r => Array.from(r))]")
        assert fig[0] == UNITS[name] and UNITS[name] in fig[1] and fig[2] == 1
        np.testing.assert_allclose(np.array(fig[3], float), maps[name], rtol=1e-5, atol=1e-6)
        no_console_errors(dash_duo)

    # occlusion with another baseline: computed now, the title says which, the values are the engine's
    from analysis.runs.reader import open_run

    baseline = Select(dash_duo.find_element("#sal-baseline"))
    baseline.select_by_value("blur")
    wait_js(dash_duo, "sal-graph", "gd.layout.title.text", lambda t: bool(t) and "occlusion · blurred" in t, "blur baseline")
    assert "computed now" in js(dash_duo, "sal-graph", "gd.layout.title.text")
    blurred = engine_maps(open_run(real[0] / run), row, maps=["occlusion"], occlusion_baseline="blur")
    np.testing.assert_allclose(np.array(js(dash_duo, "sal-graph", "gd._fullData[0].z.map(r => Array.from(r))"), float),
                               blurred["occlusion"], rtol=1e-5, atol=1e-6)
    baseline.select_by_value("mean")
    wait_js(dash_duo, "sal-graph", "gd.layout.title.text", lambda t: bool(t) and "occlusion · mean colour" in t, "mean baseline")

    # agreement: Spearman of every pair of maps
    names = js(dash_duo, "sal-agree", "gd.data[0].x")
    assert set(names) == set(UNITS)
    shown = js(dash_duo, "sal-agree", "gd.data[0].text")
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert shown[i][j] == f"{spearman(maps[a], maps[b]):.2f}", (a, b)

    # hover a patch: its value in every map
    gh, gw = maps["occlusion"].shape
    r, c = 2, 5
    pointer(dash_duo, patch_point(dash_duo, "sal-graph", r, c))
    until(lambda: dash_duo.find_elements("#sal-graph .hoverlayer .hovertext"), timeout=TIMEOUT, msg="hover label")
    text = dash_duo.find_element("#sal-graph .hoverlayer .hovertext").text
    assert f"patch {r * gw + c} (row {r}, col {c})" in text
    for name, m in maps.items():
        assert f"{name}: {float(m[r, c]):.4g}" in text, (name, text)

    # click it: it becomes the source token of D2 (and D3's hover state: the map frames it)
    before = dash_duo.find_element("#d2-tile-2 img").get_attribute("src")
    assert "attention from CLS" in dash_duo.find_element("#d2-tile-2 figcaption").text
    pointer(dash_duo, patch_point(dash_duo, "sal-graph", r, c), click=True)
    dash_duo.wait_for_contains_text("#d2-tile-2 figcaption", f"attention from patch {r * gw + c} (row {r}, col {c})",
                                    timeout=TIMEOUT)
    assert dash_duo.find_element("#d2-tile-2 img").get_attribute("src") != before
    wait_js(dash_duo, "sal-graph", "gd.layout.shapes.map(s => [s.x0, s.y0])",
            lambda s: s == [[c - 0.5, r - 0.5]], "the source patch framed")
    no_console_errors(dash_duo)

    # deletion curves: P(true) vs n for each map; n = 0 is the unpruned P(true) of the run table
    wait_js(dash_duo, "sal-deletion", "gd.data.length", lambda n: n == len(maps), "one curve per map", timeout=180)
    curves = js(dash_duo, "sal-deletion", "gd.data.map(t => [t.name, t.x, t.y])")
    assert {c[0] for c in curves} == set(maps)
    assert js(dash_duo, "sal-deletion", "gd.layout.yaxis.title.text") == "P(true class)"
    steps = curves[0][1]
    assert steps[0] == 0 and steps == sorted(steps) and len(set(steps)) == len(steps)
    for name, x, y in curves:
        assert x == steps and len(y) == len(steps)
        assert y[0] == pytest.approx(float(row.prob), abs=1e-4), name
        assert all(0 <= v <= 1 for v in y)
    # the slider's n: its marks are the curves' steps, moving it marks n on the curves
    handle = dash_duo.find_element("#sal-n [role=slider]")
    into_view(dash_duo, handle)
    until(lambda: handle.get_attribute("aria-valuemax") == str(steps[-1]), timeout=TIMEOUT, msg="slider max")
    from selenium.webdriver.common.keys import Keys

    handle.send_keys(Keys.ARROW_RIGHT)
    until(lambda: handle.get_attribute("aria-valuenow") == str(steps[1]), timeout=TIMEOUT, msg="one step right")
    wait_js(dash_duo, "sal-deletion", "gd.layout.shapes.map(s => s.x0)", lambda s: s == [steps[1]], "n marked")
    handle.send_keys(Keys.END)
    wait_js(dash_duo, "sal-deletion", "gd.layout.shapes.map(s => s.x0)", lambda s: s == [steps[-1]], "n at the end")
    settle(dash_duo)  # no request left for the server's stop to interrupt (a SystemExit warning in its thread)
    no_console_errors(dash_duo)
    assert server_errors == []


def test_c1_shows_the_head_saliency_alignment(dash_duo, real, target):
    """saliency_alignment is among C1's head properties on the real run and draws the image's values."""
    from analysis.metrics import registry
    from app import config, data

    run, maps, image, _, (layer, head) = target
    config.configure(*real)
    index = data.get_index(run)
    pos = index.pos(image)
    if "saliency_alignment" not in index.properties:
        pytest.skip(f"run {run} was built without --patch-maps (saliency_alignment is a stored metric)")
    visit(dash_duo, create_app(*real), f"/?run={run}&image={image}&layer={layer}&head={head}")
    wait_js(dash_duo, "c1-graph", "gd.data.length", lambda n: bool(n), "C1 drawn", timeout=180)
    title = registry.get_metric("saliency_alignment").title
    choose_each(dash_duo, "c1-metric", "c1-graph", "gd.layout.yaxis.title.text", ["saliency_alignment"],
                lambda _: title)
    settle(dash_duo)
    ys = js(dash_duo, "c1-graph", "gd.data[0].y")
    np.testing.assert_allclose(np.array(ys, float), index.values("saliency_alignment")[pos], rtol=1e-5, atol=1e-6)
    # the selected head's value is the Spearman of its CLS row over the patches against occlusion
    cls_row = api_attention(dash_duo, run, image, layer, head)[0, 1:]
    assert ys[layer * index.H + head] == pytest.approx(spearman(cls_row, maps["occlusion"]), abs=0.02)
    wait_js(dash_duo, "c3-graph", "gd.layout.xaxis.title.text", lambda t: t == title, "C3 follows")
    no_console_errors(dash_duo)


def test_screenshot_saliency_panel_on_the_photos_run(dash_duo, tmp_path):
    """The panel on the default backbone's photos run (HEADSCOPE_PHOTOS_RUN=/work/runs/photos, built
    with --patch-maps): three maps, and the note that says why gradient rollout is missing.
    HEADSCOPE_SCREENSHOT=1 writes assets/screenshot_saliency.png."""
    import os
    from pathlib import Path

    from analysis.runs.reader import open_run

    photos = os.environ.get("HEADSCOPE_PHOTOS_RUN")
    if not photos:
        pytest.skip("set HEADSCOPE_PHOTOS_RUN to a photos run built with --patch-maps")
    path = Path(photos)
    r = open_run(path)
    image = int(r.images.image_id[r.images.path == "skimage:chelsea"].iloc[0]) if \
        (r.images.path == "skimage:chelsea").any() else int(r.images.image_id.iloc[0])
    visit(dash_duo, create_app(path.parent, path.name), f"/?run={path.name}&image={image}&layer=11&head=0")
    show_saliency(dash_duo)
    wait_js(dash_duo, "sal-graph", "gd.layout.title.text", lambda t: bool(t) and t.startswith("occlusion"),
            "occlusion drawn", timeout=180)
    assert js(dash_duo, "sal-graph", "gd.data[0].colorbar.title.text") == "cosine distance"
    options = {o.get_attribute("value") for o in Select(dash_duo.find_element("#sal-map")).options} - {""}
    assert options == {"occlusion", "token_drop", "rollout"}
    dash_duo.wait_for_contains_text("#sal-msg", "gradient rollout", timeout=TIMEOUT)
    wait_js(dash_duo, "sal-deletion", "gd.data.length", lambda n: n == 3, "deletion curves", timeout=180)
    assert js(dash_duo, "sal-deletion", "gd.layout.yaxis.title.text") == "embedding distance to the unpruned"
    settle(dash_duo)
    panel = into_view(dash_duo, dash_duo.find_element("#saliency-panel"))
    out = tmp_path / "screenshot_saliency.png"
    assert panel.screenshot(str(out))
    no_console_errors(dash_duo)
    if os.environ.get("HEADSCOPE_SCREENSHOT"):
        shutil.copy(out, Path(__file__).resolve().parent.parent / "assets" / "screenshot_saliency.png")
