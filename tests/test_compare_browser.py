"""The Compare page in a real (headless chromium) browser on runs written by the run writer:
``a`` and ``b`` (same images, same 6 x 4 heads), ``c`` (other L x H). Run under the browser lock:
``flock /tmp/hs-browser.lock python -m pytest tests/test_compare_browser.py``."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
from analysis.runs.synthetic import make_run

pytest.importorskip("selenium")
if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
    pytest.skip("browser tests need chromium and chromedriver", allow_module_level=True)

from dash.testing.wait import until  # noqa: E402

from analysis.runs.reader import open_run
from app import create_app  # noqa: E402
from test_app_browser import js, no_console_errors, record_server_errors  # noqa: E402

TIMEOUT = 60


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-cache")
    for name, seed, layers in (("a", 0, 6), ("b", 1, 6), ("c", 2, 3)):
        run = make_run(root / name, n_images=30, layers=layers, heads=4, grid=5, n_classes=3, seed=seed)
        mf = json.loads((run / "manifest.json").read_text())
        mf["dataset"]["fingerprint"] = "same-30-images"  # a and b (and c) analysed the same image set
        (run / "manifest.json").write_text(json.dumps(mf))
    return root


def graph_ready(dash_duo, graph_id, check, msg):
    return until(lambda: check(js(dash_duo, graph_id, "gd.data.map(t => [t.type, t.z || t.y || null])")),
                 timeout=TIMEOUT, msg=f"{graph_id}: {msg}")


def test_compare_two_runs_in_a_browser(dash_duo, cache):
    app = create_app(cache, "a")
    server_errors = record_server_errors(app)
    dash_duo.start_server(app)
    dash_duo.wait_for_page(dash_duo.server_url + "/compare?runs=a,b", timeout=TIMEOUT)
    a, b = open_run(cache / "a"), open_run(cache / "b")
    metric = "mean_distance_px"  # the page's default
    # per-layer profiles: a band and a line per run, the line = the layer mean of the head means
    graph_ready(dash_duo, "compare-profiles", lambda d: d is not None and len(d) == 4, "two runs overlaid")
    lines = js(dash_duo, "compare-profiles", "gd.data.filter(t => t.mode === 'lines+markers').map(t => t.y)")
    for run, y in zip((a, b), lines):
        np.testing.assert_allclose(y, run.summary(f"{metric}_mean").mean(axis=1), rtol=1e-5)
    # the head-by-head difference b - a
    graph_ready(dash_duo, "compare-diff", lambda d: d and d[0][0] == "heatmap", "difference heatmap")
    z = np.array(js(dash_duo, "compare-diff", "gd.data[0].z"), float)
    np.testing.assert_allclose(z, b.summary(f"{metric}_mean") - a.summary(f"{metric}_mean"), rtol=1e-5, atol=1e-9)
    dash_duo.wait_for_element("#compare-rank-table tbody tr", timeout=TIMEOUT)
    assert len(dash_duo.find_elements("#compare-rank-table tbody tr")) == 15
    # the per-image scatter of head (0, 0): all 30 images matched by the fingerprint
    graph_ready(dash_duo, "compare-scatter", lambda d: d and d[0][0] == "scattergl", "per-image scatter")
    x = js(dash_duo, "compare-scatter", "gd.data[0].x")
    np.testing.assert_allclose(x, a.dense(metric)[:, 0, 0], rtol=1e-5)
    if __import__("os").environ.get("HEADSCOPE_SCREENSHOT"):
        dash_duo.driver.save_screenshot(str(ROOT / "assets" / "screenshot_compare.png"))
    no_console_errors(dash_duo)

    # a run with other L x H: compared per layer (relative depth), and the page says why
    dash_duo.wait_for_page(dash_duo.server_url + "/compare?runs=a,c", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#compare-msg", "compared at the layer level", timeout=TIMEOUT)
    until(lambda: "relative depth" in (js(dash_duo, "compare-profiles", "gd.layout.xaxis.title.text") or ""),
          timeout=TIMEOUT, msg="relative depth axis")
    no_console_errors(dash_duo)
    assert server_errors == []
