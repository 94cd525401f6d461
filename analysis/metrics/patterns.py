"""Attention-pattern inputs (SPEC "Attention patterns").

``cls_vector`` gives the CLS-related attention of a head; ``binarize_topq`` its patch->patch
attention with the top ``q`` fraction of values set to 1. Binary matrices are stored bit-packed
(``np.packbits`` over the row-major flattened ``P x P`` matrix: ``ceil(P*P/8)`` bytes per head).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def cls_vector(A: Tensor, num_prefix: int) -> Tensor:
    """concat(A[0, :], A[T:, 0]): [..., N, N] -> [..., N + P] (first prefix token = CLS)."""
    return torch.cat([A[..., 0, :], A[..., num_prefix:, 0]], dim=-1)


def topq_count(num_values: int, q: float) -> int:
    """How many values the top-q fraction keeps (at least 1)."""
    return max(1, int(round(q * num_values)))


def binarize_topq(A_pp: Tensor, q: float = 0.01) -> Tensor:
    """Keep the top ``q`` fraction of each matrix's values: [..., P, P] float -> bool (exactly
    ``topq_count(P*P, q)`` ones per matrix; ties broken by position)."""
    flat = A_pp.reshape(*A_pp.shape[:-2], -1)
    idx = flat.topk(topq_count(flat.shape[-1], q), dim=-1).indices
    bits = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
    return bits.reshape(A_pp.shape)


def pack_bits(bits: Tensor | np.ndarray) -> np.ndarray:
    """Bool [..., P, P] -> uint8 [..., ceil(P*P/8)]."""
    bits = bits.cpu().numpy() if isinstance(bits, Tensor) else np.asarray(bits)
    return np.packbits(bits.reshape(*bits.shape[:-2], -1), axis=-1)


def unpack_bits(packed: np.ndarray, num_patches: int) -> np.ndarray:
    """uint8 [..., ceil(P*P/8)] -> bool [..., P, P]."""
    P = num_patches
    flat = np.unpackbits(packed, axis=-1, count=P * P)
    return flat.reshape(*packed.shape[:-1], P, P).astype(bool)
