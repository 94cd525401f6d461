"""Mean ablation of whole heads (SPEC "Mean ablation").

A mean-ablated head's output ``o[l,h] = A[l,h] V[l,h]`` (``N x d``, before W_O) is replaced at every
token position by its mean over a reference set of images (the run's images). The metrics are
the leave-one-out formulas of SPEC "Head importance" with that ``P'``, computed by the exact
engine (analysis.metrics.importance with ``means=``); their names say mean-ablated.
"""
from __future__ import annotations

import torch
from torch import Tensor

from analysis.models.adapter import ViT

# The metrics of a mean-ablated head (cls_dist / patch_dist are zero-ablation views only).
MEAN_METRICS = ("prob", "prob_drop", "jsd", "emb_dist")


@torch.inference_mode()
def head_output_sums(vit: ViT, images: Tensor, total: Tensor | None = None) -> Tensor:
    """Add the per-head outputs of a batch, summed over its images, to ``total`` [L, H, N, d]
    float64 (new when None); returns it."""
    if total is None:
        total = torch.zeros(vit.depth, vit.num_heads, vit.num_tokens, vit.head_dim, dtype=torch.float64,
                            device=vit.device)

    def accumulate(layer: int, o: Tensor) -> None:
        total[layer] += o.sum(0, dtype=torch.float64)

    vit.blocks(vit.embed(images), head_hook=accumulate)
    return total


def head_means(vit: ViT, images: Tensor, batch_size: int = 16, progress: bool = False) -> Tensor:
    """Mean per-head output over the images: [L, H, N, d] float32 (the unpruned model's ``A V``)."""
    images = vit.check_images(images)
    starts = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="head means", unit="batch")
    total = None
    for s in starts:
        total = head_output_sums(vit, images[s:s + batch_size], total)
    return (total / images.shape[0]).float()
