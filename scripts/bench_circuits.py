"""Benchmark direct effects and head-to-head paths (SPEC "Beyond the paper (v3)") on the default model.

Prints, for the embedded DINOv2 ViT-S/14 + probe (112 px) on Fashion-MNIST test images:
1. every edge a -> b of one image (via qkv): the APPROXIMATE edge attribution patching (one forward
   and one backward) against the exact path patching engine over the same edges (batched per
   receiving block), their times and ratio, and the Spearman agreement of the two over the edges
   (median and quartiles over the images);
2. the online circuit of one image: EAP for every edge, then exact values for the 20 edges with the
   largest |EAP| (what the circuit view shows);
3. the v3 metrics' cost in the image stage: the build's image stage (analyse_batch with the default
   metrics, batches of --batch-size) over --stage-images images with and without the v3 metrics
   (direct_logit, logit_drop, indirect_logit / direct_emb, prefix_share, high_norm_share,
   high_norm_count, token norms) end to end (noisy where the machine is shared), and the overhead
   from its parts per batch: what the shared clean pass costs over the leave-one-out's former one
   (trace_stream keeps the per-head outputs; run_baseline did not), the direct terms and the sink
   metrics, against the stage's time per batch (goal < 10%); and the standalone direct_effects call.
Times are the best of --repeat runs.

    python scripts/bench_circuits.py [--images 4] [--stage-images 32] [--threads N] [--repeat 3]
                                      [--vias qkv q k v] [--model default]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import spearmanr

from bench_timing import timed  # noqa: E402  (this folder)
from analysis import analyse_batch, direct_effects, head_paths, load_vit
from analysis.datasets import load_image_set, open_image
from analysis.metrics import registry
from analysis.metrics.direct import direct_pieces, top1_labels, trace_stream
from analysis.metrics.importance import run_baseline
from analysis.metrics.sinks import trace_sinks

SHOWN_EDGES = 20  # edges the circuit view shows with exact values on request



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model to load (default: the embedded default)")
    ap.add_argument("--images", type=int, default=4, help="Fashion-MNIST test images (Spearman over these)")
    ap.add_argument("--stage-images", type=int, default=32, help="images of the image-stage comparison (default 32)")
    ap.add_argument("--batch-size", type=int, default=16, help="image-stage batch size (the build's default 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--vias", nargs="+", default=["qkv"], choices=["q", "k", "v", "qkv"],
                    help="what the receiver reads without the sender, for the all-edges comparison (default qkv)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs for the timings")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vit = load_vit(args.model)
    items = load_image_set("fashion", limit=max(args.images, 1) * 5, seed=0).items[:args.images]
    images = vit.preprocess([open_image(it.ref) for it in items])
    labels = torch.tensor([it.label for it in items])
    print(f"{vit!r}; {len(items)} images; torch threads {torch.get_num_threads()}")
    with torch.no_grad():  # warm-up: the first forwards of a process are several times slower
        for _ in range(2):
            vit.forward(images)
            trace_stream(vit, images)

    # 1. all edges of an image: EAP vs the exact engine
    for via in args.vias:
        rhos, t_eap, t_exact = [], [], []
        for i in range(len(items)):
            te, eap = timed(lambda: head_paths(vit, images[i], via=via, method="eap"), args.repeat)
            tx, exact = timed(lambda: head_paths(vit, images[i], via=via), 1)
            merged = exact.merge(eap, on=["a_layer", "a_head", "b_layer", "b_head"])
            rhos.append(spearmanr(merged.path_logit, merged.path_logit_eap).statistic)
            t_eap.append(te)
            t_exact.append(tx)
            print(f"via {via}, image {i}: {len(merged)} edges  EAP {te * 1e3:.0f} ms  exact {tx:.2f} s  "
                  f"ratio {tx / te:.0f}x  Spearman {rhos[-1]:.3f}")
        q1, med, q3 = np.percentile(rhos, [25, 50, 75])
        print(f"via {via}, all edges of one image: EAP {np.median(t_eap) * 1e3:.0f} ms vs exact "
              f"{np.median(t_exact):.2f} s (medians over images): {np.median(t_exact) / np.median(t_eap):.0f}x "
              f"faster (goal >= 20x); Spearman(EAP, exact) median {med:.3f}, quartiles {q1:.3f}-{q3:.3f}")

    # 2. the online circuit of image 0
    t_online, eap = timed(lambda: head_paths(vit, images[0], method="eap"), args.repeat)
    top = eap.reindex(eap.path_logit_eap.abs().sort_values(ascending=False).index)[:SHOWN_EDGES]
    edges = [((r.a_layer, r.a_head), (r.b_layer, r.b_head)) for r in top.itertuples()]
    t_shown, shown = timed(lambda: head_paths(vit, images[0], edges=edges), args.repeat)
    print(f"online circuit of image 0: EAP, every edge {t_online * 1e3:.0f} ms (goal < 1 s); exact values of the "
          f"{len(edges)} largest-|EAP| edges {t_shown * 1e3:.0f} ms (goal < 2 s); their Spearman "
          f"{spearmanr(shown.path_logit, top.path_logit_eap).statistic:.3f}")

    # 3. the v3 metrics in the image stage, same images and batches both ways (interleaved, best of --repeat)
    stage_items = load_image_set("fashion", limit=args.stage_images, seed=0).items
    x = vit.preprocess([open_image(it.ref) for it in stage_items])
    y = torch.tensor([it.label for it in stage_items])
    v3 = {m.name for m in registry.metrics("image_head") if m.group in ("direct", "sinks")}
    without = [m.name for m in registry.computed_metrics("image_head") if m.name not in v3]

    def stage(metrics=None):
        for s in range(0, len(x), args.batch_size):
            analyse_batch(vit, x[s:s + args.batch_size], y[s:s + args.batch_size], metrics=metrics)

    t_with = t_without = float("inf")
    for _ in range(args.repeat):
        t_without = min(t_without, timed(lambda: stage(without))[0])
        t_with = min(t_with, timed(stage)[0])
    # what the v3 metrics add to one batch: the shared clean pass over the leave-one-out's former one
    # (it keeps the per-head outputs and the received attention), the direct terms, the sink metrics
    xb, yb = x[:args.batch_size], y[:args.batch_size]
    with torch.inference_mode():
        t_base, _ = timed(lambda: run_baseline(vit, xb), args.repeat)
        t_trace, trace = timed(lambda: trace_stream(vit, xb), args.repeat)
        t_terms, _ = timed(lambda: direct_pieces(vit, trace, top1_labels(vit, trace, yb)), args.repeat)
        t_sinks, _ = timed(lambda: trace_sinks(vit, trace), args.repeat)
    added = max(t_trace - t_base, 0.0) + t_terms + t_sinks
    per_batch = t_without * len(xb) / len(x)
    t_direct, _ = timed(lambda: direct_effects(vit, images, labels), 1)
    print(f"image stage, {len(x)} images in batches of {len(xb)}: {t_with:.1f} s with the v3 metrics, {t_without:.1f} s "
          f"without ({len(x) / t_with:.2f} vs {len(x) / t_without:.2f} images/s: {t_with / t_without - 1:+.1%} end to end, "
          f"noisy on a shared machine). Per batch the v3 metrics add {added * 1e3:.0f} ms (clean pass keeping the "
          f"heads {t_trace * 1e3:.0f} ms vs {t_base * 1e3:.0f} ms, direct terms {t_terms * 1e3:.0f} ms, sinks "
          f"{t_sinks * 1e3:.0f} ms; logit_drop comes from the stage's own leave-one-out) to {per_batch:.1f} s: "
          f"overhead {added / per_batch:.1%} (goal < 10%). Standalone direct_effects of {len(items)} image(s), with "
          f"its own leave-one-out for logit_drop: {t_direct:.2f} s")


if __name__ == "__main__":
    main()
