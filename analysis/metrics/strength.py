"""Attention strength (SPEC "Attention strength"): k-hop strength, entropy, mean distance.

All functions take the patch->patch block of post-softmax attention, ``A_pp [..., P, P]`` with
patches in timm's row-major order (index = row * gw + col) on a ``gh x gw`` grid.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from analysis.metrics.registry import Metric, OnAttention, register_metric


@lru_cache(maxsize=32)
def _grid_coords(gh: int, gw: int) -> np.ndarray:
    """Row/column of each patch: [P, 2] ints."""
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    return np.stack([rows, cols], axis=1)


@lru_cache(maxsize=32)
def hop_distance(gh: int, gw: int) -> Tensor:
    """Chebyshev hop distance between patches: [P, P] int64, max(|dr|, |dc|)."""
    rc = _grid_coords(gh, gw)
    d = np.abs(rc[:, None, :] - rc[None, :, :]).max(axis=-1)
    return torch.from_numpy(d).long()


@lru_cache(maxsize=32)
def hop_counts(gh: int, gw: int) -> Tensor:
    """Number of patches at each hop from each source: [P, K] float, K = max(gh, gw)."""
    K = max(gh, gw)
    d = hop_distance(gh, gw)
    counts = torch.zeros(d.shape[0], K)
    counts.scatter_add_(1, d, torch.ones_like(d, dtype=torch.float32))
    return counts


@lru_cache(maxsize=32)
def pixel_distance(gh: int, gw: int, patch_size: int) -> Tensor:
    """Euclidean distance between patch centres in pixels: [P, P] float."""
    rc = _grid_coords(gh, gw).astype(np.float64)
    d = np.sqrt(((rc[:, None, :] - rc[None, :, :]) ** 2).sum(-1)) * patch_size
    return torch.from_numpy(d).float()


def khop_strength(A_pp: Tensor, grid: tuple[int, int]) -> Tensor:
    """k-hop strength vector: [..., P, P] -> [..., K], K = max(gh, gw).

    s_k(u) = sum of A[u, v] over patches v at hop k from u, divided by their number;
    s_k = mean of s_k(u) over the sources u that have at least one patch at hop k.
    Raw attention values (rows are not renormalised over patches).
    """
    gh, gw = grid
    d = hop_distance(gh, gw).to(A_pp.device)
    counts = hop_counts(gh, gw).to(A_pp.device, A_pp.dtype)          # [P, K]
    sums = torch.zeros(*A_pp.shape[:-1], counts.shape[1], dtype=A_pp.dtype, device=A_pp.device)
    sums.scatter_add_(-1, d.expand_as(A_pp), A_pp)                   # [..., P, K]
    valid = counts > 0
    per_source = torch.where(valid, sums / counts.clamp(min=1), torch.zeros((), dtype=A_pp.dtype, device=A_pp.device))
    return per_source.sum(-2) / valid.sum(0).to(A_pp.dtype)


def strength_entropy(strength: Tensor) -> Tensor:
    """Normalised entropy of s / sum(s): [..., K] -> [...] in [0, 1] (0 for K = 1)."""
    K = strength.shape[-1]
    if K < 2:
        return torch.zeros(strength.shape[:-1], dtype=strength.dtype, device=strength.device)
    p = strength / strength.sum(-1, keepdim=True).clamp_min(torch.finfo(strength.dtype).tiny)
    ent = -torch.where(p > 0, p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p)).sum(-1)
    return (ent / math.log(K)).clamp(0, 1)


def mean_attention_distance(A_pp: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """ViT paper's mean attention distance in pixels: [..., P, P] -> [...].

    For each source patch, the attention-weighted mean Euclidean distance (px) to the target
    patches, with the row renormalised over patches (prefix tokens have no position); then the
    mean over source patches.
    """
    dist = pixel_distance(*grid, patch_size).to(A_pp.device, A_pp.dtype)
    row = A_pp.sum(-1).clamp_min(torch.finfo(A_pp.dtype).tiny)
    return ((A_pp * dist).sum(-1) / row).mean(-1)


def peak_attention(A: Tensor, num_prefix: int) -> Tensor:
    """The largest attention weight of each head outside the prefix->prefix block R1 (CLS
    self-attention, often near 1, would dominate): A [..., N, N] post-softmax -> [...]. The
    Explorer's shared colour scales (per layer of an image, or over the run) are maxima of it."""
    outside_r1 = A.clone()
    outside_r1[..., :num_prefix, :num_prefix] = 0
    return outside_r1.amax(dim=(-2, -1))


# ---- the metrics this module computes, declared with the registry (analysis.metrics.registry) ----

def _patches(vit, A):
    T = vit.num_prefix_tokens
    return A[..., T:, T:]


def _khop(vit, layer, A, batch):
    return batch.memo(("khop", layer), lambda: khop_strength(_patches(vit, A), vit.grid))


def _strength_entropy(vit, layer, A, batch):
    return strength_entropy(_khop(vit, layer, A, batch))


def _mean_distance(vit, layer, A, batch):
    return mean_attention_distance(_patches(vit, A), vit.grid, vit.patch_size)


def _peak(A, num_prefix):
    return peak_attention(A, num_prefix)


register_metric(Metric("strength", "k-hop strength", value="vector", group="strength", compute=OnAttention(_khop),
                       axis="attention / patch", meaning="average attention a patch gives to one patch k hops away",
                       formula=r"$s_k(u) = \frac{1}{|V_k(u)|}\sum_{v \in V_k(u)} A[u, v]$, the average attention source patch "
                               r"$u$ gives to one patch at hop $k$. The head's vector $s$ has $K = \max(g_h, g_w)$ entries: "
                               r"$s_k$ is the mean of $s_k(u)$ over the source patches that have any patch at hop $k$ "
                               r"(paper Eq. 7). A head with a tall bar at $k=0$ makes every patch look at itself."))
register_metric(Metric("strength_entropy", "strength entropy", group="strength", compute=OnAttention(_strength_entropy), range=(0, 1),
                       meaning="how global the attention is (0-1)",
                       formula=r"$-\sum_k p_k \log p_k \,/\, \log K$ with $p = s / \sum_k s_k$; between 0 (all attention on "
                               r"one hop distance: a *local* or strictly patterned head) and 1 (spread evenly over all "
                               "distances: a *global* head). Lower layers tend to have both kinds; higher layers are mostly "
                               "global."))
register_metric(Metric("mean_distance_px", "mean attention distance", unit="px", group="strength",
                       compute=OnAttention(_mean_distance), meaning="mean attention distance (px)",
                       formula="the attention-weighted average distance in pixels between a patch and the patches it attends "
                               "to (rows renormalised over patches), averaged over source patches, as in the original ViT paper."))
register_metric(Metric("peak_attention", "peak attention", group="strength", range=(0, 1),
                       compute=OnAttention(lambda vit, layer, A, batch: _peak(A, vit.num_prefix_tokens)),
                       meaning="the head's largest attention weight outside CLS→CLS",
                       formula=r"$\max_{(u, v) \notin R_1} A[u, v]$, the largest single weight of the head outside the "
                               r"prefix$\to$prefix block $R_1$ (CLS self-attention, often near 1). A peaked head (one "
                               "source puts most of its attention on one token) comes close to 1, a diffuse one to $1/N$. "
                               "The Explorer's *run* colour scale for D2-D4 is the largest value of it in the head's layer "
                               "over the run's images, so heads and images can be compared on one scale."))
