"""Server-side latency of the dashboard's callbacks, measured through Dash's HTTP endpoint.

    python scripts/bench_app.py                       # 1000 images x 12 x 12 heads, + online views
    python scripts/bench_app.py --images 200 --skip-online

Builds (once) a synthetic run with scripts/make_synthetic_cache.py, creates the app, and POSTs to
/_dash-update-component in-process (Flask test client: the full Dash request path, JSON included,
no sockets) exactly what the browser sends when the selection changes. Every Explorer callback
that depends on the selection is timed; a selection alternates between a new image and a new
head. Reports p50 / p95 / max per callback and over all of them.

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


ONLINE_IDS = ("b2-graph", "d3-graph", "d2-images")

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

    def callbacks_on(self, prop: str, ids: set[str]) -> list[dict]:
        """Callbacks with input ``prop`` whose outputs are all among ``ids`` (one page)."""
        found = []
        for cb in self.deps:
            if cb.get("clientside_function") or not any(f"{i['id']}.{i['property']}" == prop for i in cb["inputs"]):
                continue
            if all(o["id"] in ids for o in parse_outputs(cb["output"])):
                found.append(cb)
        return found

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

def component_ids(layout) -> set[str]:
    ids, stack = set(), [layout]
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):
            stack.extend(node)
            continue
        if getattr(node, "id", None) is not None and isinstance(node.id, str):
            ids.add(node.id)
        for attr in ("children", "label"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                stack.append(child)
    return ids

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

def initial_values(run: str) -> dict:
    return {"sel.data": {"run": run, "image": None, "layer": None, "head": None}, "metric.value": "prob",
            "d1-kind.value": "cls", "d1-style.value": "density", "d1-key.data": None, "prune-mode.data": 1,
            "q-slider.value": 0.0, "d3-graph.hoverData": None}

def bench_cached(app, run: str, n_sel: int, seed: int, L: int, H: int, n_images: int) -> dict:

    page_ids = component_ids(sys.modules["app.pages.explorer"].layout())
    client = Client(app, initial_values(run))
    cbs = [cb for cb in client.callbacks_on("sel.data", page_ids)
           if not any(o["id"] in ONLINE_IDS for o in parse_outputs(cb["output"]))]
    rng = random.Random(seed)
    t = time.perf_counter()
    for cb in cbs:  # first view of the run: builds the per-run index
        client.call(cb, "sel.data")
    first = (time.perf_counter() - t) * 1000
    times = {cb["output"]: [] for cb in cbs}
    events = []
    sel = {"run": run, "image": 0, "layer": 0, "head": 0}
    for i in range(n_sel + 3):
        if i % 2 == 0:
            sel = {**sel, "image": rng.randrange(n_images)}
        else:
            sel = {**sel, "layer": rng.randrange(L), "head": rng.randrange(H)}
        client.values["sel.data"] = sel
        per = [client.call(cb, "sel.data") for cb in cbs]
        if i >= 3:  # the first selections warm caches (figure backgrounds)
            for cb, ms in zip(cbs, per):
                times[cb["output"]].append(ms)
            events.append((max(per), sum(per)))
    return {"first_view_ms": first, "times": times, "events": events}

def bench_online(app, run: str, n: int, seed: int, L: int, H: int, n_images: int) -> dict:
    page_ids = component_ids(sys.modules["app.pages.explorer"].layout())
    client = Client(app, initial_values(run))
    cbs = {o: cb for cb in client.callbacks_on("sel.data", page_ids)
           for o in ONLINE_IDS if o in cb["output"]}
    rng = random.Random(seed)
    client.values["sel.data"] = {"run": run, "image": 0, "layer": 0, "head": 0}
    t = time.perf_counter()
    client.call(cbs["d3-graph"], "sel.data")
    load = (time.perf_counter() - t) * 1000
    res = {"model_load_ms": load, "attention_views": [], "d3_d5": [], "d2": [], "pruning": [], "threshold": []}
    for _ in range(n):
        client.values["sel.data"] = {"run": run, "image": rng.randrange(n_images), "layer": rng.randrange(L),
                                     "head": rng.randrange(H)}
        d35 = client.call(cbs["d3-graph"], "sel.data")
        d2 = client.call(cbs["d2-images"], "sel.data")
        res["d3_d5"].append(d35)
        res["d2"].append(d2)
        res["attention_views"].append(d35 + d2)
        res["pruning"].append(client.call(cbs["b2-graph"], "sel.data"))
        client.values["q-slider.value"] = rng.uniform(-1, 1)
        res["threshold"].append(client.call(cbs["d3-graph"], "q-slider.value"))
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
    print(f"\nCached views, run {name} ({args.images} images x {args.layers * args.heads} heads), "
          f"{args.selections} selection changes (image / head alternately), server time per callback:")
    print(f"  first view of the run (index build + all views): {r['first_view_ms']:.0f} ms")
    print(f"  {'callback outputs':58s} {'p50':>7s} {'p95':>7s} {'max':>7s}")
    every = []
    for out, ms in r["times"].items():
        every += ms
        print(f"  {out[:58]:58s} {pct(ms, 50):7.1f} {pct(ms, 95):7.1f} {max(ms):7.1f}")
    print(f"  {'ALL callbacks':58s} {pct(every, 50):7.1f} {pct(every, 95):7.1f} {max(every):7.1f}")
    slowest = [e[0] for e in r["events"]]
    total = [e[1] for e in r["events"]]
    print(f"  per selection, slowest callback: p50 {pct(slowest, 50):.1f}  p95 {pct(slowest, 95):.1f} ms; "
          f"all callbacks back to back: p50 {pct(total, 50):.1f}  p95 {pct(total, 95):.1f} ms")
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
        for key, label in (("attention_views", "D2-D5 for a new image/head (attention + 4 views)"),
                           ("d3_d5", "  of which D3-D5 callback"), ("d2", "  of which D2 callback"),
                           ("pruning", "B2/B3 partial pruning (8 modes)"), ("threshold", "threshold change (D3-D5)")):
            v = o[key]
            print(f"  {label:50s} p50 {pct(v, 50):7.1f}  p95 {pct(v, 95):7.1f}  max {max(v):7.1f} ms")
        report["online"] = o
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())
