"""What can be checked here of the deployment: the compose file and Dockerfile (parsed), the
commands they run (in this venv), optional basic auth, and the one-command local run script."""
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from flask import Flask

from analysis.errors import ConfigError
from analysis.serving import transport as online
from app import auth
from conftest import embedded_default_missing, free_port, make_synthetic_run as make_run, start_gunicorn, stop

ROOT = Path(__file__).resolve().parent.parent
HEADSCOPE_SERVICES = ("worker", "worker-gpu", "app", "build-cache")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [tuple((line.split(None, 1) + [""])[:2]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


# ---- compose ---------------------------------------------------------------------------------------
def test_compose_defines_the_stack(compose):
    services = compose["services"]
    assert set(services) == {"redis", "worker", "worker-gpu", "app", "build-cache"}
    assert "cache" in compose["volumes"]
    for name in HEADSCOPE_SERVICES:
        assert "cache:/data/cache" in services[name]["volumes"], name
        assert services[name]["environment"]["HEADSCOPE_CACHE"] == "/data/cache"
    for name in ("worker", "worker-gpu", "app"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["environment"]["HEADSCOPE_BROKER_URL"] == "redis://redis:6379/0"
    for name in ("redis", "worker", "worker-gpu", "app"):
        assert services[name]["healthcheck"]["test"], name
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["build-cache"]["profiles"] == ["build"] and services["build-cache"]["restart"] == "no"


def test_compose_serves_with_gunicorn_on_all_interfaces_inside_only(compose):
    app = compose["services"]["app"]
    assert app["command"][0] == "gunicorn" and app["command"][-1] == "app.wsgi:server"
    assert app["command"][app["command"].index("--bind") + 1] == "0.0.0.0:8050"
    assert app["ports"] == ["${HEADSCOPE_PUBLISH:-127.0.0.1:8050}:8050"]  # host side: localhost by default


def test_compose_worker_runs_the_documented_command(compose):
    assert compose["services"]["worker"]["command"][:-1] == shlex.split(online.WORKER_COMMAND)
    assert compose["services"]["worker-gpu"]["command"] == compose["services"]["worker"]["command"]


def test_no_secrets_in_compose_or_dockerfile(compose):
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search("AUTH|PASSWORD|SECRET|TOKEN", key):
                assert str(value).startswith("${") and str(value).endswith(":-}"), (name, key)
    for op, arg in dockerfile_instructions():
        if op in ("ENV", "ARG"):
            assert not re.search("AUTH|PASSWORD|SECRET|TOKEN", arg, re.I), arg


def test_build_cache_service_command_builds_then_resumes(compose, tmp_path):
    """The build-cache service's command, run here: a fresh volume gets a complete run; running it
    again (what a scripted rebuild or a retry after a crash does) finishes or skips, never fails."""
    if missing := embedded_default_missing():
        pytest.skip(f"embedded default not installed here: {missing}")
    service = compose["services"]["build-cache"]
    cmd = [a.replace("/data/cache", str(tmp_path)) for a in service["entrypoint"] + service["command"]]
    assert cmd[:2] == ["python", "scripts/build_cache.py"]
    cmd = [sys.executable, *cmd[1:], "--limit", "6", "--batch-size", "6", "--quiet"]
    for expected in ("Run complete: 6 images analysed", "already complete"):
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "HEADSCOPE_CACHE": str(tmp_path)})
        assert out.returncode == 0, out.stderr[-2000:]
        assert expected in out.stdout


# ---- Dockerfile ------------------------------------------------------------------------------------
def test_dockerfile_is_slim_non_root_with_a_gpu_build_argument():
    ins = dockerfile_instructions()
    ops = [op for op, _ in ins]
    assert ins[0] == ("FROM", "python:3.11-slim-bookworm")
    users = [arg for op, arg in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")  # nothing runs as root after
    assert any(op == "ARG" and arg.startswith("TORCH_INDEX=") for op, arg in ins)
    assert "--build-arg TORCH_INDEX=" in (ROOT / "Dockerfile").read_text()  # the GPU variant is documented
    copied = [src for op, arg in ins if op == "COPY" for src in arg.split()[:-1]]
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert {"analysis", "app", "assets", "worker", "scripts"} <= set(copied)  # what the services run
    assert any("--no-deps -r requirements-data.txt" in arg for op, arg in ins if op == "RUN")
    cmd = [arg for op, arg in ins if op == "CMD"][-1]
    assert '"gunicorn"' in cmd and '"app.wsgi:server"' in cmd


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "cache", "tests", "**/__pycache__", ".env"):
        assert entry in ignored


# ---- basic auth ------------------------------------------------------------------------------------
def test_basic_auth_users_from_env_and_file(tmp_path):
    from werkzeug.security import generate_password_hash

    f = tmp_path / "users.txt"
    f.write_text(f"# team\nbob:{generate_password_hash('b0b')}\n\ncarol:plain\n")
    users = auth.load_users({"HEADSCOPE_BASIC_AUTH": "alice:a1, dave:d:4", "HEADSCOPE_BASIC_AUTH_FILE": str(f)})
    assert set(users) == {"alice", "bob", "carol", "dave"} and users["dave"] == "d:4"
    assert auth.check_password(users["bob"], "b0b") and not auth.check_password(users["bob"], "x")
    assert auth.load_users({}) == {}
    with pytest.raises(ConfigError, match="user:password"):
        auth.parse_users("alice")
    with pytest.raises(ConfigError, match="Cannot read HEADSCOPE_BASIC_AUTH_FILE"):
        auth.load_users({"HEADSCOPE_BASIC_AUTH_FILE": str(tmp_path / "missing")})


def test_basic_auth_guards_every_path_but_healthz():
    server = Flask("t")
    server.add_url_rule("/", "index", lambda: "dashboard")
    server.add_url_rule("/healthz", "healthz", lambda: "ok")
    assert not auth.install_basic_auth(Flask("off"), users={})
    assert auth.install_basic_auth(server, users={"alice": "a1"})
    c = server.test_client()
    r = c.get("/")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert c.get("/", auth=("alice", "wrong")).status_code == 401
    assert c.get("/", auth=("alice", "a1")).status_code == 200
    assert c.get("/healthz").status_code == 200


# ---- the app command, served by gunicorn here ------------------------------------------------------
@pytest.fixture(scope="module")
def served_app(tmp_path_factory, compose):
    """The compose app command (bound to localhost here), in-process online work, login on."""
    cache = tmp_path_factory.mktemp("cache")
    make_run(cache / "tiny", n_images=4, model="test_vit", img_size=32)
    env = {**os.environ, "HEADSCOPE_CACHE": str(cache), "HEADSCOPE_RUN": "tiny", "HEADSCOPE_BASIC_AUTH": "alice:a1"}
    env.pop("HEADSCOPE_BROKER_URL", None)
    proc, url = start_gunicorn(compose["services"]["app"]["command"], env, cache / "gunicorn.log")
    try:
        yield url, cache / "tiny"
    finally:
        stop(proc)


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=5).ok
    except requests.RequestException:
        return False


def test_gunicorn_serves_the_dashboard_behind_the_login(served_app):
    url, _ = served_app
    health = requests.get(url + "/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["online"]["mode"] == "in-process"
    assert requests.get(url + "/", timeout=10).status_code == 401
    page = requests.get(url + "/", auth=("alice", "a1"), timeout=30)
    assert page.status_code == 200 and "HeadScope" in page.text
    config = json.loads(re.search(r'id="_dash-config"[^>]*>(.*?)</script>', page.text, re.S).group(1))
    assert config["ui"] is False  # debug off: no dev tools


def test_online_api_answers_and_explains_errors(served_app):
    url, run = served_app
    a = ("alice", "a1")
    r = requests.get(url + "/api/partial_pruning?run=tiny&image=1&layer=2&head=1", auth=a, timeout=60)
    assert r.status_code == 200
    served, here = r.json(), online.partial_pruning(run, 1, 2, 1)
    assert {k: v for k, v in served.items() if k != "rows"} == {k: v for k, v in here.items() if k != "rows"}
    # the same numbers up to float32 round-off (the server's torch threads may sum in another order)
    assert served["rows"] == [{k: pytest.approx(v, rel=1e-5, abs=1e-7) if isinstance(v, (float, list)) else v
                               for k, v in row.items()} for row in here["rows"]]
    r = requests.get(url + "/api/attention?run=tiny&image=1&layer=2&head=1", auth=a, timeout=60)
    assert r.status_code == 200 and len(r.json()["attention"]) == 5
    r = requests.get(url + "/api/attention?run=../etc&image=1&layer=2&head=1", auth=a, timeout=10)
    assert r.status_code == 400 and "Unknown run" in r.json()["error"]
    r = requests.get(url + "/api/partial_pruning?run=tiny&image=77&layer=0&head=0", auth=a, timeout=30)
    assert r.status_code == 400 and "Image 77 is not in run tiny" in r.json()["error"]
    r = requests.get(url + "/api/partial_pruning?run=tiny&image=1", auth=a, timeout=10)
    assert r.status_code == 400 and "Missing parameter 'layer'" in r.json()["error"]


# ---- the README's first command --------------------------------------------------------------------
def test_run_local_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "scripts/run_local.sh")], check=True)


@pytest.mark.skipif(not (ROOT / "app/__main__.py").is_file(), reason="app/__main__.py not written yet")
def test_run_local_script_is_fast_when_everything_exists(tmp_path):
    """With the venv installed and the default run built it goes straight to `python -m app`."""
    make_run(tmp_path / "default", n_images=2, layers=2, heads=2, grid=2)
    t = time.monotonic()
    out = subprocess.run(["bash", "scripts/run_local.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HEADSCOPE_CACHE": str(tmp_path)}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Building the default run" not in out.stdout and "usage" in out.stdout.lower()
    assert time.monotonic() - t < 300


# ---- python -m app / headscope serve: the same login as gunicorn -----------------------------------
def test_python_m_app_asks_for_the_login_like_gunicorn(tmp_path):
    """HEADSCOPE_BASIC_AUTH and HEADSCOPE_BASIC_AUTH_FILE apply to the Dash server of `python -m app`."""
    make_run(tmp_path / "tiny", n_images=2, layers=2, heads=2, grid=2)
    users = tmp_path / "users.txt"
    users.write_text("bob:b0b\n")
    port = free_port()
    env = {**os.environ, "HEADSCOPE_CACHE": str(tmp_path), "HEADSCOPE_BASIC_AUTH": "alice:a1",
           "HEADSCOPE_BASIC_AUTH_FILE": str(users)}
    env.pop("HEADSCOPE_BROKER_URL", None)
    log = tmp_path / "app.log"
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"python -m app did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        for path in ("/", "/heads", "/api/attention?run=tiny&image=0&layer=0&head=0", "/thumbs/tiny/0.png",
                     "/_dash-layout"):
            r = requests.get(url + path, timeout=30)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), path
        assert requests.get(url + "/", auth=("alice", "a1"), timeout=30).status_code == 200
        assert requests.get(url + "/", auth=("bob", "b0b"), timeout=30).status_code == 200
        assert requests.get(url + "/", auth=("bob", "a1"), timeout=30).status_code == 401
        assert requests.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        stop(proc)
    assert "login on" in log.read_text()


def test_serving_the_network_without_a_login_warns(tmp_path, monkeypatch, capsys):
    import dash
    import torch

    from analysis.cli import is_loopback, serve_main

    served = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this process's threads alone
    monkeypatch.setattr(dash.Dash, "run", lambda self, host, port, debug: served.append((host, port)))
    monkeypatch.delenv("HEADSCOPE_BASIC_AUTH", raising=False)
    monkeypatch.delenv("HEADSCOPE_BASIC_AUTH_FILE", raising=False)
    assert serve_main(["--cache-dir", str(tmp_path), "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert served == [("0.0.0.0", 8123)]
    assert "without a login" in capsys.readouterr().err
    assert serve_main(["--cache-dir", str(tmp_path)]) == 0  # localhost: no warning
    assert "without a login" not in capsys.readouterr().err
    monkeypatch.setenv("HEADSCOPE_BASIC_AUTH", "alice:a1")
    assert serve_main(["--cache-dir", str(tmp_path), "--host", "0.0.0.0"]) == 0
    assert "without a login" not in capsys.readouterr().err
    monkeypatch.setenv("HEADSCOPE_BASIC_AUTH_FILE", str(tmp_path / "missing.txt"))
    assert serve_main(["--cache-dir", str(tmp_path)]) == 2  # a clear error, no traceback, nothing served
    assert capsys.readouterr().err.startswith("error: Cannot read HEADSCOPE_BASIC_AUTH_FILE") and len(served) == 3
    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "192.168.1.5", "myhost")] == \
           [True, True, True, False, False, False]


def test_load_test_without_the_runs_directory_says_what_to_give(tmp_path):
    """scripts/load_test.py --url ... --run default without --cache-dir, where no such run is: one clear
    line naming --cache-dir, no traceback, nothing sent."""
    env = {**os.environ, "HEADSCOPE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "scripts/load_test.py", "--url", f"http://127.0.0.1:{free_port()}",
                          "--run", "default", "--users", "1", "--duration", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: the load test reads run 'default'") and "--cache-dir" in out.stderr
