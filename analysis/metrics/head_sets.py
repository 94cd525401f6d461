"""Several heads at once (SPEC "Several heads at once"): head sets, pair interactions and
cumulative pruning curves.

A head set ``S`` is a list of ``(layer, head)`` or ``(layer, head, regions)``; all of it is pruned
in one forward (zero ablation, regions as in SPEC "Pruning"; whole head by default). Every forward
starts from the unpruned block input of the first block the set touches (the blocks before it are
unchanged); the sets of one query run block by block, those active in a block batched in groups
of about SEQUENCE_TOKENS tokens. A pair (a, b) of heads in different blocks continues the forward of
the earlier single head from the later head's block. Curves zero whole heads through head gates.
Every number equals a full forward with the set pruned (tests/test_head_sets.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.errors import InputError, LabelError
from analysis.metrics.common import check_labels
from analysis.metrics.importance import SEQUENCE_TOKENS, cosine_distance, jensen_shannon_bits, run_baseline
from analysis.models.adapter import ViT
from analysis.models.pruning import MODE_LABELS, MODES, keep_mask, parse_regions

MAX_SET_HEADS = 64      # heads in one set
MAX_PAIR_HEADS = 16     # heads whose pairs are compared (16 heads: 120 pairs)
SET_METRICS = ("prob", "prob_drop", "jsd", "emb_dist")
PAIR_METRICS = ("prob_drop", "emb_dist")

HeadSpec = tuple  # (layer, head) or (layer, head, regions)


def parse_head_set(vit: ViT, heads: Iterable[HeadSpec], limit: int = MAX_SET_HEADS) -> list[tuple[int, int, frozenset]]:
    """Validate a head set -> [(layer, head, regions frozenset)]; regions default to the whole head."""
    out = []
    for item in heads if heads is not None else []:
        item = tuple(item) if isinstance(item, (list, tuple)) else (item,)
        if len(item) not in (2, 3):
            raise InputError(f"A head is (layer, head) or (layer, head, regions); got {item!r}.")
        layer, head = int(item[0]), int(item[1])
        if not (0 <= layer < vit.depth and 0 <= head < vit.num_heads):
            raise InputError(f"Head ({layer}, {head}) does not exist: {vit.name} has layers 0-{vit.depth - 1} "
                             f"and heads 0-{vit.num_heads - 1}.")
        out.append((layer, head, parse_regions(item[2]) if len(item) == 3 else MODES[1]))
    if not out:
        raise InputError("The head set is empty: name at least one (layer, head).")
    if len(out) > limit:
        raise InputError(f"The head set has {len(out)} heads; at most {limit} are allowed at once. "
                         "Use pruning_curve() to prune more heads cumulatively.")
    return out


def _one_image(vit: ViT, image: Tensor, label) -> tuple[Tensor, Tensor | None]:
    if isinstance(image, Tensor) and image.ndim == 3:
        image = image[None]
    images = vit.check_images(image)
    if images.shape[0] != 1:
        raise InputError(f"Expected one image [3, H, W]; got a batch of {images.shape[0]}.")
    return images, check_labels(vit, None if label is None else [label], 1)


@dataclass
class _Sequence:
    """One pruned forward of the image: starts at block ``start`` from block input x [N, C], with
    keep masks {layer: [H, N, N]} (layers >= start)."""
    start: int
    x: Tensor
    masks: dict


def _head_masks(vit: ViT, heads: Sequence[tuple[int, int, frozenset]]) -> dict[int, Tensor]:
    """{layer: keep mask [H, N, N]} of a parsed head set."""
    T, N, H = vit.num_prefix_tokens, vit.num_tokens, vit.num_heads
    masks: dict[int, Tensor] = {}
    for layer, head, regions in heads:
        if layer not in masks:
            masks[layer] = torch.ones(H, N, N, device=vit.device)
        masks[layer][head] *= keep_mask(regions, N, T, device=vit.device)
    return masks


def _run(vit: ViT, seqs: Sequence[_Sequence], record: bool = False):
    """Run all sequences block by block, the active ones of each block batched in groups of about
    SEQUENCE_TOKENS tokens -> (pooled [S, D], logits [S, C] or None, inputs): with record,
    inputs[i][layer] is sequence i's input of every block from its start on."""
    T, N, H, L = vit.num_prefix_tokens, vit.num_tokens, vit.num_heads, vit.depth
    state = [s.x for s in seqs]
    inputs = [{} for _ in seqs] if record else None
    per_group = max(1, SEQUENCE_TOKENS // N)
    for layer in range(min(s.start for s in seqs), L):
        active = [i for i, s in enumerate(seqs) if s.start <= layer]
        n_query = T if (layer == L - 1 and vit.pool_reads_prefix_only) else None
        for g in range(0, len(active), per_group):
            group = active[g:g + per_group]
            hook = None
            if any(layer in seqs[i].masks for i in group):
                M = torch.ones(len(group), H, N, N, device=vit.device)
                for j, i in enumerate(group):
                    if layer in seqs[i].masks:
                        M[j] = seqs[i].masks[layer]
                hook = lambda _, A, M=M: A * M[:, :, :A.shape[-2]]
            if record:
                for i in group:
                    inputs[i][layer] = state[i]
            out = vit.block(layer, torch.stack([state[i] for i in group]), hook, n_query)
            for j, i in enumerate(group):
                state[i] = out[j]
    pooled, logits = vit.outputs(torch.stack(state))
    return pooled, logits, inputs


def _frame(vit: ViT, base, labels: Tensor | None, pooled: Tensor, logits: Tensor | None, top: int) -> pd.DataFrame:
    """Rows prob, prob_drop, jsd, emb_dist, top5_classes, top5_probs of pruned outputs [S, ...]."""
    S = pooled.shape[0]
    df = pd.DataFrame({"emb_dist": cosine_distance(base.pooled, pooled).cpu().numpy()})
    df["prob"] = df["prob_drop"] = df["jsd"] = np.nan
    df["top5_classes"] = [[] for _ in range(S)]
    df["top5_probs"] = [[] for _ in range(S)]
    if base.logp is not None:
        logq = torch.log_softmax(logits.double(), dim=-1)        # [S, C]
        df["jsd"] = jensen_shannon_bits(base.logp, logq).cpu().numpy()
        if labels is not None:
            q = logq[:, labels[0]].exp()
            df["prob"] = q.cpu().numpy()
            df["prob_drop"] = (base.logp[0, labels[0]].exp() - q).cpu().numpy()
        pr, cl = logq.exp().topk(min(top, vit.num_classes), dim=-1)
        df["top5_classes"] = cl.cpu().tolist()
        df["top5_probs"] = pr.float().cpu().tolist()
    return df[["prob", "prob_drop", "jsd", "emb_dist", "top5_classes", "top5_probs"]]


@torch.inference_mode()
def set_metrics(vit: ViT, image: Tensor, label: int | None, sets: Sequence[Iterable[HeadSpec]],
                top: int = 5) -> pd.DataFrame:
    """Metrics of one image with each head set pruned (all of a set at once).

    image [3, H, W] preprocessed; label: true class (None for a backbone or when unknown).
    Returns one row per set, in order: prob, prob_drop, jsd (bits), emb_dist, top5_classes,
    top5_probs (prob/prob_drop need a label; prob/prob_drop/jsd/top-5 are NaN / empty for a backbone).
    """
    images, labels = _one_image(vit, image, label)
    parsed = [parse_head_set(vit, s) for s in sets]
    base = run_baseline(vit, images)
    seqs = []
    for heads in parsed:
        start = min(l for l, _, _ in heads)
        seqs.append(_Sequence(start, base.xs[start][0], _head_masks(vit, heads)))
    pooled, logits, _ = _run(vit, seqs)
    return _frame(vit, base, labels, pooled, logits, top)


def set_pruning(vit: ViT, image: Tensor, label: int | None, heads: Iterable[HeadSpec], top: int = 5) -> dict:
    """One image with the head set ``heads`` pruned at once -> dict: heads [(layer, head, regions
    label)], prob, prob_drop, jsd (bits), emb_dist, top5_classes, top5_probs (see set_metrics)."""
    parsed = parse_head_set(vit, heads)
    row = set_metrics(vit, image, label, [parsed], top=top).iloc[0]
    out = {"heads": [[l, h, MODE_LABELS[MODES.index(r)]] for l, h, r in parsed]}
    out.update({m: float(row[m]) for m in SET_METRICS})
    out["top5_classes"], out["top5_probs"] = list(row.top5_classes), list(row.top5_probs)
    return out


def pair_interactions(vit: ViT, image: Tensor, label: int | None, heads: Sequence[HeadSpec],
                      metric: str = "prob_drop") -> pd.DataFrame:
    """SPEC pair interaction ``m({a,b}) - m({a}) - m({b})`` of every pair of the given heads.

    heads: 2..16 distinct heads (layer, head) (or (layer, head, regions)); metric: "prob_drop"
    (classifier, needs the label) or "emb_dist". All singles and pairs run in one batched call.
    Returns one row per pair (a before b in the given order): a_layer, a_head, b_layer, b_head,
    single_a, single_b, pair, interaction.
    """
    if metric not in PAIR_METRICS:
        raise InputError(f"Unknown interaction metric {metric!r}: use one of {', '.join(PAIR_METRICS)}.")
    if metric == "prob_drop" and not vit.has_head:
        raise InputError(f"prob_drop is undefined for the backbone {vit.name}: use metric='emb_dist'.")
    if metric == "prob_drop" and label is None:
        raise LabelError("prob_drop interactions need the image's true label; pass label= or use metric='emb_dist'.")
    parsed = parse_head_set(vit, heads, limit=MAX_PAIR_HEADS)
    if len(parsed) < 2:
        raise InputError("Pair interactions need at least two heads.")
    if len({(l, h) for l, h, _ in parsed}) < len(parsed):
        raise InputError("The heads of a pair interaction must be distinct; a head is listed twice.")
    k = len(parsed)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    single, pair = _pair_values(vit, image, label, parsed, pairs, metric)
    rows = [{"a_layer": parsed[i][0], "a_head": parsed[i][1], "b_layer": parsed[j][0], "b_head": parsed[j][1],
             "single_a": single[i], "single_b": single[j], "pair": pair[p],
             "interaction": pair[p] - single[i] - single[j]} for p, (i, j) in enumerate(pairs)]
    return pd.DataFrame(rows)


@torch.inference_mode()
def _pair_values(vit: ViT, image: Tensor, label, parsed, pairs, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """metric of each single head and each pair. A pair (a, b) with a in an earlier block than b
    starts at b's block from single a's input there (the blocks before b are a's forward)."""
    images, labels = _one_image(vit, image, label)
    base = run_baseline(vit, images)
    masks = [_head_masks(vit, [h]) for h in parsed]
    singles = [_Sequence(h[0], base.xs[h[0]][0], m) for h, m in zip(parsed, masks)]
    p1, lg1, inputs = _run(vit, singles, record=True)
    seqs = []
    for i, j in pairs:
        e, f = sorted((i, j), key=lambda t: parsed[t][0])
        le, lf = parsed[e][0], parsed[f][0]
        if le == lf:
            seqs.append(_Sequence(le, base.xs[le][0], _head_masks(vit, [parsed[e], parsed[f]])))
        else:
            seqs.append(_Sequence(lf, inputs[e][lf], masks[f]))
    p2, lg2, _ = _run(vit, seqs)
    logits = None if lg1 is None else torch.cat([lg1, lg2])
    values = _frame(vit, base, labels, torch.cat([p1, p2]), logits, top=1)[metric].to_numpy()
    return values[:len(parsed)], values[len(parsed):]


# ---- cumulative pruning curves -------------------------------------------------------------

def order_by(values) -> list[tuple[int, int]]:
    """Heads sorted by ascending value (least important first); ties keep (layer, head) order.
    values: [L, H] array of per-head run means."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or np.isnan(values).any():
        raise InputError("An order needs one finite value per head, an [L, H] array without NaN.")
    H = values.shape[1]
    return [(int(i) // H, int(i) % H) for i in np.argsort(values.ravel(), kind="stable")]


def run_means(df: pd.DataFrame, column: str, L: int, H: int) -> np.ndarray:
    """[L, H] mean of ``column`` over images of a long (image, layer, head, ...) DataFrame."""
    if column not in df:
        raise InputError(f"The importance table has no column {column!r}.")
    m = df.groupby(["layer", "head"])[column].mean()
    out = np.full((L, H), np.nan)
    out[m.index.get_level_values(0), m.index.get_level_values(1)] = m.to_numpy()
    return out


def exact_order(importance: pd.DataFrame, L: int, H: int) -> list[tuple[int, int]]:
    """SPEC "exact" order: ascending run mean of prob_drop (emb_dist for a backbone)."""
    col = "prob_drop" if "prob_drop" in importance and importance["prob_drop"].notna().any() else "emb_dist"
    return order_by(run_means(importance, col, L, H))


def taylor_order(taylor: pd.DataFrame, L: int, H: int) -> list[tuple[int, int]]:
    """SPEC "taylor" order: ascending run mean of grad_score."""
    return order_by(run_means(taylor, "grad_score", L, H))


def random_order(L: int, H: int, seed: int) -> list[tuple[int, int]]:
    """SPEC "random" order: a seeded permutation of the L*H heads."""
    return [(int(i) // H, int(i) % H) for i in np.random.default_rng(seed).permutation(L * H)]


def default_steps(total: int, points: int = 13) -> list[int]:
    """About ``points`` evenly spaced k from 0 to total (both included)."""
    return sorted({int(round(k)) for k in np.linspace(0, total, points)})


def _check_order(vit: ViT, order: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    heads = [(int(l), int(h)) for l, h, *_ in order]
    for l, h in heads:
        if not (0 <= l < vit.depth and 0 <= h < vit.num_heads):
            raise InputError(f"Head ({l}, {h}) of the order does not exist: layers 0-{vit.depth - 1}, "
                             f"heads 0-{vit.num_heads - 1}.")
    if len(set(heads)) < len(heads):
        raise InputError("The pruning order lists a head twice; give each head at most once.")
    if not heads:
        raise InputError("The pruning order is empty: give the heads, least important first.")
    return heads


@torch.inference_mode()
def pruning_curves(vit: ViT, images: Tensor, labels, orders: dict[str, Sequence[tuple[int, int]]],
                   steps: Sequence[int] | None = None, batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
    """Cumulative pruning curves of several orders over the same images (SPEC).

    For each order and each k in steps (default: default_steps(L*H)), the first k heads of the
    order are pruned (whole heads, zero ablation) in one forward. Identical sets (k = 0, k = L*H)
    run once. Returns rows order, k, accuracy, mean_prob (classifier; labels required) or
    order, k, mean_emb_dist (backbone).
    """
    images = vit.check_images(images)
    B, LH = images.shape[0], vit.depth * vit.num_heads
    if vit.has_head and labels is None:
        raise LabelError("Pruning curves of a classifier need the images' true labels (accuracy and P(y)); "
                         "pass labels, or build the run from a labelled data set.")
    labels = check_labels(vit, labels, B)
    orders = {name: _check_order(vit, o) for name, o in orders.items()}
    steps = default_steps(LH) if steps is None else sorted({int(k) for k in steps})
    for name, o in orders.items():
        if steps[0] < 0 or steps[-1] > len(o):
            raise InputError(f"Steps must lie in 0..{len(o)} (the length of order {name!r}); got {steps[0]}..{steps[-1]}.")
    sets = {frozenset(o[:k]) for o in orders.values() for k in steps}
    sets = sorted(sets, key=lambda s: (len(s), sorted(s)))
    sums = {s: np.zeros(2) for s in sets}     # (correct or emb_dist, P'(y)) summed over images
    batches = range(0, B, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="pruning curves", unit="batch")
    for s0 in batches:
        x = images[s0:s0 + batch_size]
        lab = None if labels is None else labels[s0:s0 + batch_size]
        base = run_baseline(vit, x)
        for heads in sets:
            sums[heads] += _curve_point(vit, base, lab, heads)
    rows = []
    for name, o in orders.items():
        for k in steps:
            a, b = sums[frozenset(o[:k])] / B
            rows.append({"order": name, "k": k, "accuracy": a, "mean_prob": b} if vit.has_head
                        else {"order": name, "k": k, "mean_emb_dist": a})
    return pd.DataFrame(rows)


def _curve_point(vit: ViT, base, labels: Tensor | None, heads: frozenset) -> np.ndarray:
    """Sums over a batch with ``heads`` zeroed: (correct, P'(y)) or (emb_dist, 0)."""
    if heads:
        gates = torch.ones(vit.depth, vit.num_heads, device=vit.device)
        for l, h in heads:
            gates[l, h] = 0
        start = min(l for l, _ in heads)

        def hook(layer: int, o: Tensor) -> Tensor:
            return o * gates[layer][:, None, None]

        pooled, logits = vit.outputs(vit.blocks(base.xs[start], start=start, head_hook=hook,
                                                prefix_only_last=vit.pool_reads_prefix_only))
        logq = None if logits is None else torch.log_softmax(logits.double(), dim=-1)
    else:
        pooled, logq = base.pooled, base.logp
    if logq is None:
        return np.array([cosine_distance(base.pooled, pooled).sum().item(), 0.0])
    correct = (logq.argmax(-1) == labels).sum().item()
    return np.array([correct, logq.gather(1, labels[:, None]).exp().sum().item()])


def pruning_curve(vit: ViT, images: Tensor, labels, order: Sequence[tuple[int, int]],
                  steps: Sequence[int] | None = None, batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
    """Cumulative pruning curve of one order (least important head first).

    Returns one row per k: k, accuracy, mean_prob (classifier; labels required) or k,
    mean_emb_dist (backbone). See pruning_curves.
    """
    return pruning_curves(vit, images, labels, {"order": order}, steps, batch_size, progress).drop(columns="order")


def curve_area(curve: pd.DataFrame, column: str, total: int) -> float:
    """Area under a curve with k normalised to [0, 1] by total = L*H (trapezoids over its steps)."""
    c = curve.sort_values("k")
    return float(np.trapezoid(c[column].to_numpy(), c["k"].to_numpy() / total))


def heads_before_drop(curve: pd.DataFrame, column: str = "accuracy", drop: float = 0.01) -> int:
    """Largest k of the grid such that ``column`` stays >= its k = 0 value - drop at every k' <= k
    (with drop = 0.01 for accuracy: "how many heads can go before accuracy drops by 1 point")."""
    c = curve.sort_values("k")
    ok = (c[column].to_numpy() >= c[column].iloc[0] - drop).cumprod().astype(bool)
    return int(c["k"].to_numpy()[ok][-1])
