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
