"""The Curves page in a headless browser, on a tiny build with the curves stage (run under
``flock /tmp/hs-browser.lock``)."""
import shutil

import pytest

pytest.importorskip("selenium")
if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
    pytest.skip("browser tests need chromium and chromedriver", allow_module_level=True)

from app import create_app  # noqa: E402
from test_app_browser import TIMEOUT, js, no_console_errors, wait_js  # noqa: E402
pytestmark = pytest.mark.usefixtures("one_thread")


def test_curves_page_draws_every_order_and_answers_the_1_point_question(dash_duo, extra_run):
    dash_duo.start_server(create_app(extra_run.path.parent, extra_run.name))
    dash_duo.wait_for_element("#sel-summary", timeout=TIMEOUT)
    dash_duo.find_element("#nav-curves").click()
    dash_duo.wait_for_contains_text("#curves-summary", "exact (leave-one-out)", timeout=TIMEOUT)
    wait_js(dash_duo, "curves-graph", "gd.data.map(t => t.name)",
            lambda names: names == ["exact (leave-one-out)", "taylor (approximate)", "random range", "random"],
            "one line per order and the random band")
    text = dash_duo.find_element("#curves-summary").text
    assert "taylor (approximate)" in text and "random" in text and "heads before accuracy drops by 1 point" in text
    assert js(dash_duo, "curves-graph", "gd.layout.xaxis.range[1]") == extra_run.L * extra_run.H
    no_console_errors(dash_duo)
