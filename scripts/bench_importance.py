"""Benchmark the exact head-importance engine against the naive leave-one-out loop.

Prints, per model: images/s of the exact engine (analysis.head_importance) and of the naive
loop (one full forward per pruned head, plus the unpruned one), their ratio, the largest
difference between the two results, and the latency of the partial-pruning query (all 8 modes
of one head, one image). timm names get random-initialised weights (speed does not depend on
their values); 'default' is the embedded DINOv2 ViT-S/14 + probe at 112 px.

    python scripts/bench_importance.py [--models deit_tiny_patch16_224 vit_small_patch16_224 default]
                                       [--images 8] [--threads N]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from bench_timing import timed  # noqa: E402  (this folder)
from analysis import head_importance, load_vit, partial_pruning


@torch.inference_mode()
def naive_importance(vit, images, labels):
    """Plain baseline: timm's own forward once per head, the head zeroed by a hook on the pruned
    block's post-softmax attention (that block unfused; the others keep timm's fused attention).
    Returns prob [B, L, H]."""
    model, B = vit.model, images.shape[0]
    prob = np.zeros((B, vit.depth, vit.num_heads))
    torch.softmax(model(images).double(), -1)  # the unpruned forward
    for layer in range(vit.depth):
        attn = model.blocks[layer].attn
        for head in range(vit.num_heads):
            def zero_head(module, inputs, output, head=head):
                output = output.clone()
                output[:, head] = 0
                return output

            attn.fused_attn = False
            handle = attn.attn_drop.register_forward_hook(zero_head)
            try:
                p = torch.softmax(model(images).double(), -1)
            finally:
                handle.remove()
                attn.fused_attn = True
            prob[:, layer, head] = p[torch.arange(B), labels].numpy()
    return prob



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "vit_small_patch16_224", "default"],
                    help="timm names (random weights, 1000 classes) or 'default' (the embedded model, 112 px)")
    ap.add_argument("--images", type=int, default=8, help="images per measurement (one batch)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images per model")
    print(f"{'model':28s} {'px':>4s} {'L x H':>6s} {'exact img/s':>12s} {'naive img/s':>12s} {'ratio':>6s} "
          f"{'max |dprob|':>12s} {'partial ms':>11s}")
    for name in args.models:
        torch.manual_seed(0)
        vit = load_vit(name) if name == "default" else load_vit(name, num_classes=1000)
        images = torch.randn(args.images, 3, *vit.img_size)
        labels = torch.randint(0, vit.num_classes, (args.images,))
        vit(images[:1])  # warm-up
        t_exact, df = timed(lambda: head_importance(vit, images, labels, batch_size=args.images))
        t_naive, prob = timed(lambda: naive_importance(vit, images, labels))
        exact_prob = df.sort_values(["image", "layer", "head"]).prob.to_numpy().reshape(prob.shape)
        diff = np.abs(exact_prob - prob).max()
        partial_pruning(vit, images[0], int(labels[0]), 3, 0)  # warm-up
        t_part, _ = timed(lambda: partial_pruning(vit, images[0], int(labels[0]), vit.depth // 2, 1), repeat=3)
        B = args.images
        print(f"{name:28s} {vit.img_size[0]:>4d} {vit.depth:>2d} x {vit.num_heads:<2d} {B / t_exact:12.2f} {B / t_naive:12.2f} "
              f"{t_naive / t_exact:6.2f} {diff:12.2e} {t_part * 1000:11.0f}")


if __name__ == "__main__":
    main()
