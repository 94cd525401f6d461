"""Benchmark the cache build on this machine.

    python scripts/bench_build.py                       # all three measurements
    python scripts/bench_build.py --skip-build          # throughput + layout only
    python scripts/bench_build.py --only layout --layout-points 144000

1. build: the embedded default run end to end (model "default" on 200 "fashion" images) through
   scripts/build_cache.py, wall clock including start-up, written to a temporary directory.
2. throughput: images/s of the build's per-image stage (engine.analyse_batch: importance,
   strength, CLS vectors, patch bits) vs the naive loop (one unpruned forward plus one full
   forward per pruned head, ``vit(images, prune=[(l, h, 1)])``; it yields only the output-level
   metrics, so it is a lower bound on the naive cost), on the same images and threads.
3. layout: analysis.layouts.tsne_2d on a synthetic clustered set of 144k points (1000 images x
   144 heads) with 32 dimensions (the autoencoder latent size).
Prints a summary and writes the figures as JSON with --json PATH.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_default_build(limit: int, threads: int | None) -> dict:
    """Wall time of `build_cache.py --limit N` for the embedded default run in a fresh directory."""
    with tempfile.TemporaryDirectory(prefix="headscope-bench-") as tmp:
        out = Path(tmp) / "default"
        cmd = [sys.executable, str(ROOT / "scripts" / "build_cache.py"), "--limit", str(limit), "--out", str(out)]
        if threads:
            cmd += ["--threads", str(threads)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"default build failed:\n{proc.stderr[-3000:]}")
        manifest = json.loads((out / "manifest.json").read_text())
    return {"images": limit, "wall_s": round(wall, 1), "timings_s": manifest["timings"],
            "threads": manifest["params"]["threads"], "cache_bytes": manifest["sizes"]["cache_bytes"],
            "summary": proc.stdout.strip().splitlines()}


def bench_throughput(n_images: int, batch_size: int) -> dict:
    """Images/s of engine.analyse_batch vs the naive pruned-forward loop on the default model."""
    import numpy as np
    import torch

    from analysis import load_vit
    from analysis.datasets import load_image_set, open_image
    from analysis.metrics.engine import analyse_batch

    vit = load_vit("default")
    items = load_image_set("fashion", limit=n_images).items
    x = vit.preprocess([open_image(it.ref) for it in items])
    y = torch.tensor([it.label for it in items])
    analyse_batch(vit, x[:2], y[:2])  # warm-up

    t = time.perf_counter()
    results = [analyse_batch(vit, x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, n_images, batch_size)]
    engine_s = time.perf_counter() - t
    engine_prob = np.concatenate([r.importance["prob"] for r in results])

    heads = [(l, h) for l in range(vit.depth) for h in range(vit.num_heads)]
    naive_prob = np.zeros_like(engine_prob)
    t = time.perf_counter()
    for s in range(0, n_images, batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        vit(xb)  # the unpruned reference
        for l, h in heads:
            p = torch.softmax(vit(xb, prune=[(l, h, 1)]).double(), -1)
            naive_prob[s:s + batch_size, l, h] = p[torch.arange(len(yb)), yb].numpy()
    naive_s = time.perf_counter() - t
    return {"images": n_images, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "engine_images_per_s": round(n_images / engine_s, 3), "naive_images_per_s": round(n_images / naive_s, 3),
            "speedup": round(naive_s / engine_s, 2), "naive_forwards_per_batch": len(heads) + 1,
            "max_abs_prob_difference": float(np.abs(engine_prob - naive_prob).max())}


def bench_layout(n_points: int, dims: int, threads: int) -> dict:
    """tsne_2d time on n_points synthetic points in 144 clusters (one per head)."""
    import numpy as np

    from analysis.runs.layouts import tsne_2d, tsne_settings

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (144, dims))
    labels = rng.integers(0, 144, n_points)
    X = (centres[labels] + rng.normal(0, 1, (n_points, dims))).astype(np.float32)
    t = time.perf_counter()
    xy = tsne_2d(X, seed=0, n_jobs=threads)
    seconds = time.perf_counter() - t
    # Quality: how often a point's nearest layout neighbour is from its own cluster.
    from sklearn.neighbors import NearestNeighbors

    sample = rng.choice(n_points, 5000, replace=False)
    nn = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy[sample], return_distance=False)[:, 1]
    return {"points": n_points, "dims": dims, "threads": threads, "seconds": round(seconds, 1),
            "settings": tsne_settings(n_points), "nearest_neighbour_same_cluster": float((labels[nn] == labels[sample]).mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["build", "throughput", "layout"], help="run one measurement")
    p.add_argument("--skip-build", action="store_true", help="skip the end-to-end default build")
    p.add_argument("--limit", type=int, default=200, help="images of the default build (default 200)")
    p.add_argument("--throughput-images", type=int, default=16, help="images for engine vs naive (default 16)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layout-points", type=int, default=144_000)
    p.add_argument("--threads", type=int, help="CPU threads (default: the idle cores, as the build picks)")
    p.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = p.parse_args(argv)

    import torch

    from analysis.runs.build import auto_threads

    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    figures = {"threads": threads}
    want = lambda name: args.only in (None, name)
    if want("build") and not (args.skip_build and args.only is None):
        print(f"[1/3] default build, {args.limit} images ...", flush=True)
        figures["default_build"] = r = bench_default_build(args.limit, args.threads)
        print("\n".join("      " + line for line in r["summary"]))
        print(f"      -> {r['wall_s']:.0f} s end to end ({r['wall_s'] / 60:.1f} min)", flush=True)
    if want("throughput"):
        print(f"[2/3] engine vs naive on {args.throughput_images} images ...", flush=True)
        figures["throughput"] = r = bench_throughput(args.throughput_images, args.batch_size)
        print(f"      engine {r['engine_images_per_s']} images/s, naive {r['naive_images_per_s']} images/s "
              f"-> {r['speedup']}x (max |prob difference| {r['max_abs_prob_difference']:.1e})", flush=True)
    if want("layout"):
        print(f"[3/3] t-SNE layout of {args.layout_points} synthetic points ...", flush=True)
        figures["layout"] = r = bench_layout(args.layout_points, 32, threads)
        print(f"      {r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min); nearest neighbour in own cluster "
              f"{r['nearest_neighbour_same_cluster']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
