"""``head_importance``: every head's importance for every image by one of the three methods, exact
leave-one-out (``importance``, zero or mean ablation with ``ablation``'s head means) or the Taylor
estimate (``taylor``). Above the three modules, so none of them imports another back."""
from __future__ import annotations

import pandas as pd
from torch import Tensor

from analysis.errors import InputError
from analysis.metrics.ablation import MEAN_METRICS, head_means
from analysis.metrics.common import arrays_to_frame, check_labels
from analysis.metrics.importance import importance_arrays
from analysis.metrics.taylor import taylor_importance
from analysis.models.adapter import ViT


def head_importance(vit: ViT, images: Tensor, labels=None, batch_size: int = 16, progress: bool = False,
                    method: str = "exact", ablation: str = "zero") -> pd.DataFrame:
    """Importance of every head for every image.

    images: float tensor [B, 3, H, W], preprocessed; labels: LongTensor [B] (None for a backbone).
    method="exact", ablation="zero" (default): exact leave-one-out (SPEC "Head importance"); one
    row per (image, layer, head): image, layer, head, prob, prob_drop, jsd (bits), cls_dist,
    patch_dist, emb_dist. prob/prob_drop/jsd are NaN for models without a head.
    ablation="mean": the same leave-one-out with each head's output replaced by its mean over
    these images (SPEC "Mean ablation"): columns image, layer, head, prob, prob_drop, jsd, emb_dist.
    method="taylor": the approximate gradient importance (SPEC "Head gates"; classifiers only):
    columns image, layer, head, taylor_prob_drop, grad_score.
    """
    if method not in ("exact", "taylor"):
        raise InputError(f"Unknown method {method!r}: use 'exact' (leave-one-out) or 'taylor' (gradient estimate).")
    if ablation not in ("zero", "mean"):
        raise InputError(f"Unknown ablation {ablation!r}: use 'zero' (the paper's pruning) or 'mean'.")
    if method == "taylor":
        if ablation != "zero":
            raise InputError("The Taylor importance estimates zero ablation (gate 0); drop ablation='mean'.")
        return taylor_importance(vit, images, labels, batch_size=batch_size, progress=progress)
    images = vit.check_images(images)
    B = images.shape[0]
    labels_t = check_labels(vit, labels, B)
    means = None
    if ablation == "mean":
        means = head_means(vit, images, batch_size=batch_size, progress=progress)
    frames = []
    starts = range(0, B, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="head importance" + (" (mean ablation)" if means is not None else ""), unit="batch")
    for s in starts:
        lab = None if labels_t is None else labels_t[s:s + batch_size]
        arrays, _ = importance_arrays(vit, images[s:s + batch_size], lab, means=means)
        if means is not None:
            arrays = {m: arrays[m] for m in MEAN_METRICS}
        frames.append(arrays_to_frame(arrays, offset=s))
    return pd.concat(frames, ignore_index=True)
