"""What the browser scripts share (bench_browser.py, screenshot_views.py, screenshot_saliency.py): a free
port, the app served in this process, and a headless chromium as the tests run it."""
from __future__ import annotations

import socket
import threading
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cache: Path, run: str):
    """(base URL, werkzeug server) of the app on ``cache``/``run``, served in a thread of this process
    (``server.shutdown()`` stops it)."""
    from werkzeug.serving import make_server

    from app import create_app

    port = free_port()
    server = make_server("127.0.0.1", port, create_app(Path(cache), run).server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", server


def chromium(width: int = 1920, height: int = 1080, console: bool = False):
    """Headless chromium (no sandbox, no GPU: software WebGL) with a ``width`` x ``height`` viewport;
    ``console``: keep the page's SEVERE console entries (``driver.get_log("browser")``)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    if console:
        options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    driver = webdriver.Chrome(options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    driver.set_script_timeout(60)
    return driver
