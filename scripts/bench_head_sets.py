"""Benchmark the Taylor (gradient) head importance, pair interactions and pruning curves.

Prints, per model: images/s of the exact leave-one-out engine and of the Taylor importance
(one forward + one backward per batch) on the same images, their ratio, and the Spearman
agreement of taylor_prob_drop with prob_drop (SPEC: per image median, of the run means).
On the default model also: the pair interactions of the image's 8 most important heads
(28 pairs + 8 singles) against 36 plain pruned forwards
(vit(image, prune=set)), and a 13-point pruning curve. 'default' is the embedded DINOv2 ViT-S/14 +
Fashion-MNIST probe at 112 px on Fashion-MNIST test images; timm names get random weights and
random images (speed does not depend on the values).

    python scripts/bench_head_sets.py [--models default vit_small_patch16_224] [--images 16] [--threads N]
"""
from __future__ import annotations

import argparse

import torch

from bench_timing import timed  # noqa: E402  (this folder)
from analysis import head_importance, load_vit, pair_interactions, pruning_curve, random_order  # noqa: E402
from analysis.metrics.taylor import taylor_agreement  # noqa: E402



def inputs(vit, name, n):
    if name == "default":
        from analysis.datasets import load_image_set, open_image

        items = load_image_set("fashion", limit=n).items
        return vit.preprocess([open_image(it.ref) for it in items]), torch.tensor([it.label for it in items])
    torch.manual_seed(0)
    return torch.randn(n, 3, *vit.img_size), torch.randint(0, vit.num_classes, (n,))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["default", "vit_small_patch16_224"])
    ap.add_argument("--images", type=int, default=16, help="images per measurement (one batch)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.images
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {B} images per model")
    print(f"{'model':24s} {'px':>4s} {'L x H':>6s} {'exact img/s':>12s} {'taylor img/s':>13s} {'ratio':>6s} "
          f"{'rho median':>11s} {'rho means':>10s}")
    for name in args.models:
        vit = load_vit(name) if name == "default" else load_vit(name, num_classes=1000)
        images, labels = inputs(vit, name, B)
        head_importance(vit, images[:2], labels[:2], method="taylor")  # warm-up
        t_exact, exact = timed(lambda: head_importance(vit, images, labels, batch_size=B))
        t_taylor, taylor = timed(lambda: head_importance(vit, images, labels, method="taylor", batch_size=B), repeat=2)
        shape = (B, vit.depth, vit.num_heads)
        agree = taylor_agreement(exact.prob_drop.to_numpy().reshape(shape), taylor.taylor_prob_drop.to_numpy().reshape(shape))
        print(f"{name:24s} {vit.img_size[0]:>4d} {vit.depth:>2d} x {vit.num_heads:<2d} {B / t_exact:12.2f} "
              f"{B / t_taylor:13.2f} {t_exact / t_taylor:6.1f} {agree['per_image_median']:11.3f} {agree['run_means']:10.3f}")
        if name != "default":
            continue
        first = exact[exact.image == 0].nlargest(8, "prob_drop")
        heads = list(zip(first.layer, first["head"]))
        pair_interactions(vit, images[0], int(labels[0]), heads)  # warm-up
        t_pairs, pairs = timed(lambda: pair_interactions(vit, images[0], int(labels[0]), heads), repeat=3)
        sets = [[h] for h in heads] + [[a, b] for i, a in enumerate(heads) for b in heads[i + 1:]]
        t_naive, _ = timed(lambda: [vit(images[:1], prune=[(l, h, 1) for l, h in hs]) for hs in sets])
        print(f"  pair interactions, k = 8 (28 pairs + 8 singles), one image: {t_pairs * 1000:.0f} ms vs "
              f"{t_naive * 1000:.0f} ms for 36 plain pruned forwards = {t_naive / t_pairs:.1f}x "
              f"(largest |interaction| {pairs.interaction.abs().max():.3f})")
        order = random_order(vit.depth, vit.num_heads, 0)
        t_curve, curve = timed(lambda: pruning_curve(vit, images, labels, order, batch_size=B))
        print(f"  pruning curve, {len(curve)} steps x {B} images: {t_curve:.2f} s "
              f"({len(curve) * B / t_curve:.1f} pruned forwards/s)")


if __name__ == "__main__":
    main()
