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
from analysis.metrics.direct import StreamTrace, trace_stream
from analysis.metrics.registry import Metric, OnBatch, register_metric
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


def trace_sinks(vit: ViT, trace: StreamTrace, factor: float = DEFAULT_FACTOR) -> dict[str, np.ndarray]:
    """{prefix_share, high_norm_share: [B, L, H] float64, high_norm_count: [B, L] int64, token_norms:
    [B, L + 1, N] float32} from a clean pass (``direct.trace_stream``): the shares are sums of the
    attention each token receives from the patch queries (``trace.received``)."""
    T = vit.num_prefix_tokens
    norms = torch.stack([stream_norms(x) for x in trace.xs], dim=1)             # [B, L + 1, N]
    high = torch.stack([high_norm_tokens(norms[:, layer], T, factor) for layer in range(vit.depth)], 1)  # [B, L, P]
    received = torch.stack(trace.received, dim=1).double()                      # [B, L, H, N]
    return {"prefix_share": received[..., :T].sum(-1).cpu().numpy(),
            "high_norm_share": (received[..., T:] * high[:, :, None, :]).sum(-1).cpu().numpy(),
            "high_norm_count": high.sum(-1).cpu().numpy().astype(np.int64),
            "token_norms": norms.cpu().numpy()}


@torch.inference_mode()
def sink_arrays(vit: ViT, images: Tensor, factor: float = DEFAULT_FACTOR) -> dict[str, np.ndarray]:
    """{prefix_share, high_norm_share: [B, L, H] float64, high_norm_count: [B, L] int64, token_norms:
    [B, L + 1, N] float32} of a batch, from one clean forward."""
    return trace_sinks(vit, trace_stream(vit, vit.check_images(images)), check_factor(factor))


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


# ---- the metrics this module computes, declared with the registry (analysis.metrics.registry) ----

def sinks_hook(vit, images, labels, batch):
    """prefix_share, high_norm_share and high_norm_count (repeated on the layer's H heads) from the
    batch's shared clean pass; the token norms go to the engine array ``token_norms`` [B, L + 1, N].
    f: the build option ``high_norm_factor`` (default DEFAULT_FACTOR)."""
    arrays = trace_sinks(vit, batch.trace(), check_factor(batch.options.get("high_norm_factor", DEFAULT_FACTOR)))
    batch.outputs["token_norms"] = arrays.pop("token_norms")
    arrays["high_norm_count"] = np.repeat(arrays["high_norm_count"][:, :, None], vit.num_heads, axis=2)
    return arrays


SINKS = OnBatch(sinks_hook)
_HIGH = (r"$\mathcal{H}_l$, the high-norm patch tokens of block $l$'s input $x_l$: patch tokens with "
         r"$\|x_l[t]\|_2 > f \cdot \mathrm{median}$ of the patch tokens' norms (Darcet et al. 2024's artefacts), "
         r"$f = 3$ (the run records it: manifest params.high_norm_factor). $f$ is a convention, not a property of "
         r"the model: a lower $f$ marks more tokens")
register_metric(Metric("prefix_share", "attention on prefix tokens", axis="attention on prefix", group="sinks",
                       range=(0, 1), compute=SINKS, meaning="share of the patches' attention parked on CLS/registers",
                       formula=r"$\frac{1}{P} \sum_{u \ge T} \sum_{t < T} A[u, t]$: the attention the $P$ patch queries "
                               "put on the $T$ prefix tokens (CLS, registers, distillation token), averaged over the "
                               "queries; 0 for a model without prefix tokens. High: the head parks its attention on a "
                               "token without image content (an attention sink)."))
register_metric(Metric("high_norm_share", "attention on high-norm tokens", axis="attention on high-norm", group="sinks",
                       range=(0, 1), compute=SINKS, meaning="share of the patches' attention on high-norm patch tokens",
                       formula=r"$\frac{1}{P} \sum_{u \ge T} \sum_{v \in \mathcal{H}_l} A[u, v]$ with " + _HIGH
                               + " and a larger share. 0 where the block has no high-norm token."))
register_metric(Metric("high_norm_count", "high-norm tokens", unit="tokens", group="sinks", compute=SINKS,
                       meaning="how many patch tokens of the block's input are high-norm",
                       formula=r"$|\mathcal{H}_l|$, the number of " + _HIGH + ". One value per image and layer, "
                               "the same on each head of the layer."))
