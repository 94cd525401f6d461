"""Benchmark direct effects and head-to-head paths (SPEC "Beyond the paper (v3)") on the default model.

Prints, for the embedded DINOv2 ViT-S/14 + probe (112 px) on Fashion-MNIST test images:
1. every edge a -> b of one image (via qkv): the APPROXIMATE edge attribution patching (one forward
   and one backward) against the exact path patching engine over the same edges (batched per
   receiving block), their times and ratio, and the Spearman agreement of the two over the edges
   (median and quartiles over the images);
2. the online circuit of one image: EAP for every edge, then exact values for the 20 edges with the
   largest |EAP| (what the circuit view shows);
3. direct_effects' cost: one clean forward, the forward that keeps the stream pieces, the direct
   terms from it, and the image stage (analyse_batch with the default metrics) of the same batch;
   the overhead the direct terms add to the image stage (logit_drop comes from the stage's own
   leave-one-out), and the standalone direct_effects call.
Times are the best of --repeat runs.

    python scripts/bench_circuits.py [--images 4] [--threads N] [--repeat 3] [--vias qkv q k v]
                                      [--model default]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import spearmanr

from bench_timing import timed  # noqa: E402  (this folder)
from analysis import analyse_batch, direct_effects, head_paths, load_vit
from analysis.datasets import load_image_set, open_image
from analysis.metrics.direct import direct_pieces, top1_labels, trace_stream

SHOWN_EDGES = 20  # edges the circuit view shows with exact values on request



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model to load (default: the embedded default)")
    ap.add_argument("--images", type=int, default=4, help="Fashion-MNIST test images (Spearman over these)")
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

    # 3. direct effects on the image stage
    with torch.inference_mode():
        t_clean, _ = timed(lambda: vit(images), args.repeat)
    with torch.no_grad():
        t_trace, trace = timed(lambda: trace_stream(vit, images), args.repeat)
        y = top1_labels(vit, trace, labels)
        t_pieces, _ = timed(lambda: direct_pieces(vit, trace, y), args.repeat)
    t_stage, _ = timed(lambda: analyse_batch(vit, images, labels), 1)
    t_direct, _ = timed(lambda: direct_effects(vit, images, labels), 1)
    extra = max(t_trace - t_clean, 0.0) + t_pieces
    print(f"direct effects, batch of {len(items)}: clean forward {t_clean * 1e3:.0f} ms, forward keeping the "
          f"pieces {t_trace * 1e3:.0f} ms, direct terms {t_pieces * 1e3:.0f} ms -> {extra / t_clean:.0%} of one "
          f"clean forward; image stage {t_stage:.2f} s -> overhead {extra / t_stage:.1%} (goal < 10%); "
          f"standalone direct_effects (with its own leave-one-out for logit_drop) {t_direct:.2f} s")


if __name__ == "__main__":
    main()
