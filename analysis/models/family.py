"""The model-family seam: the few operations the engine needs of an architecture.

Importance, strength, patterns and every other metric call only ``ViT`` (analysis.models.adapter),
which calls only a ``ModelFamily``. A new architecture is one new file: a subclass of
``ModelFamily`` plus one ``register_family(...)`` call (see analysis/models/registry.py and
ARCHITECTURE.md). Shapes: ``x [B, N, C]`` token sequence; ``A [B, H, Nq, N]`` post-softmax
attention; ``v [B, H, N, d]`` values; ``o [..., Nq, H*d]`` concatenated head outputs;
``z [..., Nq, C]`` attention-module output (after the output projection, SPEC ``z[l]``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from analysis.errors import ModelLoadError


class ModelFamily(ABC):
    """One architecture's implementation of the engine's operations on a built module.

    Subclasses set the shape facts in ``__init__``: depth (L), num_heads (H), head_dim (d),
    embed_dim (C), num_prefix_tokens (T), grid (gh, gw), patch_size (px), img_size (h, w) px,
    num_classes (0 = backbone), pool_reads_prefix_only (the pooled output reads only the prefix
    tokens, so the last block may compute only those), data_config (mean, std, input_size,
    interpolation, crop_pct) and transform (PIL -> [3, H, W]).
    """

    family: str = "abstract"          # short id written into a run's manifest
    sized_by_files: bool = False      # its checkpoints set the input size: a reload passes the run's img_size
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

    # ---- residual-stream pieces (SPEC "Beyond the paper (v3)"): direct effects, paths, EAP ----------
    @abstractmethod
    def head_qkv(self, layer: int, x: Tensor, heads: Sequence[int] | None = None, parts: str = "qkv") -> tuple[Tensor, ...]:
        """Queries, keys and/or values of some heads of block ``layer``, each head from its own input:
        x [B, H', N, C] (x[:, i] is what head heads[i] reads; heads default all H, in order; repeats
        allowed) -> one [B, H', N, d] tensor per letter of ``parts`` (a subset of "qkv", in that order),
        block pre-norm, projections and any q/k norm included."""

    @abstractmethod
    def attention_scale(self, layer: int) -> float:
        """The factor on q k^T before the softmax of block ``layer``."""

    @abstractmethod
    def attention_context(self, layer: int, x: Tensor, n_query: int | None = None) -> Any:
        """What ``project`` needs besides o, from the block input x [B, N, C] (the ctx of attention_parts)."""

    @abstractmethod
    def head_writes(self, layer: int, o: Tensor, ctx: Any) -> tuple[Tensor, Tensor]:
        """What each head writes into the residual stream: per-head outputs o [B, H, Nq, d] (A V) ->
        (c [B, H, Nq, C] = ls1 * (o_h W_O[h]), SPEC ``c[l,h]``; the bias write ls1 * b_O [C])."""

    @abstractmethod
    def frozen_readout(self, x: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
        """The read-out after the last block with every norm's 1/sigma frozen at its value on the
        clean stream x [B, N, C]: a function p [B, M, N, C] -> (pooled [B, M, D], logits [B, M, K]
        or None), affine in p, equal to ``outputs(x)`` at p = x (M pieces per image)."""

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


def frozen_layer_norm(norm: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    """``norm`` (a LayerNorm or Identity) with 1/sigma frozen at its value on x [B, *S, C]: a function
    p [B, M, *S, C] -> [B, M, *S, C] (centring, gamma and beta kept; affine in p)."""
    if isinstance(norm, nn.Identity):
        return lambda p: p
    if not isinstance(norm, nn.LayerNorm) or norm.normalized_shape != (x.shape[-1],):
        raise ModelLoadError(f"The read-out uses a {type(norm).__name__}, not a LayerNorm over the embedding: "
                             "direct effects and paths need a read-out made affine by freezing a LayerNorm's "
                             "scale. Use a model with LayerNorm (timm vit_*, deit*, *_dinov2; HF ViT/DeiT/DINOv2).")
    inv_sigma = (x.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).rsqrt().unsqueeze(1)  # [B, 1, *S, 1]

    def apply(p: Tensor) -> Tensor:
        y = (p - p.mean(dim=-1, keepdim=True)) * inv_sigma
        if norm.weight is not None:
            y = y * norm.weight
        return y + norm.bias if norm.bias is not None else y

    return apply
