"""Head gates and the Taylor (gradient) head importance — an APPROXIMATION (SPEC "Head gates").

A gate ``g[x,l,h]`` (1 by default) multiplies head h's output ``o[l,h] = A V`` (``N x d``, before
W_O) in block l; ``g = 0`` is exactly pruning mode 1. At ``g = 1``, for classifier models:

- ``taylor_prob_drop[x,l,h] = dP(y|x)/dg[x,l,h]``: first-order (signed) estimate of ``prob_drop``;
- ``grad_score[x,l,h] = |d log P(y|x) / dg[x,l,h]|`` (Michel et al. 2019, per image).

One forward and one backward per batch give every head: images are independent, so the gradient
of ``sum_x log P(y_x|x)`` with respect to image x's gates is that image's own gradient.
Backbones have no ``P``: not defined (use the exact ``emb_dist``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.errors import InputError
from analysis.metrics.common import arrays_to_frame, check_labels
from analysis.metrics.registry import Metric, OnBatch, register_metric
from analysis.models.adapter import HeadHook, ViT

TAYLOR_METRICS = ("taylor_prob_drop", "grad_score")


def gate_hook(gates: Tensor) -> HeadHook:
    """head_hook multiplying head h of block l by ``gates[:, l, h]``; gates [B, L, H]."""
    def hook(layer: int, o: Tensor) -> Tensor:
        return o * gates[:, layer, :, None, None].to(o.dtype)

    return hook


def require_classifier(vit: ViT, what: str) -> None:
    if not vit.has_head:
        raise InputError(f"{what} needs a classifier: {vit.name} is a backbone without a head, so P(y|x) "
                         "is undefined. Use the exact importance (emb_dist) for backbones.")


def checked_inputs(vit: ViT, images: Tensor, labels) -> tuple[Tensor, Tensor]:
    """Images on the device and labels [B] for the Taylor metrics (classifier and labels required)."""
    require_classifier(vit, "The Taylor importance")
    images = vit.check_images(images)
    if labels is None:
        raise InputError("The Taylor importance needs the true labels (it differentiates P(y|x)); pass labels.")
    return images, check_labels(vit, labels, images.shape[0])


def taylor_pass(vit: ViT, images: Tensor, labels) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Taylor metrics of one batch and the unpruned output distribution:
    ({"taylor_prob_drop", "grad_score"} -> [B, L, H] float64, probs [B, C] float32).

    images [B, 3, H, W] preprocessed; labels [B] (required). One forward + one backward; works
    inside torch.inference_mode too.
    """
    images, labels = checked_inputs(vit, images, labels)
    with torch.inference_mode(False), torch.enable_grad():
        images, labels = images.clone(), labels.clone()   # inference tensors cannot enter autograd
        gates = torch.ones(images.shape[0], vit.depth, vit.num_heads, device=vit.device, requires_grad=True)
        logp_all = torch.log_softmax(vit.forward(images, head_hook=gate_hook(gates)).double(), dim=-1)
        logp = logp_all.gather(1, labels[:, None])[:, 0]                                    # [B]
        (dlogp,) = torch.autograd.grad(logp.sum(), gates)
    dlogp = dlogp.double()
    p = logp.detach().exp()[:, None, None]
    arrays = {"taylor_prob_drop": (p * dlogp).cpu().numpy(),       # dP/dg = P * dlogP/dg
              "grad_score": dlogp.abs().cpu().numpy()}
    return arrays, logp_all.detach().exp().float().cpu().numpy()


def taylor_arrays(vit: ViT, images: Tensor, labels) -> dict[str, np.ndarray]:
    """Taylor metrics of one batch: {"taylor_prob_drop", "grad_score"} -> [B, L, H] float64 numpy."""
    return taylor_pass(vit, images, labels)[0]


def taylor_importance(vit: ViT, images: Tensor, labels, batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
    """Approximate (Taylor) importance of every head for every image (classifiers only).

    Returns one row per (image, layer, head): image, layer, head, taylor_prob_drop, grad_score.
    """
    images, labels = checked_inputs(vit, images, labels)
    starts = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="taylor importance", unit="batch")
    frames = [arrays_to_frame(taylor_arrays(vit, images[s:s + batch_size], labels[s:s + batch_size]), offset=s)
              for s in starts]
    return pd.concat(frames, ignore_index=True)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-D arrays (average ranks for ties; NaN if one is constant)."""
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def per_image_spread(per_image) -> dict[str, float]:
    """Median and quartiles over images of per-image Spearman values (NaN left out; all NaN: NaN):
    {"per_image_median", "per_image_q25", "per_image_q75"}."""
    per_image = np.asarray(per_image, float)
    q25, med, q75 = np.nanpercentile(per_image, [25, 50, 75]) if np.isfinite(per_image).any() else (np.nan,) * 3
    return {"per_image_median": float(med), "per_image_q25": float(q25), "per_image_q75": float(q75)}


def taylor_agreement(exact: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """SPEC agreement of a Taylor metric with the exact one, both [B, L, H]: Spearman over the L*H
    heads per image (median, q25, q75 over images) and of the run means (over images)."""
    B = exact.shape[0]
    per_image = [spearman(exact[i].ravel(), estimate[i].ravel()) for i in range(B)]
    return {**per_image_spread(per_image),
            "run_means": spearman(exact.mean(0).ravel(), estimate.mean(0).ravel()), "images": int(B)}


# ---- the metrics this module computes, declared with the registry (analysis.metrics.registry) ----

def _taylor(vit, images, labels, batch):
    """taylor_prob_drop and grad_score: one forward + one backward (analysis.metrics.taylor)."""
    if labels is None:
        return {}
    arrays, probs = taylor_pass(vit, images, labels)
    batch.outputs.setdefault("probs", probs)
    return arrays


TAYLOR = OnBatch(_taylor)
_TAYLOR_NOTE = (" **Approximate**: a first-order Taylor estimate from one backward pass (head gate $g$ on the "
                r"head output $o = A V$ before $W_O$, $g = 0$ is exactly pruning mode 1), not a pruned forward.")
register_metric(Metric("taylor_prob_drop", "Taylor ΔP(true)", axis="Taylor ΔP(true)", important="high", group="importance",
                       exact=False, applies_to={"classifier"}, needs_label=True, stage="taylor", compute=TAYLOR,
                       meaning="first-order estimate of the drop of P(true)",
                       formula=r"$\partial P(y \mid x) / \partial g$ at $g = 1$: the linear estimate of prob_drop (signed)."
                               + _TAYLOR_NOTE))
register_metric(Metric("grad_score", "gradient score", important="high", group="importance", exact=False,
                       applies_to={"classifier"}, needs_label=True, stage="taylor", compute=TAYLOR,
                       meaning="|d log P(true) / d gate| (Michel et al. 2019)",
                       formula=r"$\left|\partial \log P(y \mid x) / \partial g\right|$ at $g = 1$, per image (Michel et al. "
                               "2019 average it over images)." + _TAYLOR_NOTE))
