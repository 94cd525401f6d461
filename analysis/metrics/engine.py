"""One call that computes every per-image array the cache needs, in a single unpruned pass
plus the leave-one-out: importance, strength, CLS vectors and binarised patch patterns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.metrics.importance import arrays_to_frame, importance_arrays
from analysis.metrics.patterns import binarize_topq, cls_vector, pack_bits
from analysis.metrics.semantic import batch_semantic_weights, semantic_concentration
from analysis.metrics.strength import khop_strength, mean_attention_distance, strength_entropy
from analysis.models.adapter import ViT


@dataclass
class BatchResult:
    """Per-image arrays of one batch (B images, L layers, H heads, K = max(gh, gw)).

    importance: {metric: [B, L, H] float64}; probs: [B, C] float32 or None (backbone);
    strength [B, L, H, K] float32; strength_entropy, mean_distance_px [B, L, H] float32;
    cls_vectors [B, L, H, N + P] float16; patch_bits [B, L, H, ceil(P*P/8)] uint8;
    semantic_concentration, cls_semantic_concentration [B, L, H] float32 (see analysis.semantic).
    """
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    probs: np.ndarray | None = None
    strength: np.ndarray | None = None
    strength_entropy: np.ndarray | None = None
    mean_distance_px: np.ndarray | None = None
    cls_vectors: np.ndarray | None = None
    patch_bits: np.ndarray | None = None
    semantic_concentration: np.ndarray | None = None
    cls_semantic_concentration: np.ndarray | None = None


class AttentionAnalyser:
    """Attention hook that turns each block's pattern A [B, H, N, N] into strength and pattern arrays."""

    def __init__(self, vit: ViT, q: float = 0.01, patterns: bool = True, semantic_weights: Tensor | None = None):
        self.vit, self.q, self.patterns, self.weights = vit, q, patterns, semantic_weights
        self.strength, self.entropy, self.distance, self.cls, self.bits = [], [], [], [], []
        self.semantic, self.cls_semantic = [], []

    def __call__(self, layer: int, A: Tensor) -> None:
        T, vit = self.vit.num_prefix_tokens, self.vit
        A_pp = A[..., T:, T:]
        s = khop_strength(A_pp, vit.grid)
        self.strength.append(s.float().cpu().numpy())
        self.entropy.append(strength_entropy(s).float().cpu().numpy())
        self.distance.append(mean_attention_distance(A_pp, vit.grid, vit.patch_size).float().cpu().numpy())
        if self.patterns:
            self.cls.append(cls_vector(A, T).to(torch.float16).cpu().numpy())
            self.bits.append(pack_bits(binarize_topq(A_pp, self.q)))
        if self.weights is not None:
            sc, cls_sc = semantic_concentration(A, self.weights, T)
            self.semantic.append(sc.float().cpu().numpy())
            self.cls_semantic.append(cls_sc.float().cpu().numpy())

    def fill(self, result: BatchResult) -> BatchResult:
        stack = lambda arrays: np.stack(arrays, axis=1)  # L x [B, H, ...] -> [B, L, H, ...]
        result.strength = stack(self.strength)
        result.strength_entropy = stack(self.entropy)
        result.mean_distance_px = stack(self.distance)
        if self.patterns:
            result.cls_vectors = stack(self.cls)
            result.patch_bits = stack(self.bits)
        if self.weights is not None:
            result.semantic_concentration = stack(self.semantic)
            result.cls_semantic_concentration = stack(self.cls_semantic)
        return result


@torch.inference_mode()
def analyse_batch(vit: ViT, images: Tensor, labels=None, q: float = 0.01, semantic: bool = True) -> BatchResult:
    """Everything per image for a batch: images [B, 3, H, W] preprocessed, labels [B] or None.
    semantic: also compute the SIFT-based semantic concentration (analysis.semantic)."""
    weights = None
    if semantic:
        images = vit.check_images(images)
        weights = torch.from_numpy(batch_semantic_weights(images, vit.data_config, vit.grid, vit.patch_size))
    analyser = AttentionAnalyser(vit, q, semantic_weights=weights)
    importance, base = importance_arrays(vit, images, labels, on_attention=analyser)
    probs = None if base.logp is None else base.logp.exp().float().cpu().numpy()
    return analyser.fill(BatchResult(importance=importance, probs=probs))


@torch.inference_mode()
def strength_arrays(vit: ViT, images: Tensor) -> BatchResult:
    """Strength arrays only (no pruning): one forward with the analyser hook."""
    analyser = AttentionAnalyser(vit, patterns=False)
    vit.blocks(vit.embed(images), hook=lambda layer, A: analyser(layer, A))
    return analyser.fill(BatchResult())


def attention_strength(vit: ViT, images: Tensor, batch_size: int = 32) -> pd.DataFrame:
    """k-hop strength of every head for every image.

    images: [B, 3, H, W] preprocessed. Returns one row per (image, layer, head): image, layer,
    head, strength (list of K = max(gh, gw) floats), strength_entropy (in [0, 1]),
    mean_distance_px (attention-weighted mean patch distance, pixels).
    """
    images = vit.check_images(images)
    frames = []
    for s in range(0, images.shape[0], batch_size):
        r = strength_arrays(vit, images[s:s + batch_size])
        frames.append(arrays_to_frame({"strength": r.strength, "strength_entropy": r.strength_entropy,
                                       "mean_distance_px": r.mean_distance_px}, offset=s))
    return pd.concat(frames, ignore_index=True)
