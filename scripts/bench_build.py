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
4. stages (``--only stages``): what each optional stage costs against the plain default build,
   in the same run: (a) the image stage's engine (analyse_batch) on the same images with no optional
   stage (the plain baseline) and with each image-level stage (taylor, mean_ablation) and all of them,
   seconds and ratio to plain; (b) the plain default build and the ``--all-stages`` build end to end,
   each stage's seconds from their manifests side by side with the ratio, and both wall times.
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

from bench_timing import timed  # noqa: E402  (this folder)

ROOT = Path(__file__).resolve().parent.parent


def bench_default_build(limit: int, threads: int | None, extra: tuple[str, ...] = ()) -> dict:
    """Wall time of `build_cache.py --limit N` (+ ``extra`` options) for the embedded default run in a
    fresh directory."""
    with tempfile.TemporaryDirectory(prefix="headscope-bench-") as tmp:
        out = Path(tmp) / "default"
        cmd = [sys.executable, str(ROOT / "scripts" / "build_cache.py"), "--limit", str(limit), "--out", str(out),
               *extra]
        if threads:
            cmd += ["--threads", str(threads)]
        t, cpu = time.perf_counter(), children_cpu_s()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - t, children_cpu_s() - cpu
        if proc.returncode != 0:
            raise SystemExit(f"default build failed:\n{proc.stderr[-3000:]}")
        manifest = json.loads((out / "manifest.json").read_text())
    return {"images": limit, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "timings_s": manifest["timings"],
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


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children: on a shared machine a steadier
    figure than the wall time."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


IMAGE_STAGES = ("taylor", "mean_ablation")  # the optional stages that add work to the per-image engine


def bench_image_stages(n_images: int, batch_size: int) -> dict:
    """analyse_batch over the same images without optional stages (plain) and with each image-level
    stage: seconds and ratio to plain (mean ablation gets the head means of these images, as the
    build's first pass would give)."""
    import torch

    from analysis import load_vit
    from analysis.datasets import load_image_set, open_image
    from analysis.metrics.ablation import head_means
    from analysis.metrics.engine import analyse_batch

    vit = load_vit("default")
    items = load_image_set("fashion", limit=n_images).items
    x = vit.preprocess([open_image(it.ref) for it in items])
    y = torch.tensor([it.label for it in items])
    means_s, means = timed(lambda: head_means(vit, x, batch_size=batch_size))
    analyse_batch(vit, x[:2], y[:2])  # warm-up

    def run(stages):
        for s in range(0, n_images, batch_size):
            analyse_batch(vit, x[s:s + batch_size], y[s:s + batch_size], stages=stages,
                          options={"head_means": means} if "mean_ablation" in stages else None)

    seconds, cpu = {}, {}
    for name, stages in [("plain", ()), *((st, (st,)) for st in IMAGE_STAGES), ("all", IMAGE_STAGES)]:
        c = time.process_time()
        seconds[name] = timed(lambda: run(stages))[0]
        cpu[name] = time.process_time() - c
    return {"images": n_images, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "head_means_s": round(means_s, 2), "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
            "ratio_to_plain": {k: round(v / seconds["plain"], 2) for k, v in seconds.items()},
            "cpu_ratio_to_plain": {k: round(v / cpu["plain"], 2) for k, v in cpu.items()}}


def bench_stage_builds(limit: int, threads: int | None) -> dict:
    """The plain default build and the --all-stages build, each stage's seconds side by side."""
    plain = bench_default_build(limit, threads)
    full = bench_default_build(limit, threads, ("--all-stages",))
    names = list(dict.fromkeys([*plain["timings_s"], *full["timings_s"]]))
    rows = {k: {"plain_s": plain["timings_s"].get(k), "all_stages_s": full["timings_s"].get(k)} for k in names}
    return {"images": limit, "plain_wall_s": plain["wall_s"], "all_stages_wall_s": full["wall_s"],
            "ratio": round(full["wall_s"] / plain["wall_s"], 2), "plain_cpu_s": plain["cpu_s"],
            "all_stages_cpu_s": full["cpu_s"], "cpu_ratio": round(full["cpu_s"] / max(plain["cpu_s"], 1e-9), 2),
            "stages": rows,
            "threads": [plain["threads"], full["threads"]]}


def print_stages(image: dict, builds: dict | None) -> None:
    print(f"      image-stage engine on {image['images']} images ({image['threads']} threads; head means "
          f"{image['head_means_s']} s):")
    for k, v in image["seconds"].items():
        print(f"        {k:14s} {v:8.1f} s  x{image['ratio_to_plain'][k]:.2f} of plain   (CPU {image['cpu_s'][k]:.1f} s, "
              f"x{image['cpu_ratio_to_plain'][k]:.2f})")
    if builds is None:
        return
    print(f"      builds of {builds['images']} images (threads {builds['threads']}): stage, plain s, all-stages s")
    for k, row in builds["stages"].items():
        a, b = row["plain_s"], row["all_stages_s"]
        ratio = f"x{b / a:.2f}" if a and b is not None else ""
        print(f"        {k:16s} {'-' if a is None else f'{a:.1f}':>8s} {'-' if b is None else f'{b:.1f}':>8s}  {ratio}")
    print(f"      wall: plain {builds['plain_wall_s']:.0f} s, all stages {builds['all_stages_wall_s']:.0f} s "
          f"(x{builds['ratio']:.2f}); CPU: plain {builds['plain_cpu_s']:.0f} s, all stages "
          f"{builds['all_stages_cpu_s']:.0f} s (x{builds['cpu_ratio']:.2f})", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["build", "throughput", "layout", "stages"],
                   help="run one measurement (stages: only with --only; --skip-build keeps its part (a))")
    p.add_argument("--skip-build", action="store_true", help="skip the end-to-end default build")
    p.add_argument("--limit", type=int, default=200, help="images of the default build (default 200)")
    p.add_argument("--throughput-images", type=int, default=16, help="images for engine vs naive and for the stages' engine figures (default 16)")
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
    if args.only == "stages":
        print("[4/4] optional stages against the plain build ...", flush=True)
        figures["image_stages"] = image = bench_image_stages(args.throughput_images, args.batch_size)
        figures["stage_builds"] = builds = None if args.skip_build else bench_stage_builds(args.limit, args.threads)
        print_stages(image, builds)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
