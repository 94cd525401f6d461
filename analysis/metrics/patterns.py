"""Attention patterns (SPEC "Attention patterns" and "Attention pattern labels").

``cls_vector`` gives the CLS-related attention of a head; ``binarize_topq`` its patch->patch
attention with the top ``q`` fraction of values set to 1. Binary matrices are stored bit-packed
(``np.packbits`` over the row-major flattened ``P x P`` matrix: ``ceil(P*P/8)`` bytes per head).

Pattern labels: ``pattern_scores`` scores one binarised matrix (diagonal with its offset,
horizontal, vertical, block, and the resulting ``pattern`` label); ``pattern_arrays`` does the same
for bit-packed arrays of any shape; ``consistency`` is the per-head mean Jaccard index over image
pairs (run level).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from analysis.errors import InputError
from analysis.metrics.registry import Metric, OnAttention, OnRun, register_metric


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


# ---- pattern labels (SPEC "Attention pattern labels") ---------------------------------------
# Offsets (dr, dc) = (r_v - r_u, c_v - c_u) of an entry u -> v, rows counted downwards. Ties of
# diagonal_offset go to the first name in this order; ties among the four scores to the first of
# PATTERN_SCORES.
OFFSETS = {"self": (0, 0), "right": (0, 1), "left": (0, -1), "below": (1, 0), "above": (-1, 0),
           "above-left": (-1, -1), "above-right": (-1, 1), "below-left": (1, -1), "below-right": (1, 1)}
OFFSET_NAMES = tuple(OFFSETS)
PATTERN_SCORES = ("diagonal", "horizontal", "vertical", "block")
PATTERN_LABELS = tuple(f"diagonal:{o}" for o in OFFSET_NAMES) + ("horizontal", "vertical", "block", "mixed")
PATTERN_THRESHOLD = 0.5
# The registry metrics of this module (image x head scores and labels, then the run-level consistency).
PATTERN_METRICS = ("diagonal", "diagonal_offset", "horizontal", "vertical", "block", "pattern", "consistency")
CONSISTENCY_ALL_PAIRS = 2000  # up to this many image pairs: all of them; beyond, this many seeded pairs


def vertical_targets(num_patches: int) -> int:
    """ceil(0.1 P): how many most-attended targets the vertical score counts (integer arithmetic)."""
    return -(-num_patches // 10)


def _check_grid(grid, num_patches: int | None = None) -> tuple[int, int]:
    try:
        gh, gw = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise InputError(f"grid must be (gh, gw), two positive integers; got {grid!r}.") from None
    if gh < 1 or gw < 1 or (num_patches is not None and gh * gw != num_patches):
        raise InputError(f"grid {grid!r} does not fit {num_patches} patches: pass the model's (gh, gw) "
                         "patch grid (vit.grid), whose product is P.")
    return gh, gw


def pattern_label(scores: dict) -> str:
    """'diagonal:<offset>', 'horizontal', 'vertical' or 'block' when the largest of the four scores
    is at least PATTERN_THRESHOLD, else 'mixed'."""
    name = max(PATTERN_SCORES, key=lambda s: scores[s])  # max keeps the first of equal scores
    if scores[name] < PATTERN_THRESHOLD:
        return "mixed"
    return f"diagonal:{scores['diagonal_offset']}" if name == "diagonal" else name


def pattern_scores(E, grid) -> dict:
    """Pattern scores of one binarised patch matrix (SPEC "Attention pattern labels").

    E: bool [P, P] (row = source patch u, column = target v, patches row-major on the grid);
    grid: (gh, gw) with gh * gw = P. Returns {"diagonal": float, "diagonal_offset": one of
    OFFSET_NAMES, "horizontal", "vertical", "block": floats in [0, 1] (fractions of E),
    "pattern": one of PATTERN_LABELS}.
    """
    E = np.asarray(E)
    if E.ndim != 2 or E.shape[0] != E.shape[1]:
        raise InputError(f"E must be a square [P, P] patch matrix; got shape {E.shape}.")
    gh, gw = _check_grid(grid, E.shape[0])
    sources, targets = np.nonzero(E.astype(bool))
    n = len(sources)
    if n == 0:
        raise InputError("E has no entries: pass the binarised patch matrix (binarize_topq keeps at least one).")
    dr = targets // gw - sources // gw
    dc = targets % gw - sources % gw
    shares = {name: np.count_nonzero((dr == r) & (dc == c)) / n for name, (r, c) in OFFSETS.items()}
    offset = max(OFFSET_NAMES, key=lambda o: shares[o])
    column_counts = np.sort(np.bincount(targets, minlength=E.shape[0]))[::-1]
    mutual = (sources != targets) & E[targets, sources].astype(bool)
    scores = {"diagonal": shares[offset], "diagonal_offset": offset,
              "horizontal": np.count_nonzero((dr == 0) & (np.abs(dc) >= 2)) / n,
              "vertical": column_counts[:vertical_targets(E.shape[0])].sum() / n,
              "block": np.count_nonzero(mutual) / n}
    scores = {k: (float(v) if k != "diagonal_offset" else v) for k, v in scores.items()}
    scores["pattern"] = pattern_label(scores)
    return scores


def _entry_classes(grid: tuple[int, int]) -> np.ndarray:
    """int [P*P] class of each flat entry u*P + v: 0-8 its OFFSETS position, 9 horizontal, 10 other."""
    gh, gw = grid
    P = gh * gw
    r, c = np.divmod(np.arange(P), gw)
    dr, dc = r[None, :] - r[:, None], c[None, :] - c[:, None]
    classes = np.full((P, P), 10, np.int64)
    classes[(dr == 0) & (np.abs(dc) >= 2)] = 9
    for k, (or_, oc) in enumerate(OFFSETS.values()):
        classes[(dr == or_) & (dc == oc)] = k
    return classes.reshape(-1)


def pattern_arrays(packed: np.ndarray, grid, chunk: int = 1024) -> dict[str, np.ndarray]:
    """``pattern_scores`` for many bit-packed matrices at once.

    packed: uint8 [..., ceil(P*P/8)] from ``pack_bits`` (e.g. patch_bits [B, L, H, bytes]).
    Returns {"diagonal", "horizontal", "vertical", "block": float32 [...], "diagonal_offset",
    "pattern": str arrays [...]} equal to ``pattern_scores`` of each matrix.
    """
    gh, gw = _check_grid(grid)
    P = gh * gw
    packed = np.asarray(packed, np.uint8)
    if packed.ndim < 1 or packed.shape[-1] != -(-P * P // 8):
        raise InputError(f"packed patch bits must end in {-(-P * P // 8)} bytes for a {gh}x{gw} grid "
                         f"(ceil(P*P/8)); got shape {packed.shape}.")
    lead = packed.shape[:-1]
    flat = packed.reshape(-1, packed.shape[-1])
    M, k_top = len(flat), vertical_targets(P)
    classes = _entry_classes((gh, gw))
    transpose = np.arange(P * P).reshape(P, P).T.reshape(-1)  # flat index of v -> u for u -> v
    counts = np.zeros((M, 11), np.int64)
    top_targets, mutual = np.zeros(M, np.int64), np.zeros(M, np.int64)
    for s in range(0, M, chunk):
        bits = np.unpackbits(flat[s:s + chunk], axis=-1, count=P * P)
        m, f = np.nonzero(bits)
        mm = len(bits)
        counts[s:s + mm] = np.bincount(m * 11 + classes[f], minlength=mm * 11).reshape(mm, 11)
        columns = np.bincount(m * P + f % P, minlength=mm * P).reshape(mm, P)
        top_targets[s:s + mm] = -np.partition(-columns, k_top - 1, axis=1)[:, :k_top].sum(axis=1)
        reverse = bits[m, transpose[f]].astype(bool) & (classes[f] != 0)
        mutual[s:s + mm] = np.bincount(m[reverse], minlength=mm)
    n = counts.sum(axis=1)
    if (n == 0).any():
        raise InputError(f"{int((n == 0).sum())} packed patch matrices have no entries: pass binarised "
                         "matrices (binarize_topq keeps at least one entry).")
    shares = counts[:, :9] / n[:, None]
    offset_idx = shares.argmax(axis=1)  # first maximum: OFFSETS order, as pattern_scores
    scores = {"diagonal": shares[np.arange(M), offset_idx], "horizontal": counts[:, 9] / n,
              "vertical": top_targets / n, "block": mutual / n}
    stacked = np.stack([scores[s] for s in PATTERN_SCORES], axis=1)
    best = stacked.argmax(axis=1)
    label_idx = np.where(best == 0, offset_idx, len(OFFSET_NAMES) - 1 + best)
    label_idx = np.where(stacked[np.arange(M), best] >= PATTERN_THRESHOLD, label_idx, len(PATTERN_LABELS) - 1)
    out = {k: v.astype(np.float32).reshape(lead) for k, v in scores.items()}
    out["diagonal_offset"] = np.asarray(OFFSET_NAMES)[offset_idx].reshape(lead)  # fixed-width str: saved
    out["pattern"] = np.asarray(PATTERN_LABELS)[label_idx].reshape(lead)          # in parts without pickle
    return out


def image_pairs(n: int, seed: int = 0, max_pairs: int = CONSISTENCY_ALL_PAIRS) -> np.ndarray:
    """int [n_pairs, 2] image pairs (i < j): all n(n-1)/2 when that is at most ``max_pairs``, else
    ``max_pairs`` distinct pairs drawn with ``seed``."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return np.stack(np.triu_indices(n, 1), axis=1)
    k = np.sort(np.random.default_rng(seed).choice(total, size=max_pairs, replace=False))
    # row i of the upper triangle starts at i*n - i(i+1)/2; invert, then fix float rounding
    i = np.floor((2 * n - 1 - np.sqrt((2 * n - 1) ** 2 - 8.0 * k)) / 2).astype(np.int64)
    start = lambda i: i * n - i * (i + 1) // 2
    i = np.where(start(i) > k, i - 1, i)
    i = np.where(start(i + 1) <= k, i + 1, i)
    return np.stack([i, k - start(i) + i + 1], axis=1)


def consistency(packed: np.ndarray, seed: int = 0, max_pairs: int = CONSISTENCY_ALL_PAIRS,
                chunk: int = 64) -> np.ndarray:
    """Per-head mean Jaccard index |E_x & E_x'| / |E_x | E_x'| over image pairs (SPEC ``consistency``).

    packed: uint8 [n_images, ..., bytes] (e.g. patch_bits [n, L, H, bytes]); pairs from
    ``image_pairs(n, seed, max_pairs)``. Returns float64 [...] (e.g. [L, H]); NaN with fewer than 2
    images; a pair of two empty matrices counts as Jaccard 1.
    """
    packed = np.asarray(packed, np.uint8)
    if packed.ndim < 2:
        raise InputError(f"packed patch bits must be [n_images, ..., bytes]; got shape {packed.shape}.")
    n, lead = packed.shape[0], packed.shape[1:-1]
    if n < 2:
        return np.full(lead, np.nan)
    words = packed.reshape(n, -1, packed.shape[-1])
    if words.shape[-1] % 8 == 0:  # popcount on 64-bit words: 8x fewer operations
        words = np.ascontiguousarray(words).view(np.uint64)
    sizes = np.bitwise_count(words).sum(axis=-1, dtype=np.int64)  # [n, heads]
    pairs = image_pairs(n, seed, max_pairs)
    total = np.zeros(words.shape[1])
    for s in range(0, len(pairs), chunk):
        i, j = pairs[s:s + chunk, 0], pairs[s:s + chunk, 1]
        inter = np.bitwise_count(words[i] & words[j]).sum(axis=-1, dtype=np.int64)
        union = sizes[i] + sizes[j] - inter
        total += np.where(union > 0, inter / np.maximum(union, 1), 1.0).sum(axis=0)
    return (total / len(pairs)).reshape(lead)


def modal_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each head's most frequent label over images and the share of images with it.

    labels: str/object [n_images, ...] (e.g. the ``pattern`` column as [n, L, H]; None or "" =
    missing, skipped). Returns (modal str object array [...], share float64 [...]; None / NaN where a head
    has no label); ties go to the alphabetically first label."""
    labels = np.asarray(labels, dtype=object)
    flat = labels.reshape(len(labels), -1)
    modal, share = np.full(flat.shape[1], None, object), np.full(flat.shape[1], np.nan)
    for j in range(flat.shape[1]):
        present = [v for v in flat[:, j] if isinstance(v, str) and v]
        if present:
            values, counts = np.unique(present, return_counts=True)
            modal[j], share[j] = str(values[counts.argmax()]), counts.max() / len(present)
    return modal.reshape(labels.shape[1:]), share.reshape(labels.shape[1:])


def layer_patch_bits(vit, layer: int, A: Tensor, batch) -> np.ndarray:
    """Block ``layer``'s binarised patch matrices, bit-packed: uint8 [B, H, ceil(P*P/8)] (top
    ``batch.options["q"]``; computed once per block and batch, shared with the pattern-label hooks)."""
    T = vit.num_prefix_tokens
    return batch.memo(("patch_bits", layer), lambda: pack_bits(binarize_topq(A[..., T:, T:], batch.options["q"])))


# ---- the metrics this module computes, declared with the registry (analysis.metrics.registry) ----

def _pattern_scores(vit, layer, A, batch):
    """{score or label: [B, H]} of block ``layer``, from its binarised patch matrices (computed once)."""
    return batch.memo(("patterns", layer), lambda: pattern_arrays(layer_patch_bits(vit, layer, A, batch), vit.grid))


def _pattern(name: str) -> OnAttention:
    return OnAttention(lambda vit, layer, A, batch: _pattern_scores(vit, layer, A, batch)[name])


def _consistency(arrays):
    """Mean Jaccard of each head's binarised patch matrices over image pairs; NaN [L, H] when the
    run's patch bits are not given (e.g. a synthetic run)."""
    if "patch_bits" in arrays:
        return consistency(arrays["patch_bits"])
    n, L, H = next(iter(arrays.values())).shape[:3]
    return np.full((L, H), np.nan)


_E = r"Let $E$ be the top-$q$ entries $u \to v$ of the head's binarised patch matrix (rows of the grid counted downwards). "
register_metric(Metric("diagonal", "diagonal", group="pattern", compute=_pattern("diagonal"), range=(0, 1),
                       meaning="share of attention entries at one fixed neighbour offset",
                       formula=_E + r"$\text{offset\_share}(dr, dc)$ is the fraction of $E$ with $(r_v - r_u, c_v - c_u) = (dr, dc)$; "
                                    r"diagonal is its maximum over the 9 offsets with $\max(|dr|, |dc|) \le 1$ (paper Fig. 13: a "
                                    "diagonal line in the patch matrix, shifted by the offset)."))
register_metric(Metric("diagonal_offset", "diagonal offset", group="pattern", value="category", summary=False,
                       compute=_pattern("diagonal_offset"), meaning="the neighbour offset of the diagonal score",
                       formula=r"the arg max of the diagonal score: $(0,0)$ self, $(0,1)$ right, $(0,-1)$ left, $(1,0)$ below, "
                               r"$(-1,0)$ above, and above-left, above-right, below-left, below-right (ties: that order)."))
register_metric(Metric("horizontal", "horizontal", group="pattern", compute=_pattern("horizontal"), range=(0, 1),
                       meaning="share of entries along the source's own row, 2+ patches away",
                       formula=_E + r"horizontal is the fraction of $E$ with $dr = 0$ and $|dc| \ge 2$."))
register_metric(Metric("vertical", "vertical", group="pattern", compute=_pattern("vertical"), range=(0, 1),
                       meaning="share of entries on the 10% most attended target patches",
                       formula=_E + r"vertical is the fraction of $E$ landing on the $\lceil 0.1 P \rceil$ targets with the most "
                                    "entries: many sources attend to the same few patches (vertical stripes; content-relevant)."))
register_metric(Metric("block", "block", group="pattern", compute=_pattern("block"), range=(0, 1),
                       meaning="share of entries whose reverse entry is also kept",
                       formula=_E + r"block is the fraction of $E$ with $u \ne v$ whose reverse $v \to u$ is also in $E$ "
                                    "(groups of patches attending to each other)."))
register_metric(Metric("pattern", "pattern", group="pattern", value="category", summary=False, compute=_pattern("pattern"),
                       meaning="the head's pattern label on this image",
                       formula="the name of the largest of diagonal, horizontal, vertical and block if it is at least 0.5 (a "
                               "diagonal named by its offset, e.g. `diagonal:above`), else `mixed` (ties: that order)."))
register_metric(Metric("consistency", "consistency", group="pattern", level="head", compute=OnRun(_consistency),
                       range=(0, 1), meaning="how alike the head's patterns are across images (Jaccard)",
                       formula=r"the mean Jaccard index $|E_x \cap E_{x'}| / |E_x \cup E_{x'}|$ over pairs of the run's images "
                               "(all pairs up to 2000, else 2000 seeded pairs). High: content-agnostic (the paper's isolated "
                               "clusters of one head); low: content-relevant."))
