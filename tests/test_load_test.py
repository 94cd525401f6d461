"""scripts/load_test.py sends what the Explorer page sends: each of its users' four selections (an
image in A, a head in B1, a threshold, D1's toggle) reaches the page's server-side callbacks, found
from the page's own callback graph. Served by gunicorn on a small synthetic run (online queries in
the app process); the page's clientside callbacks run in Node.js."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_synthetic_run, start_gunicorn, stop

ROOT = Path(__file__).resolve().parent.parent
SELECTIONS = ("A image", "B1 head", "threshold", "D1 toggle")


def test_each_selection_of_the_load_test_reaches_the_server_side_callbacks(tmp_path):
    make_synthetic_run(tmp_path / "tiny", n_images=20, n_classes=4, model="test_vit", img_size=64, seed=0)
    env = {**os.environ, "HEADSCOPE_CACHE": str(tmp_path), "HEADSCOPE_RUN": "tiny"}
    env.pop("HEADSCOPE_BROKER_URL", None)
    app_cmd = ["gunicorn", "--bind", "127.0.0.1:0", "--worker-class", "gthread", "--workers", "1",
               "--threads", "8", "--timeout", "120", "app.wsgi:server"]
    proc, url = start_gunicorn(app_cmd, env, tmp_path / "gunicorn.log")
    try:
        out = subprocess.run([sys.executable, "scripts/load_test.py", "--url", url, "--cache-dir", str(tmp_path),
                              "--run", "tiny", "--users", "2", "--duration", "8", "--seed", "0",
                              "--json", str(tmp_path / "load.json")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop(proc)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "load.json").read_text())
    interactions, sends = figures.get("interaction", {}), figures.get("sends", {})
    for name in SELECTIONS:
        made = interactions.get(name, {}).get("n", 0)
        callbacks = sum(n for kind, n in sends.get(name, {}).items() if kind != "page" and not kind.startswith("/"))
        assert made >= 1 and callbacks >= made, (name, interactions.get(name), sends.get(name), out.stdout)
        assert interactions[name]["errors"] == 0, out.stdout  # every request answered (no error status)
    # the page load fires the views' callbacks too, and no request of any kind failed
    assert sum(sends["page load"].values()) > 3 and figures["request"]["all"]["errors"] == 0, out.stdout
