"""Explicit forward of a timm ViT block with a hook point on the attention pattern.

timm's ``Attention`` may run fused (``scaled_dot_product_attention``), where the attention
matrix never exists. HeadScope therefore runs each block through these functions, which use the
block's own weights and reproduce timm's computation step by step, and expose the post-softmax
pattern ``A [B, H, Nq, N]`` to a hook that may read it (capture) or return an edited copy
(pruning), in the style of TransformerLens hook points. The timm model is never modified.

Shapes: ``x [B, N, C]`` token sequence; ``A [B, H, Nq, N]``; ``v [B, H, N, d]``;
``z [B, Nq, C]`` attention-module output (after the output projection).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# hook(layer, A) -> edited A or None (None keeps A unchanged)
AttentionHook = Callable[[int, Tensor], Optional[Tensor]]


def _qkv(attn: nn.Module, x: Tensor, n_query: int | None):
    """Queries [B, H, Nq, d], keys and values [B, H, N, d], gate [B, Nq, H*d] or None."""
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    xq = x
    if n_query is not None and n_query < N:
        q, xq = q[:, :, :n_query], x[:, :n_query]
    gate = attn.gate(xq).sigmoid() if getattr(attn, "gate", None) is not None else None
    return q, k, v, gate


def attention_parts(attn: nn.Module, x: Tensor, n_query: int | None = None):
    """Post-softmax attention, values and gate of one attention module.

    x: [B, N, C]; n_query: use only the first ``n_query`` tokens as queries (default all).
    Returns (A [B, H, Nq, N], v [B, H, N, d], gate [B, Nq, H*d] or None).
    """
    q, k, v, gate = _qkv(attn, x, n_query)
    A = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return A, v, gate


def heads_output(A: Tensor, v: Tensor) -> Tensor:
    """Per-head outputs concatenated: A [B, H, Nq, N] @ v [B, H, N, d] -> [B, Nq, H*d]."""
    o = A @ v
    B, H, Nq, d = o.shape
    return o.transpose(1, 2).reshape(B, Nq, H * d)


def project(attn: nn.Module, o: Tensor, gate: Tensor | None) -> Tensor:
    """Output projection of concatenated heads o [..., Nq, H*d] -> z [..., Nq, C]."""
    o = attn.norm(o)
    if gate is not None:
        o = o * gate
    return attn.proj(o)


def block_after_attention(block: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """Residual add of z, then the MLP half of the block. x, z: [B, Nq, C] -> [B, Nq, C]."""
    x = x + block.drop_path1(block.ls1(z))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def block_forward(block: nn.Module, x: Tensor, layer: int, hook: AttentionHook | None = None,
                  n_query: int | None = None) -> Tensor:
    """One transformer block with the attention hook point. x [B, N, C] -> [B, Nq, C].

    Without a hook the pattern is not materialised (fused scaled_dot_product_attention)."""
    if hook is None:
        q, k, v, gate = _qkv(block.attn, block.norm1(x), n_query)
        o = F.scaled_dot_product_attention(q, k, v, scale=block.attn.scale)
        o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
    else:
        A, v, gate = attention_parts(block.attn, block.norm1(x), n_query)
        edited = hook(layer, A)
        o = heads_output(A if edited is None else edited, v)
    z = project(block.attn, o, gate)
    return block_after_attention(block, x[:, : o.shape[1]], z)
