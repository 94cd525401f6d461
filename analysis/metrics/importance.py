"""Exact leave-one-out head importance and partial pruning (SPEC "Head importance").

The fast exact scheme:
1. one unpruned pass stores the input ``x[l]`` of every block and the output distribution;
2. for block ``l`` the attention ``A``, values ``v`` and per-head outputs are recomputed once;
   each pruned variant (head h, regions) only changes head h's output, so the pruned
   attention-module output ``z'`` is the output projection of the edited concatenation:
   ``cls_dist`` and ``patch_dist`` need no further pass;
3. the variants of a block are batched together (variants x images, in groups of ~1.6k tokens)
   through blocks l..L-1, the last block computing only the prefix tokens when the pooled
   output reads only those.
Every number equals a full forward with the head pruned (see tests/test_importance.py).
Distances and divergences are computed in float64 from float32 activations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.errors import InputError
from analysis.metrics.common import check_labels
from analysis.metrics.registry import Metric, OnBatch, register_metric
from analysis.models.family import heads_concat
from analysis.models.pruning import MODE_LABELS, MODES, keep_mask
from analysis.models.adapter import ViT

METRICS = ("prob", "prob_drop", "jsd", "cls_dist", "patch_dist", "emb_dist")
# Variants x images x tokens edited at once in the pruned block: bounds memory to ~100s of MB.
TOKENS_PER_CHUNK = 1 << 15
# Tokens per group pushed through the later blocks: a block's cost per sequence on the CPU is
# lowest for groups of ~1-2k tokens and ~25% higher at 10k (cache misses; scripts/bench_importance.py).
SEQUENCE_TOKENS = 1600


@dataclass
class Baseline:
    """The unpruned pass of a batch. xs: block inputs, L x [B, N, C]; pooled [B, D];
    logp: log-probabilities [B, C] float64 (None for a backbone); logits [B, C] float32 (None for a backbone)."""
    xs: list[Tensor]
    pooled: Tensor
    logp: Tensor | None
    logits: Tensor | None = None


def run_baseline(vit: ViT, images: Tensor, on_attention: Callable[[int, Tensor], None] | None = None) -> Baseline:
    """Unpruned forward keeping every block input; ``on_attention(layer, A [B,H,N,N])`` sees each pattern."""
    x = vit.embed(images)
    xs = []
    hook = None if on_attention is None else (lambda layer, A: on_attention(layer, A))
    for layer in range(vit.depth):
        xs.append(x)
        x = vit.block(layer, x, hook)
    pooled, logits = vit.outputs(x)
    logp = None if logits is None else torch.log_softmax(logits.double(), dim=-1)
    return Baseline(xs, pooled, logp, logits)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos(a, b) over the last dim, in float64."""
    a, b = a.double(), b.double()
    den = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return 1.0 - (a * b).sum(-1) / den


def jensen_shannon_bits(logp: Tensor, logq: Tensor) -> Tensor:
    """JSD of two distributions given as log-probabilities [..., C], in bits, in [0, 1]."""
    p, q = logp.exp(), logq.exp()
    logm = torch.log((p + q) / 2)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    kl_p = torch.where(p > 0, p * (logp - logm), zero).sum(-1)
    kl_q = torch.where(q > 0, q * (logq - logm), zero).sum(-1)
    return ((kl_p + kl_q) / (2 * math.log(2))).clamp(0, 1)


def layer_variants(vit: ViT, base: Baseline, layer: int, variants: Sequence[tuple[int, Tensor | None]],
                   labels: Tensor | None, means: Tensor | None = None) -> dict[str, Tensor]:
    """Metrics of pruned variants of one block, each variant = (head, keep mask [N, N]).

    means: [H, N, d] per-head outputs that replace head h's output at every token (mean
    ablation, SPEC "Mean ablation"); the variants' masks are then unused (pass None).
    Returns {metric: [V, B] float64} plus "logp" [V, B, C] (classifier models) and, with labels,
    "logit" [V, B] float64: the label's logit of each variant (logit_drop, analysis.metrics.direct).
    """
    T = vit.num_prefix_tokens
    x = base.xs[layer]
    B, N, _ = x.shape
    A, v, ctx = vit.attention_parts(layer, x)
    o = A @ v                                                   # [B, H, N, d]
    z = vit.project(layer, heads_concat(o), ctx)                # [B, N, C]
    last = layer == vit.depth - 1
    keep_prefix_only = last and vit.pool_reads_prefix_only
    per_chunk = max(1, TOKENS_PER_CHUNK // (N * B))
    out: dict[str, list[Tensor]] = {}
    for start in range(0, len(variants), per_chunk):
        chunk = variants[start:start + per_chunk]
        V = len(chunk)
        o_var = o.unsqueeze(0).repeat(V, 1, 1, 1, 1)            # [V, B, H, N, d]
        for i, (head, mask) in enumerate(chunk):
            o_var[i, :, head] = (A[:, head] * mask) @ v[:, head] if means is None else means[head]
        o_cat = o_var.transpose(2, 3).reshape(V, B, N, -1)      # [V, B, N, H*d]
        z_var = vit.project(layer, o_cat, ctx)                  # [V, B, N, C]
        res = {}
        res["cls_dist"] = (cosine_distance(z[:, 0], z_var[:, :, 0]) if T > 0
                           else torch.full((V, B), float("nan"), dtype=torch.float64))
        res["patch_dist"] = cosine_distance(z[:, T:], z_var[:, :, T:]).mean(-1)
        x_in, z_in = (x[:, :T], z_var[:, :, :T]) if keep_prefix_only else (x, z_var)
        x_in = x_in.expand(V, *x_in.shape).reshape(V * B, *x_in.shape[1:])
        z_in = z_in.reshape(V * B, *z_in.shape[2:])
        pooled, logits = downstream(vit, layer, x_in, z_in)
        res["emb_dist"] = cosine_distance(base.pooled.repeat(V, 1), pooled).reshape(V, B)
        if logits is not None:
            logq = torch.log_softmax(logits.double(), dim=-1).reshape(V, B, -1)
            res["logp"] = logq
            if labels is not None:
                p_true = base.logp.gather(1, labels[:, None]).exp()[:, 0]            # [B]
                q_true = logq.gather(2, labels[None, :, None].expand(V, B, 1)).exp()[..., 0]
                res["prob"] = q_true
                res["prob_drop"] = p_true[None] - q_true
                res["logit"] = logits.double().reshape(V, B, -1).gather(2, labels[None, :, None].expand(V, B, 1))[..., 0]
            res["jsd"] = jensen_shannon_bits(base.logp[None], logq)
        for k, t in res.items():
            out.setdefault(k, []).append(t)
    return {k: torch.cat(ts) for k, ts in out.items()}


def downstream(vit: ViT, layer: int, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor | None]:
    """Finish block ``layer`` (residual + MLP) and run the rest of the model, in groups of about
    SEQUENCE_TOKENS tokens (CPU matmuls are fastest there). x, z: [S, Nq, C] block input and
    edited attention output -> (pooled [S, D], logits [S, classes] or None)."""
    step = max(1, SEQUENCE_TOKENS // x.shape[1])
    pooled, logits = [], []
    for s in range(0, x.shape[0], step):
        h = vit.finish_block(layer, x[s:s + step], z[s:s + step])
        p, lg = vit.outputs(vit.blocks(h, start=layer + 1, prefix_only_last=vit.pool_reads_prefix_only))
        pooled.append(p)
        logits.append(lg)
    return torch.cat(pooled), (None if logits[0] is None else torch.cat(logits))


@torch.inference_mode()
def importance_arrays(vit: ViT, images: Tensor, labels=None,
                      on_attention: Callable[[int, Tensor], None] | None = None, means: Tensor | None = None,
                      base: Baseline | None = None, logit_drop: bool = False):
    """Leave-one-out (mode 1) metrics of every head: {metric: [B, L, H] float64 numpy} and
    the baseline. ``prob``/``prob_drop`` are NaN for a backbone or without labels, ``jsd`` for a
    backbone. With ``logit_drop`` a classifier also gets ``logit_drop`` = logit_y - logit_y pruned
    (SPEC v3 "Direct effect"; y = the label, each image's top-1 class without labels), read off the
    same pruned forwards.
    means: [L, H, N, d] head means (analysis.metrics.ablation.head_means): mean-ablate each head
    instead of zeroing it. base: the unpruned pass when the caller already ran it
    (``direct.StreamTrace.baseline()``; on_attention is then unused)."""
    images = vit.check_images(images)
    B, L, H = images.shape[0], vit.depth, vit.num_heads
    labels = check_labels(vit, labels, B)
    if base is None:
        base = run_baseline(vit, images, on_attention)
    logit_drop = logit_drop and base.logits is not None
    y = labels
    if logit_drop and labels is None:
        y = base.logits.argmax(-1)  # logit_drop without labels: the top-1 class (prob/prob_drop stay NaN)
    arrays = {m: np.full((B, L, H), np.nan) for m in METRICS}
    if logit_drop:
        clean = base.logits.double().gather(1, y[:, None])                     # [B, 1]
        arrays["logit_drop"] = np.full((B, L, H), np.nan)
    mask = None if means is not None else keep_mask(MODES[1], vit.num_tokens, vit.num_prefix_tokens, device=vit.device)
    for layer in range(L):
        res = layer_variants(vit, base, layer, [(h, mask) for h in range(H)], y,
                             None if means is None else means[layer])
        for m in METRICS:
            if m in res and (labels is not None or m not in ("prob", "prob_drop")):
                arrays[m][:, layer, :] = res[m].T.cpu().numpy()
        if logit_drop:
            arrays["logit_drop"][:, layer, :] = (clean - res["logit"].T).cpu().numpy()
    return arrays, base


@torch.inference_mode()
def partial_pruning(vit: ViT, image: Tensor, label: int | None, layer: int, head: int,
                    top: int = 5) -> pd.DataFrame:
    """All 8 pruning modes of one head for one image (the dashboard's online query).

    image: [3, H, W] (or [1, 3, H, W]) preprocessed. Returns 8 rows: mode (0-7), regions,
    prob, prob_drop, jsd, cls_dist, patch_dist, emb_dist, top5_classes, top5_probs
    (top-5 lists are empty for a backbone). Mode 0 is the unpruned model.
    """
    if image.ndim == 3:
        image = image[None]
    images = vit.check_images(image)
    if not (0 <= layer < vit.depth and 0 <= head < vit.num_heads):
        raise InputError(f"Head ({layer}, {head}) does not exist: layers 0-{vit.depth - 1}, heads 0-{vit.num_heads - 1}.")
    labels = check_labels(vit, None if label is None else [label], 1)
    base = run_baseline(vit, images)
    variants = [(head, keep_mask(m, vit.num_tokens, vit.num_prefix_tokens, device=vit.device)) for m in MODES]
    res = layer_variants(vit, base, layer, variants, labels)
    df = pd.DataFrame({"mode": range(len(MODES)), "regions": MODE_LABELS})
    for m in METRICS:
        df[m] = res[m][:, 0].cpu().numpy() if m in res else np.nan
    if "logp" in res:
        p, idx = res["logp"][:, 0].exp().topk(min(top, vit.num_classes), dim=-1)
        df["top5_classes"] = idx.cpu().tolist()
        df["top5_probs"] = p.float().cpu().tolist()
    else:
        df["top5_classes"] = [[] for _ in MODES]
        df["top5_probs"] = [[] for _ in MODES]
    return df


# ---- the metrics this module computes, declared with the registry (analysis.metrics.registry) ----

def leave_one_out_hook(vit, images, labels, batch):
    """Exact leave-one-out (mode 1) of every head on the batch's shared clean pass (``batch.trace()``,
    which hosts the attention hooks), with logit_drop and, asked for, indirect_logit = logit_drop -
    the head's direct term (SPEC v3, analysis.metrics.direct: ``batch.direct_terms()``)."""
    base = batch.trace().baseline()
    arrays, _ = importance_arrays(vit, images, labels, base=base, logit_drop=True)
    if "indirect_logit" in batch.metrics and "logit_drop" in arrays:
        arrays["indirect_logit"] = arrays["logit_drop"] - batch.direct_terms()
    if base.logp is not None:
        batch.outputs["probs"] = base.logp.exp().float().cpu().numpy()
    return arrays


LEAVE_ONE_OUT = OnBatch(leave_one_out_hook)



register_metric(Metric("prob", "P(true) when pruned", axis="P(true)", important="low", group="importance", range=(0, 1),
                       applies_to={"classifier"}, needs_label=True, compute=LEAVE_ONE_OUT,
                       meaning="P(true class) with the head pruned",
                       formula=r"the probability of the true class *with the head pruned*, $P'_y$. Low means the model "
                               "needs this head for this image. (The paper plots this value rather than the drop because "
                               "it reads more easily.)"))
register_metric(Metric("prob_drop", "drop of P(true)", axis="ΔP(true)", important="high", group="importance",
                       applies_to={"classifier"}, needs_label=True, compute=LEAVE_ONE_OUT,
                       meaning="drop of P(true class)",
                       formula=r"how much the true class loses: $P_y - P'_y$ (paper Eq. 3). Negative values mean the head "
                               "was *hurting* the prediction."))
register_metric(Metric("jsd", "JSD", unit="bits", important="high", group="importance", applies_to={"classifier"}, range=(0, 1),
                       compute=LEAVE_ONE_OUT, meaning="change of the output (JSD)",
                       formula=r"how much the whole output distribution changes, as the Jensen–Shannon divergence in bits "
                               r"(0 = identical, 1 = completely different): $\mathrm{JSD}(P \,\|\, P') = \tfrac12 "
                               r"\mathrm{KL}(P \,\|\, M) + \tfrac12 \mathrm{KL}(P' \,\|\, M)$, $M = \tfrac12 (P + P')$, "
                               "logarithms base 2 (Eq. 4)."))
register_metric(Metric("cls_dist", "CLS cos. distance", axis="CLS cos. dist.", important="high", group="importance",
                       compute=LEAVE_ONE_OUT, meaning="change of the CLS output",
                       formula=r"how much the attention block's output for the CLS token changes: $1 - \cos(z_l[0], z'_l[0])$, "
                               r"where $z_l$ is the block's attention output (after the output projection, before the "
                               "residual) (Eq. 5). It measures the head's effect on its own layer, before later layers can "
                               "compensate."))
register_metric(Metric("patch_dist", "patch cos. distance", axis="patch cos. dist.", important="high", group="importance",
                       compute=LEAVE_ONE_OUT, meaning="change of the patch outputs",
                       formula=r"the same cosine distance averaged over the $P$ patch tokens: "
                               r"$\frac{1}{P}\sum_{t} \big(1 - \cos(z_l[t], z'_l[t])\big)$ (Eq. 6)."))
register_metric(Metric("emb_dist", "embedding cos. dist.", axis="emb. cos. dist.", important="high", group="importance",
                       compute=LEAVE_ONE_OUT, meaning="change of the embedding",
                       formula=r"the cosine distance of the model's pooled output embedding with and without the head; the "
                               "model-level metric of backbones (self-supervised models such as DINOv2), where prob, "
                               "prob_drop and jsd do not exist."))
