"""Mean ablation of whole heads (SPEC "Mean ablation").

A mean-ablated head's output ``o[l,h] = A[l,h] V[l,h]`` (``N x d``, before W_O) is replaced at every
token position by its mean over a reference set of images (the run's images). The metrics are
the leave-one-out formulas of SPEC "Head importance" with that ``P'``, computed by the exact
engine (analysis.metrics.importance with ``means=``); their names say mean-ablated.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from analysis.metrics.importance import importance_arrays
from analysis.metrics.registry import Metric, OnBatch, OnRun, register_metric
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


# ---- the metrics this module computes, declared with the registry (analysis.metrics.registry) ----

def _mean_ablation(vit, images, labels, batch):
    """Mean-ablated leave-one-out with the run's head means (option "head_means" [L,H,N,d], which the
    build computes over all the run's images first; without it: the means over this batch's images),
    on the batch's shared clean pass (``batch.trace()``: the zero ablation's unpruned pass, not a second one)."""
    means = batch.options.get("head_means")
    if means is None:
        means = head_means(vit, images, batch_size=len(images))
    arrays, base = importance_arrays(vit, images, labels, base=batch.trace().baseline(),
                                     means=torch.as_tensor(means, device=vit.device))
    if base.logp is not None:
        batch.outputs.setdefault("probs", base.logp.exp().float().cpu().numpy())
    return {f"mean_{m}": arrays[m] for m in MEAN_METRICS}


def _ablation_shift(arrays):
    """Run mean of (mean-ablated - zero-ablated) prob_drop (emb_dist for a backbone) per head."""
    for zero, mean in (("prob_drop", "mean_prob_drop"), ("emb_dist", "mean_emb_dist")):
        if zero in arrays and mean in arrays and np.isfinite(arrays[mean]).any():
            return np.nanmean(arrays[mean].astype(np.float64) - arrays[zero], axis=0)
    some = next(iter(arrays.values()))
    return np.full(some.shape[1:3], np.nan)


MEAN_ABLATION = OnBatch(_mean_ablation)
_MEAN_NOTE = (" **Mean ablation**: the head's output $o = A V$ is replaced at every token by its mean over the "
              "run's images instead of being zeroed.")
register_metric(Metric("mean_prob", "P(true), mean-ablated", axis="P(true), mean-abl.", important="low", group="importance",
                       applies_to={"classifier"}, needs_label=True, stage="mean_ablation", compute=MEAN_ABLATION, range=(0, 1),
                       meaning="P(true class) with the head mean-ablated",
                       formula=r"$P'_y$ with the head mean-ablated." + _MEAN_NOTE))
register_metric(Metric("mean_prob_drop", "drop of P(true), mean-ablated", axis="ΔP(true), mean-abl.", important="high",
                       group="importance", applies_to={"classifier"}, needs_label=True, stage="mean_ablation",
                       compute=MEAN_ABLATION, meaning="drop of P(true class), mean-ablated",
                       formula=r"$P_y - P'_y$ with the head mean-ablated." + _MEAN_NOTE))
register_metric(Metric("mean_jsd", "JSD, mean-ablated", unit="bits", important="high", group="importance",
                       applies_to={"classifier"}, stage="mean_ablation", compute=MEAN_ABLATION, range=(0, 1),
                       meaning="change of the output (JSD), mean-ablated",
                       formula=r"$\mathrm{JSD}(P \,\|\, P')$ in bits with the head mean-ablated." + _MEAN_NOTE))
register_metric(Metric("mean_emb_dist", "embedding cos. dist., mean-ablated", axis="emb. cos. dist., mean-abl.",
                       important="high", group="importance", stage="mean_ablation", compute=MEAN_ABLATION,
                       meaning="change of the embedding, mean-ablated",
                       formula="cosine distance of the pooled output embedding with and without the head, the head "
                               "mean-ablated." + _MEAN_NOTE))
register_metric(Metric("ablation_shift", "mean minus zero ablation", level="head", group="importance", stage="mean_ablation",
                       compute=OnRun(_ablation_shift), meaning="how much mean ablation changes the head's importance",
                       formula="run mean over images of mean_prob_drop - prob_drop (mean_emb_dist - emb_dist for a backbone): "
                               "positive = the head matters more than zeroing says, negative = zeroing overstates it."))
