"""The model-family seam: the few operations the engine needs of an architecture.

Importance, strength, patterns and every other metric call only ``ViT`` (analysis.models.adapter),
which calls only a ``ModelFamily``. A new architecture is one new file: a subclass of
``ModelFamily`` plus one ``register_family(...)`` call (see analysis/models/_registry.py and
ARCHITECTURE.md). Shapes: ``x [B, N, C]`` token sequence; ``A [B, H, Nq, N]`` post-softmax
attention; ``v [B, H, N, d]`` values; ``o [..., Nq, H*d]`` concatenated head outputs;
``z [..., Nq, C]`` attention-module output (after the output projection, SPEC ``z[l]``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class ModelFamily(ABC):
    """One architecture's implementation of the engine's operations on a built module.

    Subclasses set the shape facts in ``__init__``: depth (L), num_heads (H), head_dim (d),
    embed_dim (C), num_prefix_tokens (T), grid (gh, gw), patch_size (px), img_size (h, w) px,
    num_classes (0 = backbone), pool_reads_prefix_only (the pooled output reads only the prefix
    tokens, so the last block may compute only those), data_config (mean, std, input_size,
    interpolation, crop_pct) and transform (PIL -> [3, H, W]).
    """

    family: str = "abstract"          # short id written into a run's manifest
    module: nn.Module
    depth: int
    num_heads: int
    head_dim: int
    embed_dim: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    patch_size: int
    img_size: tuple[int, int]
    num_classes: int
    pool_reads_prefix_only: bool
    data_config: dict
    transform: Callable
    default_name: str = "model"
    default_class_names: Sequence[str] | None = None

    @abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """Preprocessed images [B, 3, H, W] -> tokens [B, N, C], the input of block 0."""

    @abstractmethod
    def attention_parts(self, layer: int, x: Tensor, n_query: int | None = None) -> tuple[Tensor, Tensor, Any]:
        """Block ``layer``'s attention on its input x [B, N, C] (pre-norm included):
        (A [B, H, Nq, N], v [B, H, N, d], ctx), ctx being whatever ``project`` needs besides o.
        n_query: use only the first n_query tokens as queries (default all)."""

    @abstractmethod
    def project(self, layer: int, o: Tensor, ctx: Any) -> Tensor:
        """Concatenated head outputs o [..., Nq, H*d] -> z [..., Nq, C] (output projection)."""

    @abstractmethod
    def finish_block(self, layer: int, x: Tensor, z: Tensor) -> Tensor:
        """Residual add of z (with any layer scale) and the MLP half: x, z [..., Nq, C] -> [..., Nq, C]."""

    @abstractmethod
    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Last block's output [B, N', C] -> (pooled embedding [B, D], logits [B, classes] or None)."""

    def fused_heads(self, layer: int, x: Tensor, n_query: int | None = None) -> tuple[Tensor, Any]:
        """(o [B, Nq, H*d], ctx) without materialising A; families override with a fused kernel."""
        A, v, ctx = self.attention_parts(layer, x, n_query)
        return heads_concat(A @ v), ctx


def heads_concat(o: Tensor) -> Tensor:
    """Per-head outputs [B, H, Nq, d] -> concatenation [B, Nq, H*d]."""
    B, H, Nq, d = o.shape
    return o.transpose(1, 2).reshape(B, Nq, H * d)


def sdpa_heads(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Fused attention: q [B, H, Nq, d], k, v [B, H, N, d] -> o [B, Nq, H*d]."""
    return heads_concat(F.scaled_dot_product_attention(q, k, v, scale=scale))


def softmax_attention(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Post-softmax attention [B, H, Nq, N] from queries and keys."""
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)

