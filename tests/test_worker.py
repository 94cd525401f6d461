"""The model worker end to end: a real redis-server and Celery worker (subprocesses) answer the
online queries with the same numbers as the in-process path, and a stopped worker or Redis gives
a clear error within seconds instead of a hang."""
import gc
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.serving import transport as online
from conftest import (free_port, make_image_folder, make_synthetic_run as make_run, save_tiny_vit, start_gunicorn,
                      start_redis, start_worker, stop)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server not installed (apt-get install redis-server)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The module worker's cache directory: it serves and builds only runs in here."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def tiny_run(runs):
    """A small complete run whose random test_vit model can answer online queries."""
    return make_run(runs / "tiny", n_images=4, model="test_vit", img_size=32)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def worker(redis_url, runs, tmp_path_factory):
    proc = start_worker(redis_url, tmp_path_factory.mktemp("worker") / "worker.log", runs)
    yield proc
    if proc.poll() is None:
        stop(proc)


@pytest.fixture
def via_worker(monkeypatch, redis_url, worker):
    monkeypatch.setenv("HEADSCOPE_BROKER_URL", redis_url)
    monkeypatch.setenv("HEADSCOPE_QUERY_TIMEOUT", "120")  # a first query loads a model: slow on a busy CI machine
    return redis_url


def in_process(monkeypatch, name, *args):
    with monkeypatch.context() as m:
        m.delenv("HEADSCOPE_BROKER_URL", raising=False)
        return getattr(online, name)(*args)


def assert_rows_close(got: list[dict], want: list[dict]) -> None:
    """Partial-pruning rows agree: same keys, same integers and labels, floats to float32 rounding
    (the worker and the test process may split a matmul over different thread counts)."""
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for g, w in zip(got, want):
        for key in g:
            if isinstance(g[key], float) or (isinstance(g[key], list) and isinstance(g[key][0], float)):
                np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-7, err_msg=key)
            else:
                assert g[key] == w[key], key


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


def test_worker_reports_unknown_runs_images_and_heads(via_worker, tiny_run, runs):
    cases = [((runs / "nope", 0, 0, 0), "No HeadScope run"),
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


def test_slow_query_is_a_clear_error_and_the_retry_gets_the_result(via_worker, runs, monkeypatch):
    # a new run's model (ViT-S at 224 px: ~0.5 s to build and load, ~0.15 s to query) takes longer than 0.2 s
    run = make_run(runs / "fresh", n_images=2, model="vit_small_patch16_224", img_size=224, seed=1)
    monkeypatch.setenv("HEADSCOPE_QUERY_TIMEOUT", "0.2")
    with pytest.raises(online.OnlineError, match="did not finish the partial pruning query within 0.2 s"):
        online.partial_pruning(run, 0, 0, 0)
    monkeypatch.setenv("HEADSCOPE_QUERY_TIMEOUT", "120")  # a slow CI machine may need long to load it
    assert len(online.partial_pruning(run, 0, 0, 0)["rows"]) == 8


def test_build_on_the_worker_pool_equals_a_local_build(via_worker, runs, tmp_path, monkeypatch, capsys):
    """build_cache.py --worker-pool: the workers run the per-image stage (build_slice tasks), this
    process merges; the tables equal a local build's, the corrupt file is skipped either way.
    The run must be inside the workers' cache directory."""
    import pandas as pd

    from analysis.cli import build_main as main

    weights = save_tiny_vit(tmp_path / "tiny.safetensors", img_size=32, num_classes=2)
    make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=3, size=(40, 40), broken="a")
    common = ["--model", "vit_tiny_patch16_224", "--weights", str(weights), "--images", str(tmp_path / "images"),
              "--batch-size", "2", "--threads", "1", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "outside"), "--worker-pool"]) == 2
    assert "serves only runs inside its cache directory" in capsys.readouterr().err
    monkeypatch.chdir(runs)  # a relative --out reaches the workers as an absolute path
    assert main(common + ["--out", "pool", "--worker-pool"]) == 0
    with monkeypatch.context() as m:
        m.delenv("HEADSCOPE_BROKER_URL")
        assert main(common + ["--out", str(tmp_path / "local")]) == 0
    for name in ("images.parquet", "head_metrics.parquet", "head_summary.parquet", "skipped.parquet"):
        local, pool = pd.read_parquet(tmp_path / "local" / name), pd.read_parquet(runs / "pool" / name)
        # float32 precision, not bits: the worker's thread pool may split a matmul differently
        pd.testing.assert_frame_equal(pool, local, check_exact=False, rtol=1e-5, atol=1e-6, obj=name)
    assert len(pd.read_parquet(runs / "pool" / "skipped.parquet")) == 1


def test_worker_serves_only_runs_inside_its_cache_directory(via_worker, tiny_run, tmp_path):
    outside = shutil.copytree(tiny_run, tmp_path / "tiny")  # a complete run, but not in the worker's cache
    for run_dir in (outside, tiny_run.parent / ".." / tmp_path.name / "tiny", Path("/etc")):
        with pytest.raises(online.OnlineError, match="serves only runs inside its cache directory"):
            online.partial_pruning(run_dir, 0, 0, 0)
    assert len(online.partial_pruning(tiny_run, 0, 0, 1)["rows"]) == 8  # inside: served


def test_a_run_replaced_in_place_is_never_answered_from_the_old_one(via_worker, runs, monkeypatch):
    """cache/swap holds run A, is queried (the app's and the worker's caches fill), then is replaced
    by a run of another model: every query answers with the new model's numbers."""
    a = make_run(runs / "model-a", n_images=3, model="test_vit", img_size=32, seed=0)
    b = make_run(runs / "model-b", n_images=3, model="vit_tiny_patch16_224", img_size=32, seed=1)
    swap = runs / "swap"
    shutil.copytree(a, swap)
    old = online.attention(swap, 0, 0, 0)["attention"], online.partial_pruning(swap, 0, 0, 0)
    np.testing.assert_array_equal(old[0], in_process(monkeypatch, "attention", a, 0, 0, 0)["attention"])
    shutil.rmtree(swap)
    shutil.copytree(b, swap)
    new = online.attention(swap, 0, 0, 0)["attention"], online.partial_pruning(swap, 0, 0, 0)
    np.testing.assert_array_equal(new[0], in_process(monkeypatch, "attention", b, 0, 0, 0)["attention"])
    assert_rows_close(new[1]["rows"], in_process(monkeypatch, "partial_pruning", b, 0, 0, 0)["rows"])
    assert [r["prob"] for r in new[1]["rows"]] != pytest.approx([r["prob"] for r in old[1]["rows"]], rel=1e-3)
    assert not np.array_equal(new[0], old[0])


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


def test_restarted_worker_is_picked_up_again(via_worker, tiny_run, runs, tmp_path):
    """After the previous test stopped it: a new worker serves the app without an app restart."""
    proc = start_worker(via_worker, tmp_path / "worker.log", runs)
    try:
        deadline = time.monotonic() + 10
        while not online.status()["ok"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(online.partial_pruning(tiny_run, 3, 1, 1)["rows"]) == 8
    finally:
        stop(proc)


def test_worker_pool_without_redis_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from analysis.cli import build_main as main

    make_image_folder(tmp_path / "images", classes=("a",), per_class=1, size=(32, 32))
    monkeypatch.setenv("HEADSCOPE_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    args = ["--model", "test_vit", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "run"), "--worker-pool", "--quiet"]
    assert main(args) == 2
    assert "is not reachable" in capsys.readouterr().err


def test_build_slice_task_reports_failures(tmp_path, monkeypatch):
    from worker import tasks

    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path))
    out = tasks.build_slice({"out": str(tmp_path / "run"), "model": "no_such_model_xyz", "dataset": "fashion"}, [0])
    assert not out["ok"] and "no_such_model_xyz" in out["error"]
    out = tasks.build_slice({"out": "/nonexistent/run", "model": "no_such_model_xyz", "dataset": "fashion"}, [0])
    assert not out["ok"] and "serves only runs inside its cache directory" in out["error"]


# ---- a password-protected Redis; an outage with many queries in flight --------------------------------
def test_redis_password_in_the_broker_url(tmp_path_factory, monkeypatch):
    """Redis with --requirepass: the worker (started as `headscope worker --broker-url URL --cache-dir
    DIR`) and the app use redis://:PASSWORD@host/..; a wrong password is a clear error that does not
    show the password."""
    runs = tmp_path_factory.mktemp("pw-runs")
    run = make_run(runs / "tiny", n_images=2, model="test_vit", img_size=32)
    proc, url = start_redis(tmp_path_factory.mktemp("pw-redis"), password="s3cret-pw")
    assert ":s3cret-pw@" in url
    try:
        worker = start_worker(url, runs / "worker.log", runs, cli=True)
        try:
            monkeypatch.setenv("HEADSCOPE_BROKER_URL", url)
            assert online.status()["ok"]
            assert len(online.partial_pruning(run, 1, 0, 0)["rows"]) == 8
            monkeypatch.setenv("HEADSCOPE_BROKER_URL", url.replace("s3cret-pw", "wrong-pw"))
            with pytest.raises(online.OnlineError, match="broker is not reachable") as err:
                online.partial_pruning(run, 1, 0, 1)
            assert "wrong-pw" not in str(err.value) and ":***@" in str(err.value)
            from worker.pool import PoolError, check_pool

            with pytest.raises(PoolError, match="not reachable") as err:  # build_cache.py --worker-pool
                check_pool(url.replace("s3cret-pw", "wrong-pw"))
            assert "wrong-pw" not in str(err.value) and ":***@" in str(err.value)
            assert check_pool(url) == 1
            monkeypatch.setenv("HEADSCOPE_BROKER_URL", url.replace(":s3cret-pw@", ""))  # none at all
            assert not online.status()["ok"]
        finally:
            stop(worker)
    finally:
        stop(proc)


def test_a_killed_worker_is_reported_once_to_every_waiting_query(tmp_path_factory, monkeypatch):
    """kill -9 of the worker with 24 queries in flight: one liveness ping answers all of them (not
    one ping timeout each, one after the other), and the app's /healthz, served by the compose
    app command (gunicorn, 2 processes x 8 threads), passes the compose health check meanwhile."""
    runs = tmp_path_factory.mktemp("kill-runs")
    run = make_run(runs / "tiny", n_images=4, model="test_vit", img_size=32)
    redis_proc, url = start_redis(tmp_path_factory.mktemp("kill-redis"))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["app"]
    env = {**os.environ, "HEADSCOPE_BROKER_URL": url, "HEADSCOPE_CACHE": str(runs), "HEADSCOPE_RUN": "tiny"}
    env.pop("HEADSCOPE_BASIC_AUTH", None)
    procs = [redis_proc]
    try:
        worker = start_worker(url, runs / "worker.log", runs)
        procs.append(worker)
        app, base = start_gunicorn(compose["command"], env, runs / "gunicorn.log", workers=2)
        procs.append(app)
        import requests

        assert requests.get(base + "/api/attention?run=tiny&image=0&layer=0&head=0", timeout=60).ok
        monkeypatch.setenv("HEADSCOPE_BROKER_URL", url)
        assert online.partial_pruning(run, 0, 0, 0)  # this process saw the worker alive just now
        stop(worker, sig="kill")
        pings = online.liveness.pings
        keys = [(i % 4, i // 4, 1) for i in range(24)]  # 24 distinct queries, none cached anywhere
        errors, http = [], []

        def local(key):
            try:
                online.partial_pruning(run, *key)
            except online.OnlineError as err:
                errors.append(str(err))

        def remote(key):
            q = f"run=tiny&image={key[0]}&layer={key[1]}&head={key[2]}"
            r = requests.get(f"{base}/api/partial_pruning?{q}", timeout=60)
            http.append((r.status_code, r.json().get("error", "")))

        threads = [threading.Thread(target=f, args=(k,)) for k in keys for f in (local, remote)]
        t = time.monotonic()
        for th in threads:
            th.start()
        time.sleep(0.5)  # the queries are waiting: now the container's health check
        check = compose["healthcheck"]["test"]  # CMD python -c "...urlopen('http://127.0.0.1:8050/healthz', timeout=4)"
        assert check[:3] == ["CMD", "python", "-c"] and "127.0.0.1:8050" in check[3]
        health = subprocess.run([sys.executable, "-c", check[3].replace("127.0.0.1:8050", base.split("//")[1])],
                                capture_output=True, text=True, timeout=60)
        health_s = time.monotonic() - t - 0.5
        for th in threads:
            th.join()
        print(f"24 local queries answered after {time.monotonic() - t:.1f} s with "
              f"{online.liveness.pings - pings} ping(s); /healthz in {health_s:.1f} s")
        assert health.returncode == 0, health.stderr[-2000:]
        assert len(errors) == 24 and all("model worker is not answering" in e for e in errors)
        assert online.liveness.pings - pings <= 2  # one ping shared by all (two if a "yes" had just expired)
        assert len(http) == 24 and all(code == 400 and "not answering" in e for code, e in http), http[:3]
        assert requests.get(base + "/healthz", timeout=10).json()["online"]["ok"] is False
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                stop(proc)
    # the 24 failed queries let go of their results while Redis was up: collecting what is left of
    # them now, with Redis stopped, reports nothing (Celery's __del__ would retry to unsubscribe
    # until it gave up: "Retry limit exceeded")
    unraisable, hook = [], sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not unraisable, [f"{u.object}: {u.exc_value}" for u in unraisable]
