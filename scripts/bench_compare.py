"""Benchmark the Compare page's callbacks on two synthetic 1000-image runs (the one run writer).

    python scripts/bench_compare.py                  # 2 runs x 1000 images x 12 x 12 heads
    python scripts/bench_compare.py --images 200 --keep /tmp/cmp

Times, per metric, the page's three server callbacks (metric choice, profiles + difference +
rank table, per-image scatter) cold (first use of the runs: tables read) and warm, and as a
baseline the plain read of both runs' head_summary tables in the same process.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--keep", help="write the runs here and keep them (default: a temporary folder)")
    args = p.parse_args(argv)

    import pandas as pd

    from analysis.runs.synthetic import make_run

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hs-bench-compare-"))
    for name, seed in (("a", 0), ("b", 1)):
        if not (root / name / "manifest.json").is_file():
            make_run(root / name, n_images=args.images, layers=12, heads=12, grid=14, seed=seed)
            mf = json.loads((root / name / "manifest.json").read_text())
            mf["dataset"]["fingerprint"] = f"synthetic-{args.images}"  # the same images: the scatter is drawn
            (root / name / "manifest.json").write_text(json.dumps(mf))
    from app import create_app

    create_app(root, "a")
    page = sys.modules["app.pages.compare"]
    t = time.perf_counter()
    for name in ("a", "b"):
        pd.read_parquet(root / name / "head_summary.parquet")
    baseline = time.perf_counter() - t

    def render(metric):
        t = time.perf_counter()
        page.compare_metric(["a", "b"], metric)
        profiles, diff, ranks, _ = page.compare_view(["a", "b"], metric)
        scatter = page.compare_scatter(["a", "b"], metric, 3, 5)
        assert len(profiles["data"]) == 4 and diff["data"][0]["type"] == "heatmap"
        assert len(scatter["data"][0]["x"]) == args.images
        return time.perf_counter() - t

    out = {"images": args.images, "heads": "12 x 12", "read_head_summary_both_s": round(baseline, 4)}
    for metric in ("prob_drop", "mean_distance_px"):
        out[f"{metric}_cold_s"] = round(render(metric), 3)
        out[f"{metric}_warm_s"] = round(render(metric), 3)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
