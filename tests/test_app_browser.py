"""The dashboard in a real (headless chromium) browser via dash[testing]'s dash_duo.

Runs: ``tiny`` is a synthetic run whose manifest names a random timm ``test_vit`` saved as
safetensors and real PNG images, so the online views (B2/B3, D2-D5) compute for real;
``nomodel`` has no loadable model (online queries fail); ``old`` was built with an older schema
and ``unfinished`` has not finished building.

test_every_page_on_a_real_default_run and test_screenshot_explorer use a run the real build made of
the real default model: cache/default when it exists, else a 30-image default run built once here;
HEADSCOPE_SCREENSHOT=1 makes the screenshot test write assets/screenshot_explorer.png.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_synthetic_cache import make_run  # noqa: E402

pytest.importorskip("selenium")
if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
    pytest.skip("browser tests need chromium and chromedriver", allow_module_level=True)

from dash.testing.wait import until  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from app import create_app  # noqa: E402

TIMEOUT = 60  # generous: CI machines are small and the first online query loads a model


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("app-cache")
    make_run(root / "tiny", n_images=40, n_classes=10, model="test_vit", img_size=96, seed=0)
    make_run(root / "nomodel", n_images=30, layers=4, heads=3, grid=5, n_classes=5, seed=2)
    for name, change in (("old", {"schema_version": 0}), ("unfinished", {"status": "building"})):
        run = make_run(root / name, n_images=4, layers=2, heads=2, grid=3, n_classes=2, seed=3)
        mf = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**mf, **change}))
    return root



@pytest.fixture
def app(cache):
    return create_app(cache, "tiny")


# ---- helpers -----------------------------------------------------------------------------------
def visit(dash_duo, app, path="/"):
    dash_duo.start_server(app)
    if path != "/":
        dash_duo.wait_for_page(dash_duo.server_url + path, timeout=TIMEOUT)
    dash_duo.wait_for_element("#sel-summary, .runs-table, .help-page, #heads-map", timeout=TIMEOUT)


def js(dash_duo, graph_id, expr):
    """Evaluate ``expr`` with ``gd`` = the plotly graph div of dcc.Graph ``graph_id``."""
    return dash_duo.driver.execute_script(
        f"const gd = document.querySelector('#{graph_id} .js-plotly-plot');"
        f"if (!gd || !gd.data) return null; return ({expr});")


def wait_js(dash_duo, graph_id, expr, check, msg, timeout=TIMEOUT):
    return until(lambda: check(js(dash_duo, graph_id, expr)), timeout=timeout, msg=f"{graph_id}: {msg}")


def n_traces(dash_duo, graph_id):
    return js(dash_duo, graph_id, "gd.data.length")


def segments(dash_duo):
    return js(dash_duo, "d3-graph",
              "gd.data.filter(t => t.mode === 'lines').reduce((s, t) => s + (t.meta ? t.meta.segments : 0), 0)")


def query(dash_duo):
    return {k: v[0] for k, v in parse_qs(urlsplit(dash_duo.driver.current_url).query).items()}


def click(dash_duo, selector):
    el = dash_duo.wait_for_element(selector, timeout=TIMEOUT)
    ActionChains(dash_duo.driver).move_to_element(el).pause(0.3).click().perform()


def no_console_errors(dash_duo):
    errors = [e for e in dash_duo.get_logs() if e.get("level") == "SEVERE"]
    assert errors == [], errors


def record_server_errors(app) -> list[str]:
    """Every HTTP 5xx response and unhandled exception of the app's Flask server, as it happens."""
    from flask import got_request_exception, request

    errors = []

    @app.server.after_request
    def _status(response):
        if response.status_code >= 500:
            errors.append(f"HTTP {response.status_code} {request.path}")
        return response

    def _exception(sender, exception, **_):
        errors.append(f"{type(exception).__name__}: {exception}")

    got_request_exception.connect(_exception, app.server, weak=False)
    return errors


# ---- tests --------------------------------------------------------------------------------------
def test_every_page_loads_without_console_errors(dash_duo, app):
    visit(dash_duo, app, "/")
    dash_duo.wait_for_element("#a-graph .scatterlayer .trace .point", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#sel-summary", "No image selected", timeout=TIMEOUT)
    no_console_errors(dash_duo)
    for nav, marker, text in (("#nav-heads", "#heads-table", "rank"), ("#nav-runs", ".runs-table", "tiny"),
                              ("#nav-help", ".help-page", "Pruning a head"), ("#nav-explorer", "#a-graph", None)):
        dash_duo.find_element(nav).click()
        dash_duo.wait_for_element(marker, timeout=TIMEOUT)
        if text:
            dash_duo.wait_for_contains_text(marker, text, timeout=TIMEOUT)
        no_console_errors(dash_duo)
    dash_duo.find_element("#nav-runs").click()
    dash_duo.wait_for_contains_text(".runs-table", "schema v0", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text(".runs-table", "has not finished", timeout=TIMEOUT)
    assert "test_vit" in dash_duo.find_element(".runs-table").text
    no_console_errors(dash_duo)


def test_clicking_an_image_in_a_updates_b1_c1_d1(dash_duo, app):
    visit(dash_duo, app, "/")
    dash_duo.wait_for_element("#a-graph .scatterlayer .trace .point", timeout=TIMEOUT)
    wait_js(dash_duo, "b1-graph", "gd.data.length", lambda n: n == 3, "mean and band only")
    wait_js(dash_duo, "d1-graph", "gd.data[2] ? gd.data[2].x.length : -1", lambda n: n == 0, "no overlay yet")
    # hovering an image shows its thumbnail, label, prediction and probability
    point = dash_duo.find_element("#a-graph .scatterlayer .trace:nth-of-type(3) .point")
    ActionChains(dash_duo.driver).move_to_element(point).pause(0.5).perform()
    dash_duo.wait_for_element("#a-tooltip img.tip-thumb", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#a-tooltip", "predicted:", timeout=TIMEOUT)
    click(dash_duo, "#a-graph .scatterlayer .trace:nth-of-type(3) .point")
    until(lambda: "image" in query(dash_duo), timeout=TIMEOUT, msg="the image is in the URL")
    image = int(query(dash_duo)["image"])
    dash_duo.wait_for_contains_text("#sel-summary", f"image {image}", timeout=TIMEOUT)
    wait_js(dash_duo, "b1-graph", "gd.data.length", lambda n: n == 4, "the image's curve on top")
    assert js(dash_duo, "b1-graph", "gd.data[3].name").startswith(f"image {image}")
    wait_js(dash_duo, "c1-graph", "gd.layout.title.text", lambda t: t and t.startswith(f"image {image}"), "C1 is the image")
    wait_js(dash_duo, "d1-graph", "gd.data[2].x.length", lambda n: n == 12, "the image's 6x2 heads in D1")
    no_console_errors(dash_duo)


def test_selecting_a_head_updates_b2_b3_c2_c3_d2_to_d5(dash_duo, app):
    visit(dash_duo, app, "/?run=tiny&image=3")
    dash_duo.wait_for_contains_text("#sel-summary", "image 3", timeout=TIMEOUT)
    wait_js(dash_duo, "c1-graph", "gd.data[0].x.length", lambda n: n == 12, "C1 drawn")
    click(dash_duo, "#c1-graph .scatterlayer .trace .point:nth-of-type(4)")  # layer 1 head 1
    until(lambda: query(dash_duo).get("layer") == "1" and query(dash_duo).get("head") == "1", timeout=TIMEOUT,
          msg="head in the URL")
    dash_duo.wait_for_contains_text("#sel-summary", "layer 1 head 1", timeout=TIMEOUT)
    wait_js(dash_duo, "b2-graph", "gd.data.length && gd.data[0].y.length", lambda n: n == 8, "8 pruning modes")
    wait_js(dash_duo, "b3-graph", "gd.data.length && gd.data[0].x.length", lambda n: n == 5, "top-5")
    wait_js(dash_duo, "c2-graph", "gd.data.length && gd.data[0].y.length", lambda n: n == 6, "6 hops on a 6x6 grid")
    wait_js(dash_duo, "c3-graph", "(gd.layout.shapes || []).length", lambda n: n == 1, "line at the image")
    wait_js(dash_duo, "d4-graph", "gd.data.length", lambda n: n == 2, "heatmap")
    wait_js(dash_duo, "d5-graph", "gd.data.length && gd.data[0].y.length", lambda n: n == 60, "histogram")
    until(lambda: (segments(dash_duo) or 0) > 0, timeout=TIMEOUT, msg="segments in D3")
    dash_duo.wait_for_contains_text("#d3-count", "segments drawn", timeout=TIMEOUT)
    until(lambda: len(dash_duo.find_elements("#d2-images img")) == 3, timeout=TIMEOUT, msg="D2 images")
    # B3's true label in bold when present; the mode bar chosen for B3 is highlighted
    assert js(dash_duo, "b2-graph", "gd.data[0].marker.color[1]") == "#D55E00"
    # hovering a source token in D3 updates D2's target mask
    before = dash_duo.find_elements("#d2-images figcaption")[2].text
    tokens = dash_duo.find_elements("#d3-graph .scatterlayer .trace:nth-last-of-type(2) .point")
    ActionChains(dash_duo.driver).move_to_element(tokens[10]).pause(0.5).perform()
    until(lambda: dash_duo.find_elements("#d2-images figcaption")[2].text != before, timeout=TIMEOUT,
          msg="D2 follows the hovered token")
    assert "patch 9" in dash_duo.find_elements("#d2-images figcaption")[2].text
    no_console_errors(dash_duo)


def test_moving_the_threshold_changes_the_d3_segments(dash_duo, app):
    visit(dash_duo, app, "/?run=tiny&image=3&layer=1&head=1")
    until(lambda: (segments(dash_duo) or 0) > 0, timeout=TIMEOUT, msg="segments in D3")
    start = segments(dash_duo)
    assert start == round(0.01 * 37 * 37)  # top 1% of a 37x37 matrix
    handle = dash_duo.wait_for_element("#q-slider [role=slider]")
    handle.send_keys(Keys.END)   # top 100%
    until(lambda: segments(dash_duo) == 37 * 37, timeout=TIMEOUT, msg="all segments at 100%")
    dash_duo.wait_for_contains_text("#d3-count", "1,369 segments", timeout=TIMEOUT)
    handle.send_keys(Keys.HOME)  # top 0.1%
    until(lambda: segments(dash_duo) == 1, timeout=TIMEOUT, msg="one segment at 0.1%")
    # clicking a histogram bar sets the threshold too
    bars = dash_duo.find_elements("#d5-graph .barlayer .point")
    ActionChains(dash_duo.driver).move_to_element(bars[len(bars) // 2]).pause(0.3).click().perform()
    until(lambda: segments(dash_duo) not in (None, 1), timeout=TIMEOUT, msg="threshold from the histogram")
    no_console_errors(dash_duo)


def test_the_url_round_trips_a_selection(dash_duo, app):
    visit(dash_duo, app, "/?run=tiny&image=5&layer=2&head=1")
    dash_duo.wait_for_contains_text("#sel-summary", "image 5", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#sel-summary", "layer 2 head 1", timeout=TIMEOUT)
    wait_js(dash_duo, "b1-graph", "gd.data.length", lambda n: n == 4, "image curve")
    # select another head in B1: the URL follows
    click(dash_duo, "#b1-graph .scatterlayer .trace:nth-of-type(4) .point:nth-of-type(2)")  # layer 0 head 1
    until(lambda: query(dash_duo).get("layer") == "0", timeout=TIMEOUT, msg="URL follows the selection")
    assert query(dash_duo) == {"run": "tiny", "image": "5", "layer": "0", "head": "1"}
    url = dash_duo.driver.current_url
    # the link opens the same selection in a fresh page, and the other pages keep it
    dash_duo.wait_for_page(url, timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#sel-summary", "layer 0 head 1", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#sel-summary", "image 5", timeout=TIMEOUT)
    dash_duo.find_element("#nav-help").click()
    dash_duo.wait_for_element(".help-page", timeout=TIMEOUT)
    assert query(dash_duo) == {"run": "tiny", "image": "5", "layer": "0", "head": "1"}
    dash_duo.find_element("#nav-explorer").click()
    dash_duo.wait_for_contains_text("#sel-summary", "layer 0 head 1", timeout=TIMEOUT)
    no_console_errors(dash_duo)


def test_failures_are_reported_in_the_page_and_the_rest_keeps_working(dash_duo, app):
    visit(dash_duo, app, "/?run=nomodel&image=2&layer=1&head=1")
    dash_duo.wait_for_contains_text("#d-msg .alert", "synthetic", timeout=TIMEOUT)   # online query failed
    dash_duo.wait_for_element("#b2-msg .alert", timeout=TIMEOUT)
    wait_js(dash_duo, "b1-graph", "gd.data.length", lambda n: n == 4, "cached views still work")
    wait_js(dash_duo, "c2-graph", "gd.data.length && gd.data[0].y.length", lambda n: n == 5, "C2 still works")
    no_console_errors(dash_duo)
    # a run built with an older schema: a clear message, the navigation still works
    dash_duo.wait_for_page(dash_duo.server_url + "/?run=old", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#run-alert", "schema v0", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#run-alert", "Rebuild", timeout=TIMEOUT)
    dash_duo.find_element("#nav-runs").click()
    dash_duo.wait_for_contains_text(".runs-table", "nomodel", timeout=TIMEOUT)
    no_console_errors(dash_duo)


def build_real_run(cache) -> str | None:
    """A small run of the embedded default (the real DINOv2 ViT-S/14 + probe on 30 Fashion-MNIST
    images) in the test cache, unless cache/default exists; None when the default is not installed."""
    import subprocess

    from conftest import embedded_default_missing

    if embedded_default_missing():
        return None
    proc = subprocess.run([sys.executable, "scripts/build_cache.py", "--limit", "30", "--batch-size", "15",
                           "--out", str(cache / "real"), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "real"


@pytest.fixture(scope="module")
def real_default(cache):
    """(cache dir, run) of a run made by the real build of the real default model: cache/default when
    it opens, else a small one built here; None when the embedded default is not installed."""
    from analysis.errors import HeadScopeError
    from analysis.runs import store

    try:
        store.open_run(ROOT / "cache" / "default")
        return ROOT / "cache", "default"
    except HeadScopeError:
        pass
    run = build_real_run(cache)
    return None if run is None else (cache, run)


def _target(cache_dir, run):
    """(image, layer, head): the 4th image and its most important head by prob_drop (or the first metric)."""
    from app import config, data

    config.configure(cache_dir, run)
    index = data.get_index(run)
    metric = "prob_drop" if "prob_drop" in index.importance else index.importance[0]
    pos = min(3, index.n - 1)
    hi = int(np.nanargmax(index.values(metric)[pos]))
    return int(index.image_ids[pos]), hi // index.H, hi % index.H


def choose_each(dash_duo, dropdown, graph, expr, names, expected):
    """Pick every option of ``dropdown`` in turn; wait until ``expr`` on ``graph`` equals expected(name)."""
    for name in names:
        click(dash_duo, f"#{dropdown}")  # opens the menu (rendered asynchronously)
        option = f".dash-dropdown-content .dash-dropdown-option:has(input[value='{name}'])"
        click(dash_duo, option)
        is_open = lambda: dash_duo.find_elements(".dash-dropdown-content[data-state=open]")
        if is_open():
            ActionChains(dash_duo.driver).send_keys(Keys.ESCAPE).perform()
        until(lambda: not is_open(), timeout=TIMEOUT, msg="menu closed")
        wait_js(dash_duo, graph, expr, lambda got, want=expected(name): got == want, f"{dropdown} = {name}")
        no_console_errors(dash_duo)


def test_every_page_on_a_real_default_run(dash_duo, real_default):
    """Explorer (every B1 and C1 choice), Heads (every metric of its dropdown), Runs and Help on a
    real default run: no browser console error, no HTTP 5xx from the server."""
    from analysis.metrics import registry
    from app import data

    if real_default is None:
        pytest.skip("the embedded default model is not installed here")
    cache_dir, run = real_default
    image, layer, head = _target(cache_dir, run)
    index = data.get_index(run)
    app = create_app(cache_dir, run)
    server_errors = record_server_errors(app)
    visit(dash_duo, app, f"/?run={run}&image={image}&layer={layer}&head={head}")
    for graph in ("a-graph", "b1-graph", "b2-graph", "b3-graph", "c1-graph", "c2-graph", "c3-graph",
                  "d1-graph", "d3-graph", "d4-graph", "d5-graph"):
        wait_js(dash_duo, graph, "gd.data.length", lambda n: bool(n), "drawn", timeout=180)
    until(lambda: len(dash_duo.find_elements("#d2-images img")) == 3, timeout=TIMEOUT, msg="D2 images")
    no_console_errors(dash_duo)
    title = lambda name: registry.get_metric(name).title
    choose_each(dash_duo, "metric", "b1-graph", "gd.layout.yaxis.title.text", index.importance, title)
    assert {"strength_entropy", "mean_distance_px", "semantic_concentration"} <= set(index.properties)
    choose_each(dash_duo, "c1-metric", "c1-graph", "gd.layout.yaxis.title.text", index.properties + index.run_level,
                title)
    dash_duo.find_element("#nav-heads").click()
    dash_duo.wait_for_contains_text("#heads-table", "rank", timeout=TIMEOUT)
    assert len(index.head_metrics) >= 10
    choose_each(dash_duo, "heads-metric", "heads-map", "gd.layout.title.text", index.head_metrics,
                lambda name: f"mean {title(name)}")
    dash_duo.find_element("#nav-runs").click()
    dash_duo.wait_for_contains_text(".runs-table", run, timeout=TIMEOUT)
    no_console_errors(dash_duo)
    dash_duo.find_element("#nav-help").click()
    dash_duo.wait_for_contains_text(".help-page", "mean_distance_px", timeout=TIMEOUT)
    no_console_errors(dash_duo)
    assert server_errors == []


def test_screenshot_explorer(dash_duo, cache, real_default, tmp_path):
    cache_dir, run = real_default or (cache, "tiny")
    image, layer, head = _target(cache_dir, run)
    app = create_app(cache_dir, run)
    visit(dash_duo, app, f"/?run={run}&image={image}&layer={layer}&head={head}")
    for graph in ("a-graph", "b1-graph", "b2-graph", "b3-graph", "c1-graph", "c2-graph", "c3-graph",
                  "d1-graph", "d3-graph", "d4-graph", "d5-graph"):
        wait_js(dash_duo, graph, "gd.data.length", lambda n: bool(n), "drawn", timeout=180)
    until(lambda: len(dash_duo.find_elements("#d2-images img")) == 3, timeout=TIMEOUT, msg="D2 images")
    # a viewport as tall as the page, so the screenshot holds all four views
    height = dash_duo.driver.execute_script("return document.documentElement.scrollHeight")
    dash_duo.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 1680, "height": height, "deviceScaleFactor": 1, "mobile": False})
    time.sleep(2)  # let plotly relayout to the new size
    out = tmp_path / "screenshot_explorer.png"
    assert dash_duo.driver.save_screenshot(str(out))
    no_console_errors(dash_duo)
    print(f"Explorer on run {run} of {cache_dir} (image {image}, layer {layer} head {head})")
    if os.environ.get("HEADSCOPE_SCREENSHOT"):
        shutil.copy(out, ROOT / "assets" / "screenshot_explorer.png")
        print("screenshot -> assets/screenshot_explorer.png")
