"""Server-side latency of the dashboard's callbacks, measured through Dash's HTTP endpoint.

    python scripts/bench_app.py                       # 1000 images x 12 x 12 heads, + online views
    python scripts/bench_app.py --images 200 --skip-online

Builds (once) a synthetic run with scripts/make_synthetic_cache.py, creates the app, and POSTs to
/_dash-update-component in-process (Flask test client: the full Dash request path, JSON included,
no sockets) what the browser sends when the selection changes: the Explorer's two view-model
requests (app/views.py ViewModel), with the record each response gives back; a selection alternates
between a new image and a new head. Reports p50 / p95 / max.

Online views (B2/B3 partial pruning, D2-D5 attention) are timed on a second synthetic run whose
manifest names a randomly initialised model of the default model's architecture
(vit_small_patch14_dinov2, 112 px: 12 layers x 6 heads, 8x8 patches), cold = a new image/head.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path


def ensure_run(cache: Path, name: str, **kw) -> Path:
    from analysis.runs.synthetic import make_run

    out = cache / name
    if not (out / "manifest.json").is_file():
        t = time.perf_counter()
        make_run(out, **kw)
        print(f"built synthetic run {out} in {time.perf_counter() - t:.1f} s")
    return out

def parse_outputs(output: str) -> list[dict]:
    parts = output.strip(".").split("...") if output.startswith("..") else [output]
    return [{"id": p.rsplit(".", 1)[0], "property": p.rsplit(".", 1)[1]} for p in parts]

class Client:
    """Calls callbacks the way dash-renderer does, keeping the props it has seen."""

    def __init__(self, app, values: dict):
        self.http = app.server.test_client()
        assert self.http.get("/").status_code == 200
        self.deps = json.loads(self.http.get("/_dash-dependencies").data)
        self.values = dict(values)

    def call(self, cb: dict, changed: str) -> float:
        def props(items):
            return [{**i, "value": self.values.get(f"{i['id']}.{i['property']}")} for i in items]

        outs = parse_outputs(cb["output"])
        body = {"output": cb["output"], "outputs": outs if len(outs) > 1 or cb["output"].startswith("..") else outs[0],
                "inputs": props(cb["inputs"]), "state": props(cb["state"]), "changedPropIds": [changed]}
        t = time.perf_counter()
        r = self.http.post("/_dash-update-component", json=body)
        ms = (time.perf_counter() - t) * 1000
        if r.status_code == 200:
            for cid, pv in json.loads(r.data)["response"].items():
                for prop, value in pv.items():
                    if isinstance(value, dict) and "__dash_patch_update" in value:
                        continue
                    self.values[f"{cid}.{prop}"] = value
        elif r.status_code != 204:
            raise RuntimeError(f"{cb['output']}: HTTP {r.status_code} {r.data[:300]!r}")
        return ms

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

def initial_values(run: str) -> dict:
    return {"d1-color.value": "layer", "b1-overlay.value": [], "d2-own.value": [], "d3-graph.hoverData": None}


def select(client: "Client", sel: dict) -> None:
    """The state ``sel`` as the page holds it: the store sel and its k-* parts (app/state.py PARTS)."""
    from app.state import PART_WHEN, PARTS

    client.values["sel.data"] = sel
    for part, keys in PARTS.items():
        when = PART_WHEN.get(part)
        keys = keys + tuple(when["keys"]) if when and sel.get(when["if"][0]) == when["if"][1] else keys
        client.values[f"k-{part}.data"] = {k: sel.get(k) for k in keys}


def view_model(client: "Client", name: str) -> dict:
    """The Explorer's view-model callback ``name`` ("cached" or "online", app/views.py ViewModel)."""
    return next(cb for cb in client.deps if f"vm-{name}.data" in cb["output"])


def bench_cached(app, run: str, n_sel: int, seed: int, L: int, H: int, n_images: int) -> dict:
    """Server time of the cached view model (A, B1, C1-C3, D1, the header) per selection change; its
    record goes back with the next request, as the browser sends it (only changed views recompute)."""
    client = Client(app, initial_values(run))
    cb = view_model(client, "cached")
    rng = random.Random(seed)
    sel = {"run": run, "image": 0, "layer": 0, "head": 0}
    select(client, sel)
    t = time.perf_counter()
    client.call(cb, "k-image.data")  # first view of the run: builds the per-run index
    first = (time.perf_counter() - t) * 1000
    times = {"image": [], "head": []}
    for i in range(n_sel + 3):
        what = "image" if i % 2 == 0 else "head"
        if what == "image":
            sel = {**sel, "image": rng.randrange(n_images)}
        else:
            sel = {**sel, "layer": rng.randrange(L), "head": rng.randrange(H)}
        select(client, sel)
        ms = client.call(cb, f"k-{what}.data")
        if i >= 3:  # the first selections warm caches (figure backgrounds)
            times[what].append(ms)
    return {"first_view_ms": first, "times": times}


def bench_online(app, run: str, n: int, seed: int, L: int, H: int, n_images: int) -> dict:
    """Server time of the online view model (B2/B3, D2-D5 in parallel threads) for a new image and
    head (a cold result), and for a threshold change."""
    client = Client(app, initial_values(run))
    cb = view_model(client, "online")
    rng = random.Random(seed)
    select(client, {"run": run, "image": 0, "layer": 0, "head": 0})
    t = time.perf_counter()
    client.call(cb, "k-image.data")
    load = (time.perf_counter() - t) * 1000
    res = {"model_load_ms": load, "new_head": [], "threshold": []}
    for _ in range(n):
        sel = {"run": run, "image": rng.randrange(n_images), "layer": rng.randrange(L), "head": rng.randrange(H)}
        select(client, sel)
        res["new_head"].append(client.call(cb, "k-image.data"))
        select(client, {**sel, "thr": f"q{rng.uniform(0.1, 10):.3g}"})
        res["threshold"].append(client.call(cb, "k-thr.data"))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("HEADSCOPE_BENCH_CACHE", "/tmp/headscope-bench"),
                    help="where the synthetic runs are written (default /tmp/headscope-bench)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--selections", type=int, default=60, help="selection changes to time (default 60)")
    ap.add_argument("--online", type=int, default=8, help="new image/head pairs for the online views (default 8)")
    ap.add_argument("--online-model", default="vit_small_patch14_dinov2")
    ap.add_argument("--online-img-size", type=int, default=112)
    ap.add_argument("--skip-online", action="store_true")
    ap.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="CPU threads for the in-process model (default 1, as `python -m app`)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.torch_threads))
    cache = Path(args.cache)
    name = f"bench-{args.images}x{args.layers}x{args.heads}"
    ensure_run(cache, name, n_images=args.images, layers=args.layers, heads=args.heads, n_classes=20, seed=args.seed)
    from app import create_app

    t = time.perf_counter()
    app = create_app(cache, name)
    print(f"create_app: {(time.perf_counter() - t) * 1000:.0f} ms")
    r = bench_cached(app, name, args.selections, args.seed, args.layers, args.heads, args.images)
    print(f"\nCached views (A, B1, C1-C3, D1, the header: one request), run {name} ({args.images} images x "
          f"{args.layers * args.heads} heads), {args.selections} selection changes (image / head alternately):")
    print(f"  first view of the run (index build + all views): {r['first_view_ms']:.0f} ms")
    for what, ms in r["times"].items():
        print(f"  a new {what:5s}  p50 {pct(ms, 50):7.1f}  p95 {pct(ms, 95):7.1f}  max {max(ms):7.1f} ms")
    report = {"cached": {k: v for k, v in r.items()}}
    if not args.skip_online:
        oname = f"bench-online-{args.online_model}-{args.online_img_size}"
        ensure_run(cache, oname, n_images=50, n_classes=10, seed=args.seed, model=args.online_model,
                   img_size=args.online_img_size)
        from analysis.runs.reader import open_run

        mf = open_run(cache / oname).model
        o = bench_online(app, oname, args.online, args.seed, mf["depth"], mf["heads"], 50)
        print(f"\nOnline views, {args.online_model} at {args.online_img_size} px (random weights; "
              f"{mf['depth']} layers x {mf['heads']} heads, grid {mf['grid']}), in-process on the CPU, "
              f"{torch.get_num_threads()} torch thread(s):")
        print(f"  first query (loads the model): {o['model_load_ms']:.0f} ms")
        for key, label in (("new_head", "a new image and head (B2/B3 + D2-D5, one request)"),
                           ("threshold", "a threshold change (D3-D5)")):
            v = o[key]
            print(f"  {label:50s} p50 {pct(v, 50):7.1f}  p95 {pct(v, 95):7.1f}  max {max(v):7.1f} ms")
        report["online"] = o
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())
