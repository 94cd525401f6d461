"""Attention to prefix tokens and to high-norm tokens (SPEC "Beyond the paper (v3)": attention sinks).

- token norm ``n[x,l,t] = ||x_l[t]||_2`` of every token of block l's input stream, l = 0..L
  (l = L: after the last block, before the final norm);
- high-norm patch tokens of block l: patch tokens with ``n > f * median over patch tokens`` (numpy's
  median: the mean of the two middle values for an even number of patches), ``f = 3`` by default;
- ``prefix_share[x,l,h]``: mean over patch queries of the attention on the prefix tokens;
- ``high_norm_share[x,l,h]``: mean over patch queries of the attention on block l's high-norm
  patch tokens (0 where there are none); ``high_norm_count[x,l]``: how many there are.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.errors import InputError
from analysis.metrics.common import arrays_to_frame
from analysis.models.adapter import ViT

DEFAULT_FACTOR = 3.0  # f: a patch token is high-norm above f x the median patch-token norm


def stream_norms(x: Tensor) -> Tensor:
    """L2 norm of every token of a stream x [B, N, C] -> [B, N] float32."""
    return x.float().norm(dim=-1)


def high_norm_tokens(norms: Tensor, num_prefix: int, factor: float = DEFAULT_FACTOR) -> Tensor:
    """Which patch tokens are high-norm: norms [B, N] of one block's input -> bool [B, P]."""
    patches = norms[:, num_prefix:].double()
    median = torch.quantile(patches, 0.5, dim=-1, keepdim=True)   # linear interpolation = numpy's median
    return patches > factor * median


def prefix_share(A: Tensor, num_prefix: int) -> Tensor:
    """Attention the patch queries put on the prefix tokens, averaged over them: A [B, H, N, N] -> [B, H]."""
    return A[..., num_prefix:, :num_prefix].sum(-1).mean(-1)


def high_norm_share(A: Tensor, high: Tensor, num_prefix: int) -> Tensor:
    """Attention the patch queries put on the high-norm patch tokens ``high`` (bool [B, P]),
    averaged over them: A [B, H, N, N] -> [B, H] (0 where there are none)."""
    T = num_prefix
    return (A[..., T:, T:] * high[:, None, None, :].to(A.dtype)).sum(-1).mean(-1)


def check_factor(factor: float) -> float:
    factor = float(factor)
    if not np.isfinite(factor) or factor <= 0:
        raise InputError(f"The high-norm factor f must be a positive number (default {DEFAULT_FACTOR}), got {factor}.")
    return factor


@torch.inference_mode()
def token_norms(vit: ViT, images: Tensor) -> Tensor:
    """Token norms [B, L + 1, N] float32 of preprocessed images [B, 3, H, W]: l = 0 block 0's input
    ... l = L the stream after the last block, before the final norm; all N tokens, prefix first."""
    x = vit.embed(images)
    norms = [stream_norms(x)]
    for layer in range(vit.depth):
        x = vit.block(layer, x)
        norms.append(stream_norms(x))
    return torch.stack(norms, dim=1)


@torch.inference_mode()
def sink_arrays(vit: ViT, images: Tensor, factor: float = DEFAULT_FACTOR) -> dict[str, np.ndarray]:
    """{prefix_share, high_norm_share: [B, L, H] float64, high_norm_count: [B, L] int64, token_norms:
    [B, L + 1, N] float32} of a batch, from one clean forward."""
    factor = check_factor(factor)
    T = vit.num_prefix_tokens
    x = vit.embed(images)
    B, L, H = x.shape[0], vit.depth, vit.num_heads
    prefix = np.zeros((B, L, H))
    high_share = np.zeros((B, L, H))
    count = np.zeros((B, L), dtype=np.int64)
    norms = [stream_norms(x)]
    for layer in range(L):
        high = high_norm_tokens(norms[-1], T, factor)
        count[:, layer] = high.sum(-1).cpu().numpy()

        def measure(layer: int, A: Tensor, high=high) -> None:
            prefix[:, layer] = prefix_share(A, T).double().cpu().numpy()
            high_share[:, layer] = high_norm_share(A, high, T).double().cpu().numpy()

        x = vit.block(layer, x, hook=measure)
        norms.append(stream_norms(x))
    return {"prefix_share": prefix, "high_norm_share": high_share, "high_norm_count": count,
            "token_norms": torch.stack(norms, dim=1).cpu().numpy()}


def sink_metrics(vit: ViT, images: Tensor, factor: float = DEFAULT_FACTOR, batch_size: int = 32) -> pd.DataFrame:
    """Attention-sink metrics of every head on every image: one row per (image, layer, head) with
    image, layer, head, prefix_share, high_norm_share (attention fractions in [0, 1]) and
    high_norm_count (int: high-norm patch tokens of the image's block-``layer`` input, repeated on
    that layer's H rows). images [B, 3, H, W] preprocessed; factor: f of the high-norm rule."""
    images = vit.check_images(images)
    factor = check_factor(factor)
    frames = []
    for s in range(0, images.shape[0], batch_size):
        arrays = sink_arrays(vit, images[s:s + batch_size], factor)
        count = np.repeat(arrays["high_norm_count"][:, :, None], vit.num_heads, axis=2)
        frames.append(arrays_to_frame({"prefix_share": arrays["prefix_share"],
                                       "high_norm_share": arrays["high_norm_share"],
                                       "high_norm_count": count}, offset=s))
    return pd.concat(frames, ignore_index=True)
