"""Semantic concentration of a head (SPEC "Semantic concentration", after Wu et al. 2022).

Definition used everywhere in HeadScope (the UI's help text repeats it):
- Semantic weight of a patch: the number of SIFT keypoints (scikit-image ``SIFT``, default
  parameters) detected in the grayscale image *as the model sees it* (input resolution, before
  normalisation) whose centre falls inside the patch, divided by the image's total, so the
  weights ``w [P]`` sum to 1. An image without keypoints has no weights (NaN metrics).
- Attention of a source token over the patches: its row of ``A`` restricted to the patch
  columns and renormalised to sum 1 (prefix targets carry no position).
- ``semantic_concentration`` of a head = P x (mean over source patches u of
  sum_v A~[u, v] w[v]): the attention mass that lands on keypoint-rich patches relative to what
  uniform attention (1/P each) would give. 1 = no preference, > 1 = attention flows to
  high-semantic patches, < 1 = to low-semantic ones (background, flat regions).
- ``cls_semantic_concentration``: the same for the CLS row alone (P x sum_v A~[0, v] w[v]).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from analysis.metrics.registry import Metric, OnAttention, register_metric


def semantic_weights(gray: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """SIFT keypoint share per patch: gray [H, W] in [0, 1] -> w [P] summing to 1 (NaN if none)."""
    from skimage.feature import SIFT

    gh, gw = grid
    sift = SIFT()
    try:
        sift.detect(np.asarray(gray, dtype=np.float64))
        rc = np.asarray(sift.keypoints)
    except RuntimeError:  # "SIFT found no features": a flat image
        rc = np.zeros((0, 2))
    w = np.zeros(gh * gw)
    if len(rc):
        r = np.clip(rc[:, 0] // patch_size, 0, gh - 1).astype(int)
        c = np.clip(rc[:, 1] // patch_size, 0, gw - 1).astype(int)
        np.add.at(w, r * gw + c, 1.0)
    return w / w.sum() if w.sum() > 0 else np.full(gh * gw, np.nan)


def images_to_gray(images: Tensor, mean, std) -> np.ndarray:
    """Preprocessed images [B, 3, H, W] -> grayscale [B, H, W] in [0, 1] (un-normalised)."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    rgb = (images * std + mean).clamp(0, 1)
    gray = 0.2125 * rgb[:, 0] + 0.7154 * rgb[:, 1] + 0.0721 * rgb[:, 2]   # skimage's rgb2gray
    return gray.cpu().numpy()


def batch_semantic_weights(images: Tensor, data_config: dict, grid, patch_size: int) -> np.ndarray:
    """Weights [B, P] for a preprocessed batch (see module docstring)."""
    gray = images_to_gray(images, data_config["mean"], data_config["std"])
    return np.stack([semantic_weights(g, grid, patch_size) for g in gray])


def semantic_concentration(A: Tensor, weights: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """A [B, H, N, N], weights [B, P] -> (patch sources [B, H], CLS source [B, H]) concentrations."""
    T = num_prefix
    to_patches = A[..., T:]
    rows = to_patches / to_patches.sum(-1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
    P = rows.shape[-1]
    w = weights.to(A.dtype)[:, None, :, None]                      # [B, 1, P, 1]
    flow = (rows @ w)[..., 0]                                       # [B, H, N]: mass on keypoints
    return P * flow[..., T:].mean(-1), P * flow[..., 0]


# ---- the metrics this module computes, declared with the registry (analysis.metrics.registry) ----

def _semantic(vit, layer, A, batch):
    """(patch-source, CLS-source) concentration [B, H] of one block, computed once per block."""
    weights = batch.memo("semantic_weights", lambda: torch.from_numpy(
        batch_semantic_weights(batch.images, vit.data_config, vit.grid, vit.patch_size)).to(A.device))
    return batch.memo(("semantic", layer), lambda: semantic_concentration(A, weights, vit.num_prefix_tokens))


register_metric(Metric("semantic_concentration", "semantic concentration", group="semantic",
                       compute=OnAttention(lambda vit, layer, A, batch: _semantic(vit, layer, A, batch)[0]),
                       meaning="attention on SIFT-keypoint patches (1 = no preference)",
                       formula=r"how much of a head's attention lands on *semantically rich* patches. A patch's semantic "
                               r"weight $w_v$ is its share of the SIFT keypoints found in the image as the model sees it "
                               r"($\sum_v w_v = 1$). With each source row restricted to the patch columns and renormalised "
                               r"($\tilde A$), $\text{sc} = P \cdot \operatorname{mean}_u \sum_v \tilde A[u, v]\, w_v$ (mean "
                               r"over the $P$ source patches $u$). 1 = no preference (what uniform attention gives), above 1 = "
                               "attention flows to keypoint-rich patches (object parts, edges), below 1 = to flat background. "
                               "Undefined (empty) for an image in which SIFT finds no keypoint."))
register_metric(Metric("cls_semantic_concentration", "CLS semantic concentration", group="semantic",
                       compute=OnAttention(lambda vit, layer, A, batch: _semantic(vit, layer, A, batch)[1]),
                       meaning="the same for the CLS row",
                       formula=r"semantic concentration of the CLS row alone, $P \sum_v \tilde A[0, v]\, w_v$."))
