"""Head-to-head paths (SPEC "Beyond the paper (v3)": path patching with zero ablation of the sender).

"b reads without a" (a = (i, h_a), b = (j, h_b), i < j): head b's q, k and/or v (the ``via``) are
computed from ``x_j - c[a]`` while every other head and module of block j reads the clean ``x_j``;
blocks j..L-1 are then recomputed.
- exact: ``path_logit = logit_y(x) - logit_y(x | b reads without a)`` (classifier) or ``path_emb`` =
  cosine distance of the pooled embeddings (backbone). The clean prefix up to block j's input is
  reused from one clean pass; all edges into one block are one batch through blocks j..L-1.
- APPROXIMATE, edge attribution patching (Syed et al. 2023): ``path_logit_eap = <g_b, c[a]>``
  summed over tokens, g_b = d logit_y / d (a copy of x_j that only b's q (k, v) reads) at the
  clean point; every edge of a batch of images from one forward and one backward (classifiers).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.errors import InputError
from analysis.metrics.direct import StreamTrace, top1_labels, trace_stream
from analysis.metrics.common import check_labels
from analysis.metrics.importance import cosine_distance, downstream
from analysis.models.adapter import ViT
from analysis.models.family import heads_concat

VIAS = ("q", "k", "v", "qkv")
METHODS = ("exact", "eap")

Head = tuple[int, int]


def check_via(via: str) -> str:
    if via not in VIAS:
        raise InputError(f"Unknown via {via!r}: use 'q', 'k' or 'v' (what the receiving head reads without the "
                         "sender) or 'qkv' (all three).")
    return via


def check_heads(vit: ViT, heads: Iterable | None, what: str) -> list[Head]:
    """A list of (layer, head) pairs, every head of the model where None."""
    if heads is None:
        return [(l, h) for l in range(vit.depth) for h in range(vit.num_heads)]
    out = []
    for item in heads:
        try:
            layer, head = (int(v) for v in item)
        except (TypeError, ValueError):
            raise InputError(f"{what} must be (layer, head) pairs, got {item!r}.") from None
        if not (0 <= layer < vit.depth and 0 <= head < vit.num_heads):
            raise InputError(f"Head ({layer}, {head}) in {what} does not exist: layers 0-{vit.depth - 1}, "
                             f"heads 0-{vit.num_heads - 1}.")
        out.append((layer, head))
    return list(dict.fromkeys(out))


def check_edge(vit: ViT, edge) -> tuple[Head, Head]:
    """An edge ((a_layer, a_head), (b_layer, b_head)) as two checked (layer, head) pairs."""
    try:
        a, b = edge
    except (TypeError, ValueError):
        raise InputError(f"An edge must be ((a_layer, a_head), (b_layer, b_head)), got {edge!r}.") from None
    return check_heads(vit, [a], "edges")[0], check_heads(vit, [b], "edges")[0]


def sender_writes(vit: ViT, trace: StreamTrace, layers: Iterable[int]) -> dict[int, Tensor]:
    """{layer: c [B, H, N, C]}: what each head of those blocks writes into the stream (clean pass)."""
    out = {}
    for layer in sorted(set(layers)):
        ctx = vit.attention_context(layer, trace.xs[layer])
        out[layer] = vit.head_writes(layer, trace.heads[layer], ctx)[0]
    return out


def exact_paths(vit: ViT, trace: StreamTrace, label: Tensor | None, edges: Sequence[tuple[Head, Head]],
                via: str = "qkv") -> np.ndarray:
    """Exact path values of edges ((i, h_a), (j, h_b)), i < j, for image 0 of ``trace``: float64
    [E], path_logit (classifier, label: LongTensor [1]) or path_emb (backbone)."""
    T, N = vit.num_prefix_tokens, vit.num_tokens
    writes = sender_writes(vit, trace, [a[0] for a, _ in edges])
    values = np.full(len(edges), np.nan)
    if label is not None:
        clean_logit = trace.logits[0, label[0]].double()
    by_layer: dict[int, list[int]] = {}
    for e, (_, b) in enumerate(edges):
        by_layer.setdefault(b[0], []).append(e)
    for j, idx in sorted(by_layer.items()):
        x = trace.xs[j][:1]                                                     # [1, N, C]
        nq = T if (j == vit.depth - 1 and vit.pool_reads_prefix_only and T > 0) else N
        receivers = [edges[e][1][1] for e in idx]
        without = torch.stack([x[0] - writes[edges[e][0][0]][0, edges[e][0][1]] for e in idx])   # [E, N, C]
        q, k, v = (t.transpose(0, 1) for t in vit.head_qkv(j, without[None], receivers))          # [E, 1, N, d]
        if via != "qkv":
            clean = vit.head_qkv(j, x[:, None].expand(1, len(idx), N, x.shape[-1]), receivers)
            q, k, v = (t if part in via else c.transpose(0, 1) for part, t, c in zip("qkv", (q, k, v), clean))
        o_b = F.scaled_dot_product_attention(q[:, :, :nq], k, v, scale=vit.attention_scale(j))     # [E, 1, nq, d]
        o = trace.heads[j][:1, :, :nq].repeat(len(idx), 1, 1, 1)                # [E, H, nq, d]
        o[torch.arange(len(idx), device=o.device), torch.tensor(receivers, device=o.device)] = o_b[:, 0]
        z = vit.project(j, heads_concat(o), vit.attention_context(j, x, nq))     # [E, nq, C]
        pooled, logits = downstream(vit, j, x[:, :nq].expand(len(idx), nq, x.shape[-1]), z)
        if label is not None:
            values[idx] = (clean_logit - logits[:, label[0]].double()).cpu().numpy()
        else:
            values[idx] = cosine_distance(trace.pooled[:1].expand_as(pooled), pooled).cpu().numpy()
    return values


def eap_scores(vit: ViT, images: Tensor, labels=None) -> tuple[np.ndarray, Tensor]:
    """APPROXIMATE path values of every edge, by edge attribution patching: float64
    [B, 3 (q, k, v), L, H (receiver b), L, H (sender a)] = <g_b, c[a]> summed over tokens (0 where
    the sender is not before the receiver; the qkv value is the sum over the 3), and the labels
    used [B] (each image's top-1 class where labels is None). One forward and one backward for the
    batch; classifiers only. images [B, 3, H, W]; labels [B] or None."""
    if not vit.has_head:
        raise InputError("Edge attribution patching (method='eap') estimates path_logit, which needs a classifier; "
                         "for a backbone use method='exact' (path_emb).")
    images = vit.check_images(images)
    L, H = vit.depth, vit.num_heads
    labels = None if labels is None else check_labels(vit, labels, images.shape[0])
    with torch.inference_mode(False), torch.enable_grad():
        x = vit.embed(images).detach()
        B, N, C = x.shape
        leaves, writes = [], []
        for layer in range(L):
            # head h's q (k, v) reads x + delta[:, h]: a copy of x only it reads (delta = 0), whose
            # gradient is d logit / d delta, while x keeps its own path to the earlier blocks' leaves
            deltas = [torch.zeros(B, H, N, C, dtype=x.dtype, device=x.device, requires_grad=True) for _ in range(3)]
            leaves += deltas
            (q,), (k,), (v,) = (vit.head_qkv(layer, x[:, None] + d, parts=p) for d, p in zip(deltas, "qkv"))
            o = F.scaled_dot_product_attention(q, k, v, scale=vit.attention_scale(layer))
            ctx = vit.attention_context(layer, x)
            writes.append(vit.head_writes(layer, o.detach(), ctx)[0].detach())   # c[layer, h] [B, H, N, C]
            x = vit.finish_block(layer, x, vit.project(layer, heads_concat(o), ctx))
        _, logits = vit.outputs(x)
        y = logits.detach().argmax(-1) if labels is None else labels.clone()
        grads = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), leaves)
    g = torch.stack(grads).view(L, 3, B, H, N * C).permute(2, 1, 0, 3, 4).reshape(B, 3, L * H, N * C)
    c = torch.stack(writes, dim=1).reshape(B, L * H, N * C)
    scores = (g.double() @ c.double().transpose(1, 2)[:, None]).view(B, 3, L, H, L, H)
    layers = torch.arange(L, device=scores.device)
    before = layers[:, None] < layers[None, :]                                  # [sender layer, receiver layer]
    scores = scores * before.T[None, None, :, None, :, None].to(scores.dtype)
    return scores.cpu().numpy(), y


def head_paths(vit: ViT, image: Tensor, label: int | None = None, *, via: str = "qkv", method: str = "exact",
               senders: Iterable | None = None, receivers: Iterable | None = None,
               edges: Iterable | None = None) -> pd.DataFrame:
    """Head-to-head paths a -> b of one image (SPEC "Head-to-head paths").

    image: one preprocessed [3, H, W]; label: int (None on a classifier = its top-1 class; None for
    a backbone); via: what b reads without a, "q", "k", "v" or "qkv"; method: "exact" (path
    patching, one forward of blocks j..L-1 per edge, batched per receiving block) or "eap"
    (APPROXIMATE: edge attribution patching, every edge from one forward and backward; classifiers).
    senders / receivers: lists of (layer, head), default all heads; edges: an explicit list of
    ((a_layer, a_head), (b_layer, b_head)) instead of their cross product. One row per edge a -> b
    with a_layer < b_layer: a_layer, a_head, b_layer, b_head and path_logit (classifier, exact, logit
    units) | path_emb (backbone, exact, cosine distance) | path_logit_eap (method="eap").
    """
    check_via(via)
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}: use 'exact' (path patching) or 'eap' (edge attribution "
                         "patching, an approximation).")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"head_paths takes one image [3, H, W]; got {tuple(image.shape)}.")
    image = vit.check_images(image)
    if edges is not None:
        pairs = [check_edge(vit, edge) for edge in edges]
        bad = [(a, b) for a, b in pairs if a[0] >= b[0]]
        if bad:
            raise InputError(f"Edges {bad[:5]} do not go forward: a path a -> b needs a_layer < b_layer.")
    else:
        a_list, b_list = check_heads(vit, senders, "senders"), check_heads(vit, receivers, "receivers")
        pairs = [(a, b) for a in a_list for b in b_list if a[0] < b[0]]
    labels = None if label is None else [label]
    df = pd.DataFrame({"a_layer": [a[0] for a, _ in pairs], "a_head": [a[1] for a, _ in pairs],
                       "b_layer": [b[0] for _, b in pairs], "b_head": [b[1] for _, b in pairs]}, dtype=np.int64)
    if method == "eap":
        scores, _ = eap_scores(vit, image, labels)
        parts = [("qkv".index(p)) for p in via]
        table = scores[0, parts].sum(0)                                          # [L, H, L, H] (b, a)
        df["path_logit_eap"] = [float(table[b[0], b[1], a[0], a[1]]) for a, b in pairs]
        return df
    with torch.no_grad():
        trace = trace_stream(vit, image)
        y = top1_labels(vit, trace, labels)
        values = exact_paths(vit, trace, y, pairs, via) if pairs else np.zeros(0)
    df["path_logit" if y is not None else "path_emb"] = values
    return df
