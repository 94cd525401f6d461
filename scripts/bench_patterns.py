"""Benchmark the pattern labels (analysis.metrics.patterns) against the build's image stage.

    python scripts/bench_patterns.py                          # default model, 16 fashion images
    python scripts/bench_patterns.py --model default-backbone --dataset photos
    python scripts/bench_patterns.py --run /tmp/pat-default   # also: all patch bits of a built run

1. batch: engine.analyse_batch on one batch (the image stage's work per batch) without the pattern
   metrics, with them (the default), and pattern_arrays alone on that batch's patch bits, same
   process and threads; overhead = pattern_arrays / analyse_batch without the labels.
2. run (--run): pattern_arrays + consistency on every patch bit of a built run vs the image-stage
   seconds that build recorded (manifest timings.images).
3. consistency: on synthetic bits of 200 and 1000 images with the model's L x H x P (merge time).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dataset", default="fashion")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run", help="a built run directory whose parts to label")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from analysis import load_vit
    from analysis.datasets import load_image_set, open_image
    from analysis.metrics.engine import analyse_batch
    from analysis.metrics import registry
    from analysis.metrics.patterns import PATTERN_METRICS, consistency, pattern_arrays
    from analysis.runs.build import collect_parts, read_manifest

    torch.set_num_threads(args.threads)
    vit = load_vit(args.model)
    items = load_image_set(args.dataset, limit=args.batch_size).items
    x = vit.preprocess([open_image(it.ref) for it in items])
    labels = torch.tensor([max(it.label, 0) for it in items]) if vit.has_head else None
    others = [m.name for m in registry.computed_metrics("image_head") if m.name not in PATTERN_METRICS]
    t = time.perf_counter()
    result = analyse_batch(vit, x, labels, metrics=others)  # the image stage without the labels
    without_s = time.perf_counter() - t
    t = time.perf_counter()
    analyse_batch(vit, x, labels)  # the default image stage (labels included)
    with_s = time.perf_counter() - t
    labels_s = best_of(lambda: pattern_arrays(result["patch_bits"], vit.grid), 3)
    out = {"model": args.model, "grid": list(vit.grid), "L": vit.depth, "H": vit.num_heads, "threads": args.threads,
           "batch": {"images": len(items), "analyse_batch_without_labels_s": round(without_s, 3),
                     "analyse_batch_with_labels_s": round(with_s, 3), "pattern_arrays_s": round(labels_s, 4),
                     "overhead": round(labels_s / without_s, 5), "with_over_without": round(with_s / without_s, 4)}}
    if args.run:
        run = Path(args.run)
        bits = collect_parts(run, read_manifest(run)["dataset"]["n_images"])["patch_bits"]
        image_stage = read_manifest(run)["timings"]["images"]
        lab = best_of(lambda: pattern_arrays(bits, vit.grid), 1)
        con = best_of(lambda: consistency(bits), 1)
        out["run"] = {"dir": str(run), "images": len(bits), "image_stage_s": image_stage,
                      "pattern_arrays_s": round(lab, 3), "consistency_s": round(con, 3),
                      "overhead": round((lab + con) / image_stage, 5)}
    rng = np.random.default_rng(0)
    nbytes = result["patch_bits"].shape[-1]
    for n in (200, 1000):
        bits = rng.integers(0, 256, size=(n, vit.depth, vit.num_heads, nbytes), dtype=np.uint8)
        out[f"consistency_{n}_s"] = round(best_of(lambda: consistency(bits), 1), 3)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
