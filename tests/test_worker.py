"""The model worker end to end: a real redis-server and Celery worker (subprocesses) answer the
online queries with the same numbers as the in-process path, and a stopped worker or Redis gives
a clear error within seconds instead of a hang."""
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis.serving import transport as online

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server not installed (apt-get install redis-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    """A throw-away redis-server on a free localhost port -> (process, url)."""
    import redis

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def start_worker(url: str, log: Path, timeout: float = 120) -> subprocess.Popen:
    """`celery -A worker.celery_app worker ...` on ``url``; returns once it answers a ping."""
    from worker.celery_app import make_app

    env = {**os.environ, "HEADSCOPE_BROKER_URL": url, "PYTHONPATH": str(ROOT)}
    env.pop("HEADSCOPE_RESULT_BACKEND", None)
    # the command the app's error message, docs and docker-compose.yml give
    cmd = [sys.executable, "-m", *shlex.split(online.WORKER_COMMAND), "--without-gossip", "--without-mingle",
           "--loglevel=INFO"]
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


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A small complete run whose random test_vit model can answer online queries."""
    from scripts.make_synthetic_cache import make_run

    return make_run(tmp_path_factory.mktemp("runs") / "tiny", n_images=4, model="test_vit", img_size=32)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def worker(redis_url, tmp_path_factory):
    proc = start_worker(redis_url, tmp_path_factory.mktemp("worker") / "worker.log")
    yield proc
    if proc.poll() is None:
        stop(proc)


@pytest.fixture
def via_worker(monkeypatch, redis_url, worker):
    monkeypatch.setenv("HEADSCOPE_BROKER_URL", redis_url)
    return redis_url


def in_process(monkeypatch, name, *args):
    with monkeypatch.context() as m:
        m.delenv("HEADSCOPE_BROKER_URL", raising=False)
        return getattr(online, name)(*args)


def test_worker_gives_the_in_process_numbers(via_worker, tiny_run, monkeypatch):
    assert online.status()["ok"] and online.status()["mode"] == "worker"
    remote = online.partial_pruning(tiny_run, 1, 2, 1)
    local = in_process(monkeypatch, "partial_pruning", tiny_run, 1, 2, 1)
    assert len(remote["rows"]) == 8
    assert remote == local  # floats survive the JSON transport exactly
    remote = online.attention(tiny_run, 2, 0, 1)
    local = in_process(monkeypatch, "attention", tiny_run, 2, 0, 1)
    assert remote["attention"].dtype == np.float16 and remote["attention"].shape == (5, 5)
    np.testing.assert_array_equal(remote["attention"], local["attention"])
    assert {k: v for k, v in remote.items() if k != "attention"} == \
           {k: v for k, v in local.items() if k != "attention"}


def test_worker_reports_unknown_runs_images_and_heads(via_worker, tiny_run, tmp_path):
    cases = [((tmp_path / "nope", 0, 0, 0), "No HeadScope run"),
             ((tiny_run, 99, 0, 0), "Image 99 is not in run tiny"),
             ((tiny_run, 0, 6, 0), "Head (6, 0) does not exist: layers 0-5, heads 0-1"),
             ((tiny_run, 0, 0, "x"), "must be integers")]
    for args, message in cases:
        with pytest.raises(online.OnlineError, match=message.replace("(", r"\(").replace(")", r"\)")):
            online.partial_pruning(*args)
        with pytest.raises(online.OnlineError, match=message.replace("(", r"\(").replace(")", r"\)")):
            online.attention(*args)


def test_compose_worker_healthcheck_passes(worker, redis_url):
    """docker-compose.yml's health check of the worker, run here against the live worker."""
    import yaml

    check = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL"
    env = {**os.environ, "HEADSCOPE_BROKER_URL": redis_url, "HOSTNAME": socket.gethostname(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["sh", "-c", check[1].replace("$$", "$")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "pong" in out.stdout, out.stdout + out.stderr


def test_redis_down_is_a_clear_error_not_a_hang(monkeypatch, tiny_run):
    monkeypatch.setenv("HEADSCOPE_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    t = time.monotonic()
    with pytest.raises(online.OnlineError, match="broker is not reachable.*unset HEADSCOPE_BROKER_URL"):
        online.partial_pruning(tiny_run, 0, 0, 0)
    assert time.monotonic() - t < 5
    assert not online.status()["ok"]


def test_slow_query_is_a_clear_error_and_the_retry_gets_the_result(via_worker, tmp_path, monkeypatch):
    from scripts.make_synthetic_cache import make_run

    # a new run's model (ViT-S at 224 px: ~0.5 s to build and load, ~0.15 s to query) takes longer than 0.2 s
    run = make_run(tmp_path / "fresh", n_images=2, model="vit_small_patch16_224", img_size=224, seed=1)
    monkeypatch.setenv("HEADSCOPE_QUERY_TIMEOUT", "0.2")
    with pytest.raises(online.OnlineError, match="did not finish the partial pruning query within 0.2 s"):
        online.partial_pruning(run, 0, 0, 0)
    monkeypatch.setenv("HEADSCOPE_QUERY_TIMEOUT", "120")  # a slow CI machine may need long to load it
    assert len(online.partial_pruning(run, 0, 0, 0)["rows"]) == 8


def test_build_on_the_worker_pool_equals_a_local_build(via_worker, tmp_path, monkeypatch):
    """build_cache.py --worker-pool: the workers run the per-image stage (build_slice tasks), this
    process merges; the tables equal a local build's, the corrupt file is skipped either way."""
    import pandas as pd
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from scripts.build_cache import main

    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=2).state_dict(), str(weights))
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not a PNG")
    common = ["--model", "vit_tiny_patch16_224", "--weights", str(weights), "--images", str(tmp_path / "images"),
              "--batch-size", "2", "--threads", "1", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "pool"), "--worker-pool"]) == 0
    with monkeypatch.context() as m:
        m.delenv("HEADSCOPE_BROKER_URL")
        assert main(common + ["--out", str(tmp_path / "local")]) == 0
    for name in ("images.parquet", "head_metrics.parquet", "head_summary.parquet", "skipped.parquet"):
        local, pool = pd.read_parquet(tmp_path / "local" / name), pd.read_parquet(tmp_path / "pool" / name)
        # float32 precision, not bits: the worker's thread pool may split a matmul differently
        pd.testing.assert_frame_equal(pool, local, check_exact=False, rtol=1e-5, atol=1e-6, obj=name)
    assert len(pd.read_parquet(tmp_path / "pool" / "skipped.parquet")) == 1


def test_stopped_worker_is_a_clear_error_not_a_hang(via_worker, worker, tiny_run):
    """Runs last: it stops the module's worker."""
    online.partial_pruning(tiny_run, 0, 1, 0)  # the worker answers ...
    stop(worker)                                # ... then goes away
    for query in (online.partial_pruning, online.attention):
        t = time.monotonic()
        with pytest.raises(online.OnlineError, match="model worker is not answering.*celery -A worker.celery_app"):
            query(tiny_run, 3, 1, 1)
        assert time.monotonic() - t < 8
    status = online.status()
    assert status["mode"] == "worker" and not status["ok"] and "not answering" in status["message"]


def test_restarted_worker_is_picked_up_again(via_worker, tiny_run, tmp_path):
    """After the previous test stopped it: a new worker serves the app without an app restart."""
    proc = start_worker(via_worker, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 10
        while not online.status()["ok"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(online.partial_pruning(tiny_run, 3, 1, 1)["rows"]) == 8
    finally:
        stop(proc)


def test_worker_pool_without_redis_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from scripts.build_cache import main

    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a" / "0.png")
    monkeypatch.setenv("HEADSCOPE_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    args = ["--model", "test_vit", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "run"), "--worker-pool", "--quiet"]
    assert main(args) == 2
    assert "is not reachable" in capsys.readouterr().err


def test_build_slice_task_reports_failures():
    from worker import tasks

    out = tasks.build_slice({"out": "/nonexistent/run", "model": "no_such_model_xyz", "dataset": "fashion"}, [0])
    assert not out["ok"] and "no_such_model_xyz" in out["error"]
