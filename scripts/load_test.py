"""Load test: N concurrent users against a served HeadScope app with a model worker.

Each simulated user opens the dashboard once (page, layout, callback list), then loops until
--duration: picks a random image and head, fires the page callbacks that read the selection
(POST /_dash-update-component, found in /_dash-dependencies) and asks the two online queries
(GET /api/partial_pruning and /api/attention). Prints throughput, p50/p95 latency and errors.

Against a running app (gunicorn app.wsgi:server, with or without a worker):
    python scripts/load_test.py --url http://127.0.0.1:8050 --run default --users 10
Or let it serve everything on free localhost ports (redis-server, Celery worker, gunicorn):
    python scripts/load_test.py --serve --cache-dir /tmp/hs --run synthetic --users 50
(--serve with --make-run writes a synthetic run with a small random model first.)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import requests

from analysis.errors import HeadScopeError
from analysis.runs import store

ROOT = Path(__file__).resolve().parent.parent


# ---- the simulated user ------------------------------------------------------------------------
class Stats:
    def __init__(self):
        self.lat = defaultdict(list)
        self.errors = defaultdict(int)
        self.examples: dict[str, str] = {}
        self.lock = threading.Lock()

    def add(self, kind: str, seconds: float, error: str | None = None) -> None:
        with self.lock:
            self.lat[kind].append(seconds)
            if error:
                self.errors[kind] += 1
                self.examples.setdefault(kind, error)


def collect_props(tree, props: dict) -> dict:
    """Walk a Dash layout (JSON) and record each component's props by its (string) id."""
    if isinstance(tree, list):
        for t in tree:
            collect_props(t, props)
    elif isinstance(tree, dict):
        if "props" in tree and "type" in tree:
            if isinstance(tree["props"].get("id"), str):
                props.setdefault(tree["props"]["id"], {}).update(tree["props"])
            for value in tree["props"].values():
                collect_props(value, props)
        else:
            for value in tree.values():
                collect_props(value, props)
    return props


def split_outputs(output: str) -> list[tuple[str, str]]:
    """Dash's output key ('a.b' or '..a.b...c.d..', maybe with '@hash') -> [(id, property)]."""
    output = output.split("@")[0]
    parts = output.strip(".").split("...") if output.startswith("..") else [output]
    return [tuple(p.rsplit(".", 1)) for p in parts]


def callback_body(cb: dict, props: dict, changed: list[str]) -> dict:
    """The request the Dash renderer sends for ``cb`` given the current component ``props``."""
    def dep(d):
        return {"id": d["id"], "property": d["property"], "value": props.get(d["id"], {}).get(d["property"])}

    outs = [{"id": i, "property": p} for i, p in split_outputs(cb["output"])]
    return {"output": cb["output"], "outputs": outs if cb["output"].startswith("..") else outs[0],
            "inputs": [dep(d) for d in cb["inputs"]], "state": [dep(d) for d in cb.get("state", [])],
            "changedPropIds": changed}


def apply_response(r, props: dict) -> None:
    """Fold a callback response into ``props`` (as the renderer would) and collect new components."""
    if r is not None and r.status_code == 200:
        for cid, values in r.json().get("response", {}).items():
            props.setdefault(cid, {}).update(values)
            collect_props(values, props)


def user(base: str, run: str, facts: dict, stats: Stats, stop_at: float, auth, timeout: float) -> None:
    """One user on the Explorer page: open it, then select random heads until ``stop_at``."""
    s = requests.Session()
    s.auth = auth

    def call(kind, method, path, **kw):
        t = time.perf_counter()
        try:
            r = s.request(method, base + path, timeout=timeout, **kw)
            err = None if r.status_code < 400 else f"HTTP {r.status_code}: {r.text[:300]}"
        except requests.RequestException as e:
            r, err = None, f"{type(e).__name__}: {e}"
        stats.add(kind, time.perf_counter() - t, err)
        return r

    call("page", "GET", f"/?run={run}")
    layout, deps = call("page", "GET", "/_dash-layout"), call("page", "GET", "/_dash-dependencies")
    if layout is None or deps is None or not layout.ok or not deps.ok:
        return
    props = collect_props(layout.json(), {})
    props.setdefault("url", {}).update(pathname="/", search=f"?run={run}")
    server_side = [cb for cb in deps.json() if not cb.get("clientside_function")]
    for cb in server_side:  # the page itself (use_pages renders it in a callback)
        if ("_pages_location", "pathname") in [(d["id"], d["property"]) for d in cb["inputs"]]:
            props.setdefault("_pages_location", {}).update(pathname="/", search=f"?run={run}")
            apply_response(call("page", "POST", "/_dash-update-component",
                                json=callback_body(cb, props, ["_pages_location.pathname"])), props)
    # the callbacks a new selection fires on this page (their outputs are on the page)
    views = [cb for cb in server_side if ("sel", "data") in [(d["id"], d["property"]) for d in cb["inputs"]]
             and all(i in props for i, _ in split_outputs(cb["output"]))]
    rng = random.Random()
    while time.monotonic() < stop_at:
        sel = {"run": run, "image": rng.choice(facts["images"]), "layer": rng.randrange(facts["depth"]),
               "head": rng.randrange(facts["heads"])}
        props["sel"]["data"] = sel
        for cb in views:
            apply_response(call("callback", "POST", "/_dash-update-component",
                                json=callback_body(cb, props, ["sel.data"])), props)
        q = f"?run={run}&image={sel['image']}&layer={sel['layer']}&head={sel['head']}"
        call("partial_pruning", "GET", "/api/partial_pruning" + q)
        call("attention", "GET", "/api/attention" + q)


def report(stats: Stats, seconds: float, users: int) -> str:
    lines = [f"{users} users, {seconds:.1f} s", f"{'request':<16}{'n':>7}{'errors':>8}{'req/s':>8}"
                                                  f"{'p50 ms':>9}{'p95 ms':>9}"]
    total = errors = 0
    for kind in ("page", "callback", "partial_pruning", "attention"):
        lat = sorted(stats.lat.get(kind, []))
        if not lat:
            continue
        total, errors = total + len(lat), errors + stats.errors[kind]
        p50 = statistics.median(lat) * 1e3
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1e3
        lines.append(f"{kind:<16}{len(lat):>7}{stats.errors[kind]:>8}{len(lat) / seconds:>8.1f}{p50:>9.0f}{p95:>9.0f}")
    all_lat = sorted(x for v in stats.lat.values() for x in v)
    if all_lat:
        lines.append(f"{'all':<16}{total:>7}{errors:>8}{total / seconds:>8.1f}"
                     f"{statistics.median(all_lat) * 1e3:>9.0f}{all_lat[int(0.95 * (len(all_lat) - 1))] * 1e3:>9.0f}")
    for kind, example in stats.examples.items():
        lines.append(f"first {kind} error: {example}")
    return "\n".join(lines)


# ---- serving the stack locally (--serve) -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not come up within {timeout:.0f} s")


def serve(stack: ExitStack, cache_dir: Path, run: str, gunicorn_workers: int, threads: int, logs: Path) -> str:
    """Start redis-server, a Celery worker and gunicorn on free localhost ports; return the app URL."""
    def start(name, cmd, env=None):
        log = (logs / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(lambda: (proc.terminate(), proc.wait(30)))
        return proc

    rport, aport = free_port(), free_port()
    broker = f"redis://127.0.0.1:{rport}/0"
    start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(logs)])
    env = {**os.environ, "HEADSCOPE_BROKER_URL": broker, "HEADSCOPE_CACHE": str(cache_dir),
           "HEADSCOPE_RUN": run, "PYTHONPATH": str(ROOT)}
    start("worker", [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=threads",
                     "--concurrency=4", "-Q", "online,build", "--without-gossip", "--without-mingle"], env)
    start("gunicorn", [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{aport}", "--worker-class",
                       "gthread", "--workers", str(gunicorn_workers), "--threads", str(threads),
                       "--timeout", "120", "app.wsgi:server"], env)
    url = f"http://127.0.0.1:{aport}"
    wait_for(lambda: requests.get(url + "/healthz", timeout=5).json()["online"]["ok"],
             "the app with its worker (see logs in " + str(logs) + ")")
    return url


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running app, e.g. http://127.0.0.1:8050 (else use --serve)")
    ap.add_argument("--serve", action="store_true", help="start redis-server, a worker and gunicorn here")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="runs directory, the one the app serves: the run's image ids and heads are read from it "
                         "(default $HEADSCOPE_CACHE or cache/)")
    ap.add_argument("--run", default="default", help="run to query (a name under --cache-dir)")
    ap.add_argument("--make-run", action="store_true",
                    help="with --serve: first write a synthetic run (test_vit, 40 images) named --run")
    ap.add_argument("--users", type=int, default=10, help="concurrent users (default 10)")
    ap.add_argument("--duration", type=float, default=30, help="seconds of load (default 30)")
    ap.add_argument("--warmup", type=float, default=0, help="seconds of unmeasured load first (default 0)")
    ap.add_argument("--timeout", type=float, default=90, help="per-request timeout in s (default 90)")
    ap.add_argument("--auth", default=None, help="user:password when the app asks for a login")
    ap.add_argument("--gunicorn-workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker (default 8)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if not args.url and not args.serve:
        ap.error("give --url of a running app or --serve")
    cache_dir = args.cache_dir or store.default_cache_dir()
    if args.make_run:
        from analysis.runs.synthetic import make_run

        make_run(cache_dir / args.run, n_images=40, model="test_vit", img_size=64)
    try:  # the simulated users pick image ids and heads of the run: read them here
        run = store.open_run(cache_dir / args.run)
        facts = {"images": run.images.image_id.astype(int).tolist(), "depth": int(run.model["depth"]),
                 "heads": int(run.model["heads"])}
    except HeadScopeError as err:
        where = "" if args.cache_dir else " (no --cache-dir given: looked in $HEADSCOPE_CACHE or cache/)"
        print(f"error: the load test reads run {args.run!r} from {cache_dir}{where} to pick its images and heads, "
              f"and cannot: {err}\nGive --cache-dir DIR, the runs directory the app at {args.url or 'the stack'} "
              "serves (or a copy of it).", file=sys.stderr)
        return 2
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    with ExitStack() as stack:
        url = args.url or serve(stack, cache_dir.resolve(), args.run, args.gunicorn_workers, args.threads,
                                Path(tempfile.mkdtemp(prefix="headscope-load-")))
        results = {}
        for phase, seconds in (("warmup", args.warmup), ("measured", args.duration)):
            if seconds <= 0:
                continue
            stats = Stats()
            stop_at = time.monotonic() + seconds
            t = time.monotonic()
            threads = [threading.Thread(target=user, args=(url, args.run, facts, stats, stop_at, auth, args.timeout))
                       for _ in range(args.users)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            results[phase] = (stats, time.monotonic() - t)
        stats, seconds = results["measured"]
        print(f"HeadScope load test against {url}, run {args.run}")
        print(report(stats, seconds, args.users))
        if args.json:
            args.json.write_text(json.dumps({k: {"n": len(v), "errors": stats.errors[k],
                                                 "p50": statistics.median(v), "seconds": seconds}
                                             for k, v in stats.lat.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
