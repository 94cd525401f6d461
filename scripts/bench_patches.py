"""Benchmark the patch attribution maps (analysis.patch_maps) of one image.

Prints, per model: the time of each map (rollout and grad_rollout best of --repeat, after a
warm-up; occlusion and token_drop once), and for the two ablations the time of a plain loop doing
one forward per occluded / dropped patch, the speed-up of the batched implementation over it and
the largest difference between the two maps. timm names get random-initialised weights (speed
does not depend on their values) at --img-size px with a 1000-class head; 'default' is the
embedded DINOv2 ViT-S/14 + probe (112 px, 64 patches). The second default model is ViT-S/14 at
224 px: 256 patches.

    python -u scripts/bench_patches.py [--models default vit_small_patch14_dinov2] [--img-size 224]
                                       [--threads N] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from analysis import load_vit, patch_maps  # noqa: E402


@torch.inference_mode()
def loop_maps(vit, image, label):
    """Plain baseline: one forward of the whole model per patch (occluded image / shortened sequence)."""
    T, p, gw = vit.num_prefix_tokens, vit.patch_size, vit.grid[1]
    prob = lambda logits: torch.softmax(logits.double(), -1)[0, label]
    p0 = prob(vit(image[None]))
    x0 = vit.embed(image[None])
    occlusion, token_drop = np.zeros(vit.num_patches), np.zeros(vit.num_patches)
    t_occ = t_drop = 0.0
    for t in range(vit.num_patches):
        start = time.perf_counter()
        x = image.clone()
        r, c = divmod(t, gw)
        x[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = 0
        occlusion[t] = p0 - prob(vit(x[None]))
        mid = time.perf_counter()
        keep = [i for i in range(vit.num_tokens) if i != T + t]
        _, logits = vit.outputs(vit.blocks(x0[:, keep], prefix_only_last=vit.pool_reads_prefix_only))
        token_drop[t] = p0 - prob(logits)
        t_occ, t_drop = t_occ + mid - start, t_drop + time.perf_counter() - mid
    return {"occlusion": (t_occ, occlusion), "token_drop": (t_drop, token_drop)}


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["default", "vit_small_patch14_dinov2"])
    ap.add_argument("--img-size", type=int, default=224, help="input size of the timm models (px)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of the fast maps (best is kept)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    for name in args.models:
        torch.manual_seed(0)
        vit = load_vit(name) if name == "default" else load_vit(name, img_size=args.img_size, num_classes=1000)
        image = torch.randn(3, *vit.img_size)
        label = 0
        print(f"\n{vit!r}: {vit.num_patches} patches, {vit.num_tokens} tokens")
        patch_maps(vit, image, label, maps=["rollout", "grad_rollout"])  # warm-up
        for m in ("rollout", "grad_rollout"):
            sec, _ = best_of(lambda: patch_maps(vit, image, label, maps=[m]), args.repeat)
            print(f"  {m:13s} {sec * 1000:9.1f} ms")
        loop = loop_maps(vit, image, label)
        for m in ("occlusion", "token_drop"):
            sec, out = best_of(lambda: patch_maps(vit, image, label, maps=[m]), 1)
            loop_sec, ref = loop[m]
            diff = np.abs(out[m].ravel() - ref).max()
            print(f"  {m:13s} {sec:9.2f} s   one-forward-per-patch loop {loop_sec:6.2f} s   "
                  f"speed-up x{loop_sec / sec:4.2f}   max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
