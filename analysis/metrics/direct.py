"""Direct effects of the heads (SPEC "Beyond the paper (v3)": direct logit attribution).

The stream after the last block is the sum of block 0's input, every head's write ``c[l,h]``, every
block's bias write and every MLP's write. The read-out (final norm, pooling, fc norm, head) is made
affine by freezing each LayerNorm's 1/sigma at its value in the clean forward of the image (the
model family's ``frozen_readout``); its linear part ``F`` gives each piece's direct term:
``direct_logit[x,l,h] = F(c[l,h])[y]`` (logit units) or, for a backbone,
``direct_emb = <F(c[l,h]), e> / <e, e>`` (share of the pooled embedding ``e``, minus the constant).
``F(c)[y] = <u, c>`` with ``u = F^T w`` (w = one-hot of y, or e / <e, e>), taken once per image by
autograd through the frozen read-out, so a head's term only needs its output on the tokens the
read-out reads (the prefix tokens under token pooling).
``logit_drop`` (exact total effect, the head pruned in mode 1) is read off the leave-one-out of
analysis.metrics.importance on the same clean pass; ``indirect_logit = logit_drop - direct_logit``.

In a build the image stage's leave-one-out fills logit_drop and indirect_logit, this module's hook
direct_logit / direct_emb, all on the batch's one shared clean pass (``engine.Batch.trace``,
``engine.Batch.direct_terms``): no forward of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.metrics.common import arrays_to_frame, check_labels
from analysis.metrics.importance import LEAVE_ONE_OUT, Baseline, importance_arrays
from analysis.metrics.registry import Metric, OnBatch, register_metric
from analysis.models.adapter import ViT


@dataclass
class StreamTrace:
    """One clean forward of a batch. xs: L + 1 x [B, N, C] (xs[l] block l's input; xs[L] the stream
    after the last block, before the final norm); heads: L x [B, H, N, d] per-head outputs ``A V``;
    pooled [B, D]; logits [B, K] or None (backbone); received: L x [B, H, N] the attention each token
    gets from the patch queries, averaged over them (``A[:, :, T:, :].mean(-2)``: the attention sinks'
    prefix_share and high_norm_share are sums of it, analysis.metrics.sinks)."""
    xs: list[Tensor]
    heads: list[Tensor]
    pooled: Tensor
    logits: Tensor | None
    received: list[Tensor] = field(default_factory=list)

    def baseline(self) -> Baseline:
        """The leave-one-out's unpruned pass (analysis.metrics.importance.Baseline) from this trace."""
        logp = None if self.logits is None else torch.log_softmax(self.logits.double(), dim=-1)
        return Baseline(self.xs[:-1], self.pooled, logp, self.logits)


def trace_stream(vit: ViT, images: Tensor, on_attention: Callable[[int, Tensor], None] | None = None) -> StreamTrace:
    """Clean forward of preprocessed images [B, 3, H, W] keeping every block's input and per-head
    outputs; ``on_attention(layer, A [B, H, N, N])`` sees each post-softmax pattern."""
    x = vit.embed(images)
    xs, heads, received = [x], [], []
    T = vit.num_prefix_tokens

    def keep_heads(layer: int, o: Tensor) -> None:
        heads.append(o)

    def see(layer: int, A: Tensor) -> None:
        received.append(A[:, :, T:, :].mean(-2))
        if on_attention is not None:
            on_attention(layer, A)

    for layer in range(vit.depth):
        x = vit.block(layer, x, hook=see, head_hook=keep_heads)
        xs.append(x)
    pooled, logits = vit.outputs(x)
    return StreamTrace(xs, heads, pooled, logits, received)


def top1_labels(vit: ViT, trace: StreamTrace, labels) -> Tensor | None:
    """Labels as LongTensor [B]; each image's top-1 class where labels is None (classifier); None for a backbone."""
    if not vit.has_head:
        return None
    if labels is None:
        return trace.logits.argmax(dim=-1)
    return check_labels(vit, labels, trace.xs[0].shape[0])


def readout_direction(vit: ViT, trace: StreamTrace, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(u [B, N, C], constant [B], target [B]): the direct term of any stream piece p is
    ``<u, p>`` (summed over tokens and channels); ``target`` = logit_y (classifier) or 1 (backbone:
    the shares sum to one) equals ``<u, xs[L]> + constant``."""
    # outside inference mode (clones of the trace are ordinary tensors there), so that a caller in
    # inference mode (the build's hooks) gets the same answer
    with torch.inference_mode(False), torch.enable_grad():
        x = trace.xs[-1].clone()
        readout = vit.frozen_readout(x)
        zero = torch.zeros_like(x)[:, None].requires_grad_()                    # [B, 1, N, C]
        pooled0, logits0 = readout(zero)                                        # the read-out's constant
        if labels is not None:
            out = logits0[:, 0]
            w = torch.zeros_like(out).scatter_(1, labels.clone()[:, None], 1.0)
            target = trace.logits.clone().gather(1, labels.clone()[:, None])[:, 0]
        else:
            out = pooled0[:, 0]
            e = trace.pooled.clone() - out.detach()
            w = e / (e * e).sum(-1, keepdim=True)
            target = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        (u,) = torch.autograd.grad(out, zero, grad_outputs=w)
    constant = (out.detach() * w).sum(-1)
    return u[:, 0].detach(), constant, target


def read_tokens(u: Tensor) -> int:
    """How many leading tokens the read-out direction u [B, N, C] touches (tokens after are 0)."""
    used = (u != 0).flatten(2).any(-1).any(0).nonzero()
    return int(used.max()) + 1 if used.numel() else 1


def direct_pieces(vit: ViT, trace: StreamTrace, labels: Tensor | None) -> dict[str, Tensor]:
    """Direct terms of every stream piece, float64: "heads" [B, L, H], "bias" [B, L] (ls1 * b_O),
    "mlp" [B, L] (what each block's MLP half writes: the block's change minus its attention
    writes), "embed" [B] (block 0's input), "constant" [B] (the read-out's constant; 0 share for a
    backbone) and "target" [B]. Sum of all pieces + constant = target (logit_y, or 1 for a backbone)."""
    u, constant, target = readout_direction(vit, trace, labels)
    n = read_tokens(u)
    ud = u.double()
    B, L, H = u.shape[0], vit.depth, vit.num_heads
    heads = torch.zeros(B, L, H, dtype=torch.float64, device=u.device)
    bias = torch.zeros(B, L, dtype=torch.float64, device=u.device)
    stream = torch.stack([(ud * x.double()).sum((1, 2)) for x in trace.xs], dim=1)   # [B, L + 1]
    for layer in range(L):
        ctx = vit.attention_context(layer, trace.xs[layer], n)
        c, b = vit.head_writes(layer, trace.heads[layer][:, :, :n], ctx)          # [B, H, n, C], [C]
        heads[:, layer] = torch.einsum("bhnc,bnc->bh", c.double(), ud[:, :n])
        bias[:, layer] = ud[:, :n].sum(1) @ b.double()
    mlp = stream[:, 1:] - stream[:, :-1] - heads.sum(-1) - bias
    return {"heads": heads, "bias": bias, "mlp": mlp, "embed": stream[:, 0], "constant": constant.double(),
            "target": target.double()}


@torch.no_grad()
def direct_arrays(vit: ViT, images: Tensor, labels=None, total: bool = True,
                  on_attention: Callable[[int, Tensor], None] | None = None) -> dict[str, np.ndarray]:
    """Direct effects of a batch as {name: [B, L, H] float64}: direct_logit (+ logit_drop and
    indirect_logit when ``total``) for a classifier, direct_emb for a backbone. images [B, 3, H, W]
    preprocessed; labels [B] or None (each image's top-1 class)."""
    trace = trace_stream(vit, vit.check_images(images), on_attention)
    y = top1_labels(vit, trace, labels)
    direct = direct_pieces(vit, trace, y)["heads"]
    if y is None:
        return {"direct_emb": direct.cpu().numpy()}
    out = {"direct_logit": direct.cpu().numpy()}
    if total:
        drop = importance_arrays(vit, images, y, base=trace.baseline(), logit_drop=True)[0]["logit_drop"]
        out["logit_drop"] = drop
        out["indirect_logit"] = drop - out["direct_logit"]
    return out


def direct_effects(vit: ViT, images: Tensor, labels=None, batch_size: int = 16) -> pd.DataFrame:
    """Direct and total effect of every head on every image (SPEC "Direct effect").

    images: preprocessed float [B, 3, H, W]; labels: [B] (None on a classifier = each image's
    top-1 class; ignored for a backbone). One row per (image, layer, head), image = 0..B-1:
    classifier: direct_logit (F(c[l,h])[y], logit units, norm scales frozen), logit_drop (exact:
    logit_y minus logit_y with the head pruned), indirect_logit (= logit_drop - direct_logit);
    backbone: direct_emb (share of the pooled embedding the head writes directly; all pieces sum to 1).
    """
    images = vit.check_images(images)
    B = images.shape[0]
    if labels is not None and vit.has_head:
        labels = check_labels(vit, labels, B)
    frames = []
    for s in range(0, B, batch_size):
        lab = None if labels is None or not vit.has_head else labels[s:s + batch_size]
        frames.append(arrays_to_frame(direct_arrays(vit, images[s:s + batch_size], lab), offset=s))
    return pd.concat(frames, ignore_index=True)


# ---- the metrics this module computes, declared with the registry (analysis.metrics.registry) ----

def direct_hook(vit, images, labels, batch):
    """direct_logit (direct_emb for a backbone) on the batch's shared clean pass; logit_drop and
    indirect_logit come with the leave-one-out (analysis.metrics.importance), which runs the pruned
    forwards anyway (and which --taylor-only leaves out)."""
    return {"direct_logit" if vit.has_head else "direct_emb": batch.direct_terms()}


DIRECT = OnBatch(direct_hook)
# important="high" for all four: like prob_drop they are signed effects on the true class (on the
# embedding for a backbone), so a ranking by them puts first the heads that support the prediction
# most (directly, in total, or through later heads); negative values are heads working against it.
_FROZEN = (r" **Frozen norm scale**: every LayerNorm of the read-out keeps its $1/\sigma$ from the clean forward of "
           r"the image (centring and $\gamma$ stay; $\beta$ and the biases go to a constant), which makes the read-out "
           r"affine with linear part $F$; the direct terms of all stream pieces (embedding, heads, output biases, MLPs) "
           r"plus that constant then add up exactly. It misleads when removing the head would change $\sigma$ a lot: "
           r"that effect is counted as indirect.")
_WRITE = r"$c_{l,h} = \mathrm{ls}_1 \odot (o_{l,h} W_O[h])$, what head $(l,h)$ writes into the residual stream"
register_metric(Metric("direct_logit", "direct logit", unit="logit", axis="direct logit(true)", important="high",
                       group="direct", applies_to={"classifier"}, needs_label=True, compute=DIRECT,
                       meaning="logit of the true class the head writes directly",
                       formula=rf"$F(c_{{l,h}})[y]$ with {_WRITE}: the part of $\mathrm{{logit}}_y$ the head writes "
                               r"itself, not through later blocks (direct logit attribution; $y$ = the true class). "
                               "Positive: the head pushes the true class directly." + _FROZEN))
register_metric(Metric("logit_drop", "drop of logit(true)", unit="logit", axis="Δlogit(true)", important="high",
                       group="direct", applies_to={"classifier"}, needs_label=True, compute=LEAVE_ONE_OUT,
                       meaning="drop of the true class's logit (total effect)",
                       formula=r"$\mathrm{logit}_y(x) - \mathrm{logit}_y(x \text{ with the head pruned})$, pruning mode 1 "
                               "(the head's whole attention zeroed): the head's total effect in the units of direct_logit, "
                               "exact (read off the leave-one-out's pruned forwards). Unlike prob_drop it does not "
                               "saturate when $P_y$ is near 1."))
register_metric(Metric("indirect_logit", "indirect logit", unit="logit", axis="indirect logit(true)", important="high",
                       group="direct", applies_to={"classifier"}, needs_label=True, compute=LEAVE_ONE_OUT,
                       meaning="logit of the true class the head moves through later blocks",
                       formula="logit_drop $-$ direct_logit: what the head does through the blocks after it (their "
                               r"attention and MLPs read what it wrote) and through the norms' scale $\sigma$, which "
                               "direct_logit holds fixed. A large indirect and a small direct effect: the head acts "
                               "through later heads; direct and indirect of opposite sign: they cancel."))
register_metric(Metric("direct_emb", "direct embedding share", axis="direct emb. share", important="high",
                       group="direct", applies_to={"backbone"}, compute=DIRECT,
                       meaning="share of the embedding the head writes directly",
                       formula=rf"$\langle F(c_{{l,h}}), e\rangle / \langle e, e\rangle$ with {_WRITE} and $e$ the pooled "
                               "embedding minus the read-out's constant: the share of the embedding the head writes "
                               "itself (the shares of all stream pieces sum to 1; backbones, which have no logits)."
                               + _FROZEN))
