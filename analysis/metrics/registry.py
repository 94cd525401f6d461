"""The metric registry: every per-image x head and per-head quantity of a run, declared once.

The cache schema (``analysis.runs.schema``), the engine's per-batch arrays (``engine.analyse_batch``),
the tables and ``head_summary`` (``analysis.runs.tables``), the run reader's dense arrays, and the
app's dropdowns, legends, axis titles, the Heads page and the Help page are all derived from it.

Adding a metric = one compute function + one ``register_metric(Metric(...))`` call, e.g.::

    def max_attention(vit, layer, A, batch):            # A: [B, H, N, N] post-softmax, unpruned
        return A.amax(dim=(-2, -1))                      # -> [B, H]

    register_metric(Metric(
        name="max_attention", label="max attention", unit="",
        meaning="the largest single attention weight of the head",
        formula=r"$\\max_{u,v} A[u, v]$",
        group="pattern", compute=OnAttention(max_attention)))

Compute hooks (how the engine / the merge obtain the values; see ``engine.analyse_batch``):

* ``OnAttention(fn)``: ``fn(vit, layer, A [B,H,N,N], batch) -> [B,H]`` (``[B,H,K]`` for a vector),
  torch or numpy, called for every block during the engine's single unpruned pass.
* ``OnBatch(fn)``: ``fn(vit, images [B,3,H,W], labels LongTensor [B] or None, batch) ->
  {name: [B,L,H(,K)]}`` for quantities needing passes of their own (gradients, ablations). One
  function may fill several metrics: declare each with the same ``OnBatch`` object (called once).
* ``OnRun(fn)`` (``level="head"``): ``fn(arrays) -> [L, H]`` (or ``[L*H]``) evaluated when the
  run's tables are written; ``arrays`` = {metric name: [n_images, L, H(,K)]} of the whole run, plus
  the engine arrays the writer is given as ``inputs`` (the build passes ``patch_bits``).

``batch`` (``engine.Batch``) gives hooks ``batch.images``, ``batch.labels`` (-1 = unknown replaced
by 0; ``needs_label`` metrics are set to NaN there afterwards), ``batch.options`` (build options,
e.g. ``q``; ``label_known``: bool [B], which images have a true label, None without labels), ``batch.memo(key, compute)`` to share work between hooks of a batch, and
``batch.take_attention_pass()`` (an OnBatch hook that runs an unpruned forward anyway passes it as
that forward's attention hook, so the OnAttention metrics need no pass of their own). OnAttention
hooks run under ``torch.inference_mode``; OnBatch hooks with autograd available.

Values: ``"scalar"`` (float32 column, NaN = missing), ``"vector"`` (list<float32> column, dense
``[..., K]``), ``"category"`` (string column, dense object array; hooks return str arrays, "" =
missing; needs ``summary=False``). ``summary=True`` gives ``head_summary`` the columns
``<name>_mean`` and ``<name>_std`` (population std, ddof=0, over images; a vector gets
``<name>_mean`` only, the mean vector). A metric with ``stage`` set is computed only when the build
enables that stage (``BuildConfig.stages``); a run lists what it has in ``manifest["metrics"]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from analysis.runs.schema import RESERVED_COLUMNS

LEVELS = ("image_head", "head")
VALUES = ("scalar", "vector", "category")
MODEL_KINDS = frozenset({"classifier", "backbone"})


@dataclass(frozen=True, eq=False)
class OnAttention:
    """``fn(vit, layer, A [B,H,N,N], batch) -> [B,H] or [B,H,K]`` on every unpruned block."""
    fn: Callable


@dataclass(frozen=True, eq=False)
class OnBatch:
    """``fn(vit, images, labels, batch) -> {name: [B,L,H(,K)]}``; shared by the metrics it fills."""
    fn: Callable


@dataclass(frozen=True, eq=False)
class OnRun:
    """``fn(arrays: {name: [n,L,H(,K)]}) -> [L,H]`` at table-writing time (level="head")."""
    fn: Callable


@dataclass(frozen=True)
class Metric:
    """One declared quantity. ``name`` is its column (head_metrics for level "image_head",
    head_summary for level "head"); ``label`` the short UI label (legends, titles); ``axis`` the
    axis title (default: label and unit); ``meaning`` one line (dropdown hint, Help); ``formula``
    the Help text (Markdown + MathJax); ``important``: "high" / "low" = an importance metric where
    a high / low value marks an important head (B1, Heads), None = a head property (C1, Heads);
    ``exact=False`` labels it "approximate" everywhere; ``applies_to`` the model kinds with values
    (others get NaN); ``needs_label``: NaN for images without a known true label; ``range``: the
    value range axes use (None: automatic); ``stage``: the build option that switches it on (None:
    always computed)."""
    name: str
    label: str
    meaning: str
    formula: str
    compute: OnAttention | OnBatch | OnRun
    unit: str = ""
    axis: str | None = None
    level: str = "image_head"
    value: str = "scalar"
    important: str | None = None
    group: str = "property"
    exact: bool = True
    applies_to: frozenset = MODEL_KINDS
    needs_label: bool = False
    summary: bool = True
    stage: str | None = None
    range: tuple[float, float] | None = None

    def __post_init__(self):
        object.__setattr__(self, "applies_to", frozenset(self.applies_to))
        problems = [
            (not self.name.isidentifier(), "name must be an identifier (it is a column name)"),
            (self.level not in LEVELS, f"level must be one of {LEVELS}"),
            (self.value not in VALUES, f"value must be one of {VALUES}"),
            (self.important not in ("high", "low", None), 'important must be "high", "low" or None'),
            (not self.applies_to or not self.applies_to <= MODEL_KINDS, f"applies_to must be a subset of {set(MODEL_KINDS)}"),
            (self.level == "head" and not isinstance(self.compute, OnRun), 'level="head" needs compute=OnRun(fn)'),
            (self.level == "image_head" and isinstance(self.compute, OnRun), "OnRun is for level=\"head\" metrics"),
            (self.value == "category" and self.summary, "a category metric has no mean: use summary=False"),
            (self.important is not None and self.value != "scalar", "an importance metric must be scalar"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(f"Metric {self.name!r}: {message}.")

    @property
    def is_importance(self) -> bool:
        return self.important is not None

    @property
    def title(self) -> str:
        """Axis title: ``axis`` or label (unit), 'approx.' for approximations."""
        text = self.axis or (f"{self.label} ({self.unit})" if self.unit else self.label)
        return text if self.exact else f"{text} (approx.)"

    @property
    def option(self) -> str:
        """Dropdown text: 'name · meaning' (+ approximate)."""
        return f"{self.name} · {self.meaning}" + ("" if self.exact else " (approximate)")

    def summary_columns(self) -> list[str]:
        """Its columns in head_summary."""
        if self.level == "head":
            return [self.name]
        if not self.summary:
            return []
        return [f"{self.name}_mean"] if self.value == "vector" else [f"{self.name}_mean", f"{self.name}_std"]


_REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Declare ``metric`` (see the module docstring). Raises ValueError when the name is taken
    (pass replace=True to redeclare it) or collides with a fixed table column. Returns it."""
    if metric.name in RESERVED_COLUMNS:
        raise ValueError(f"Metric name {metric.name!r} is a fixed column of the run tables; choose another name.")
    if metric.name in _REGISTRY and not replace:
        raise ValueError(f"Metric {metric.name!r} is already registered (pass replace=True to redeclare it).")
    _REGISTRY[metric.name] = metric
    return metric


def unregister_metric(name: str) -> None:
    """Remove a metric (tests that register toy metrics undo them with this)."""
    _REGISTRY.pop(name, None)


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"No metric {name!r} is registered (known: {', '.join(_REGISTRY)}).") from None


def metrics(level: str | None = None, *, value: str | None = None, importance: bool | None = None,
            names: Iterable[str] | None = None) -> list[Metric]:
    """Registered metrics in declaration order, optionally filtered (``names``: keep only those)."""
    keep = None if names is None else set(names)
    return [m for m in _REGISTRY.values()
            if (level is None or m.level == level) and (value is None or m.value == value)
            and (importance is None or m.is_importance == importance) and (keep is None or m.name in keep)]


def computed_metrics(level: str, stages: Iterable[str] = ()) -> list[Metric]:
    """The metrics of ``level`` a build computes with these optional ``stages`` enabled."""
    stages = set(stages)
    return [m for m in metrics(level) if m.stage is None or m.stage in stages]


# ---- built-in metrics --------------------------------------------------------------------------
# Hooks are thin adapters over the metric modules (importance, strength, semantic).

def _leave_one_out(vit, images, labels, batch):
    """Exact leave-one-out (mode 1) of every head; the unpruned pass hosts the attention hooks."""
    from analysis.metrics.importance import importance_arrays

    arrays, base = importance_arrays(vit, images, labels, on_attention=batch.take_attention_pass())
    if base.logp is not None:
        batch.outputs["probs"] = base.logp.exp().float().cpu().numpy()
    return arrays


LEAVE_ONE_OUT = OnBatch(_leave_one_out)


def _patches(vit, A):
    T = vit.num_prefix_tokens
    return A[..., T:, T:]


def _khop(vit, layer, A, batch):
    from analysis.metrics.strength import khop_strength

    return batch.memo(("khop", layer), lambda: khop_strength(_patches(vit, A), vit.grid))


def _strength_entropy(vit, layer, A, batch):
    from analysis.metrics.strength import strength_entropy

    return strength_entropy(_khop(vit, layer, A, batch))


def _mean_distance(vit, layer, A, batch):
    from analysis.metrics.strength import mean_attention_distance

    return mean_attention_distance(_patches(vit, A), vit.grid, vit.patch_size)


def _peak(A, num_prefix):
    from analysis.metrics.strength import peak_attention

    return peak_attention(A, num_prefix)


def _semantic(vit, layer, A, batch):
    """(patch-source, CLS-source) concentration [B, H] of one block, computed once per block."""
    import torch

    from analysis.metrics.semantic import batch_semantic_weights, semantic_concentration

    weights = batch.memo("semantic_weights", lambda: torch.from_numpy(
        batch_semantic_weights(batch.images, vit.data_config, vit.grid, vit.patch_size)).to(A.device))
    return batch.memo(("semantic", layer), lambda: semantic_concentration(A, weights, vit.num_prefix_tokens))


def _patch_maps(vit, images, labels, batch):
    """The "patch_maps" stage: the four maps of every image (kept for the run's patch_maps table)
    and each head's alignment with the occlusion map."""
    from analysis.metrics.patch_maps import batch_patch_maps

    known = batch.options.get("label_known")
    per_image = None if labels is None else [int(y) if known is None or known[i] else None
                                             for i, y in enumerate(labels.tolist())]
    maps, alignment = batch_patch_maps(vit, images, per_image)
    batch.outputs["patch_maps"] = maps
    return {"saliency_alignment": alignment}


_DIST = r"$1 - \cos(a, b)$"
for _m in (
    Metric("prob", "P(true) when pruned", axis="P(true)", important="low", group="importance", range=(0, 1),
           applies_to={"classifier"}, needs_label=True, compute=LEAVE_ONE_OUT,
           meaning="P(true class) with the head pruned",
           formula=r"the probability of the true class *with the head pruned*, $P'_y$. Low means the model "
                   "needs this head for this image. (The paper plots this value rather than the drop because "
                   "it reads more easily.)"),
    Metric("prob_drop", "drop of P(true)", axis="ΔP(true)", important="high", group="importance",
           applies_to={"classifier"}, needs_label=True, compute=LEAVE_ONE_OUT,
           meaning="drop of P(true class)",
           formula=r"how much the true class loses: $P_y - P'_y$ (paper Eq. 3). Negative values mean the head "
                   "was *hurting* the prediction."),
    Metric("jsd", "JSD", unit="bits", important="high", group="importance", applies_to={"classifier"}, range=(0, 1),
           compute=LEAVE_ONE_OUT, meaning="change of the output (JSD)",
           formula=r"how much the whole output distribution changes, as the Jensen–Shannon divergence in bits "
                   r"(0 = identical, 1 = completely different): $\mathrm{JSD}(P \,\|\, P') = \tfrac12 "
                   r"\mathrm{KL}(P \,\|\, M) + \tfrac12 \mathrm{KL}(P' \,\|\, M)$, $M = \tfrac12 (P + P')$, "
                   "logarithms base 2 (Eq. 4)."),
    Metric("cls_dist", "CLS cos. distance", axis="CLS cos. dist.", important="high", group="importance",
           compute=LEAVE_ONE_OUT, meaning="change of the CLS output",
           formula=r"how much the attention block's output for the CLS token changes: $1 - \cos(z_l[0], z'_l[0])$, "
                   r"where $z_l$ is the block's attention output (after the output projection, before the "
                   "residual) (Eq. 5). It measures the head's effect on its own layer, before later layers can "
                   "compensate."),
    Metric("patch_dist", "patch cos. distance", axis="patch cos. dist.", important="high", group="importance",
           compute=LEAVE_ONE_OUT, meaning="change of the patch outputs",
           formula=r"the same cosine distance averaged over the $P$ patch tokens: "
                   r"$\frac{1}{P}\sum_{t} \big(1 - \cos(z_l[t], z'_l[t])\big)$ (Eq. 6)."),
    Metric("emb_dist", "embedding cos. dist.", axis="emb. cos. dist.", important="high", group="importance",
           compute=LEAVE_ONE_OUT, meaning="change of the embedding",
           formula=r"the cosine distance of the model's pooled output embedding with and without the head; the "
                   "model-level metric of backbones (self-supervised models such as DINOv2), where prob, "
                   "prob_drop and jsd do not exist."),
    Metric("strength", "k-hop strength", value="vector", group="strength", compute=OnAttention(_khop),
           axis="attention per patch", meaning="average attention a patch gives to one patch k hops away",
           formula=r"$s_k(u) = \frac{1}{|V_k(u)|}\sum_{v \in V_k(u)} A[u, v]$, the average attention source patch "
                   r"$u$ gives to one patch at hop $k$. The head's vector $s$ has $K = \max(g_h, g_w)$ entries: "
                   r"$s_k$ is the mean of $s_k(u)$ over the source patches that have any patch at hop $k$ "
                   r"(paper Eq. 7). A head with a tall bar at $k=0$ makes every patch look at itself."),
    Metric("strength_entropy", "strength entropy", group="strength", compute=OnAttention(_strength_entropy), range=(0, 1),
           meaning="how global the attention is (0-1)",
           formula=r"$-\sum_k p_k \log p_k \,/\, \log K$ with $p = s / \sum_k s_k$; between 0 (all attention on "
                   r"one hop distance: a *local* or strictly patterned head) and 1 (spread evenly over all "
                   "distances: a *global* head). Lower layers tend to have both kinds; higher layers are mostly "
                   "global."),
    Metric("mean_distance_px", "mean attention distance", unit="px", group="strength",
           compute=OnAttention(_mean_distance), meaning="mean attention distance (px)",
           formula="the attention-weighted average distance in pixels between a patch and the patches it attends "
                   "to (rows renormalised over patches), averaged over source patches, as in the original ViT paper."),
    Metric("peak_attention", "peak attention", group="strength", range=(0, 1),
           compute=OnAttention(lambda vit, layer, A, batch: _peak(A, vit.num_prefix_tokens)),
           meaning="the head's largest attention weight outside CLS→CLS",
           formula=r"$\max_{(u, v) \notin R_1} A[u, v]$, the largest single weight of the head outside the "
                   r"prefix$\to$prefix block $R_1$ (CLS self-attention, often near 1). A peaked head (one "
                   "source puts most of its attention on one token) comes close to 1, a diffuse one to $1/N$. "
                   "The Explorer's *run* colour scale for D2-D4 is the largest value of it in the head's layer "
                   "over the run's images, so heads and images can be compared on one scale."),
    Metric("semantic_concentration", "semantic concentration", group="semantic",
           compute=OnAttention(lambda vit, layer, A, batch: _semantic(vit, layer, A, batch)[0]),
           meaning="attention on SIFT-keypoint patches (1 = no preference)",
           formula=r"how much of a head's attention lands on *semantically rich* patches. A patch's semantic "
                   r"weight $w_v$ is its share of the SIFT keypoints found in the image as the model sees it "
                   r"($\sum_v w_v = 1$). With each source row restricted to the patch columns and renormalised "
                   r"($\tilde A$), $\text{sc} = P \cdot \operatorname{mean}_u \sum_v \tilde A[u, v]\, w_v$ (mean "
                   r"over the $P$ source patches $u$). 1 = no preference (what uniform attention gives), above 1 = "
                   "attention flows to keypoint-rich patches (object parts, edges), below 1 = to flat background. "
                   "Undefined (empty) for an image in which SIFT finds no keypoint."),
    Metric("cls_semantic_concentration", "CLS semantic concentration", group="semantic",
           compute=OnAttention(lambda vit, layer, A, batch: _semantic(vit, layer, A, batch)[1]),
           meaning="the same for the CLS row",
           formula=r"semantic concentration of the CLS row alone, $P \sum_v \tilde A[0, v]\, w_v$."),
    Metric("saliency_alignment", "head-saliency alignment", group="saliency", stage="patch_maps", range=(-1, 1),
           compute=OnBatch(_patch_maps), meaning="does the head's CLS row look where occlusion matters",
           formula=r"the Spearman correlation over the $P$ patches between the head's CLS attention row "
                   r"$A[0, T{:}]$ and the image's occlusion map $P(y|x) - P(y|x'_t)$ (patch $t$ set to the mean "
                   "colour; for a backbone the cosine distance of the pooled embeddings; $y$ = the true class, "
                   "or the top-1 class when it is unknown). +1: the head attends most to the patches whose "
                   "removal hurts most. Computed when the run is built with --patch-maps."),
):
    register_metric(_m)
del _m


# ---- beyond the paper: Taylor (approximate) and mean-ablated importance (SPEC v2) ---------------

def _taylor(vit, images, labels, batch):
    """taylor_prob_drop and grad_score: one forward + one backward (analysis.metrics.taylor)."""
    from analysis.metrics.taylor import taylor_pass

    if labels is None:
        return {}
    arrays, probs = taylor_pass(vit, images, labels)
    batch.outputs.setdefault("probs", probs)
    return arrays


def _mean_ablation(vit, images, labels, batch):
    """Mean-ablated leave-one-out with the run's head means (option "head_means" [L,H,N,d], which the
    build computes over all the run's images first; without it: the means over this batch's images)."""
    import torch

    from analysis.metrics.ablation import MEAN_METRICS, head_means
    from analysis.metrics.importance import importance_arrays

    means = batch.options.get("head_means")
    if means is None:
        means = head_means(vit, images, batch_size=len(images))
    arrays, base = importance_arrays(vit, images, labels, on_attention=batch.take_attention_pass(),
                                     means=torch.as_tensor(means, device=vit.device))
    if base.logp is not None:
        batch.outputs.setdefault("probs", base.logp.exp().float().cpu().numpy())
    return {f"mean_{m}": arrays[m] for m in MEAN_METRICS}


def _ablation_shift(arrays):
    """Run mean of (mean-ablated - zero-ablated) prob_drop (emb_dist for a backbone) per head."""
    import numpy as np

    for zero, mean in (("prob_drop", "mean_prob_drop"), ("emb_dist", "mean_emb_dist")):
        if zero in arrays and mean in arrays and np.isfinite(arrays[mean]).any():
            return np.nanmean(arrays[mean].astype(np.float64) - arrays[zero], axis=0)
    some = next(iter(arrays.values()))
    return np.full(some.shape[1:3], np.nan)


TAYLOR = OnBatch(_taylor)
MEAN_ABLATION = OnBatch(_mean_ablation)
_TAYLOR_NOTE = (" **Approximate**: a first-order Taylor estimate from one backward pass (head gate $g$ on the "
                r"head output $o = A V$ before $W_O$, $g = 0$ is exactly pruning mode 1), not a pruned forward.")
_MEAN_NOTE = (" **Mean ablation**: the head's output $o = A V$ is replaced at every token by its mean over the "
              "run's images instead of being zeroed.")
for _m in (
    Metric("taylor_prob_drop", "Taylor ΔP(true)", axis="Taylor ΔP(true)", important="high", group="importance",
           exact=False, applies_to={"classifier"}, needs_label=True, stage="taylor", compute=TAYLOR,
           meaning="first-order estimate of the drop of P(true)",
           formula=r"$\partial P(y \mid x) / \partial g$ at $g = 1$: the linear estimate of prob_drop (signed)."
                   + _TAYLOR_NOTE),
    Metric("grad_score", "gradient score", important="high", group="importance", exact=False,
           applies_to={"classifier"}, needs_label=True, stage="taylor", compute=TAYLOR,
           meaning="|d log P(true) / d gate| (Michel et al. 2019)",
           formula=r"$\left|\partial \log P(y \mid x) / \partial g\right|$ at $g = 1$, per image (Michel et al. "
                   "2019 average it over images)." + _TAYLOR_NOTE),
    Metric("mean_prob", "P(true), mean-ablated", axis="P(true), mean-abl.", important="low", group="importance",
           applies_to={"classifier"}, needs_label=True, stage="mean_ablation", compute=MEAN_ABLATION, range=(0, 1),
           meaning="P(true class) with the head mean-ablated",
           formula=r"$P'_y$ with the head mean-ablated." + _MEAN_NOTE),
    Metric("mean_prob_drop", "drop of P(true), mean-ablated", axis="ΔP(true), mean-abl.", important="high",
           group="importance", applies_to={"classifier"}, needs_label=True, stage="mean_ablation",
           compute=MEAN_ABLATION, meaning="drop of P(true class), mean-ablated",
           formula=r"$P_y - P'_y$ with the head mean-ablated." + _MEAN_NOTE),
    Metric("mean_jsd", "JSD, mean-ablated", unit="bits", important="high", group="importance",
           applies_to={"classifier"}, stage="mean_ablation", compute=MEAN_ABLATION, range=(0, 1),
           meaning="change of the output (JSD), mean-ablated",
           formula=r"$\mathrm{JSD}(P \,\|\, P')$ in bits with the head mean-ablated." + _MEAN_NOTE),
    Metric("mean_emb_dist", "embedding cos. dist., mean-ablated", axis="emb. cos. dist., mean-abl.",
           important="high", group="importance", stage="mean_ablation", compute=MEAN_ABLATION,
           meaning="change of the embedding, mean-ablated",
           formula="cosine distance of the pooled output embedding with and without the head, the head "
                   "mean-ablated." + _MEAN_NOTE),
    Metric("ablation_shift", "mean minus zero ablation", level="head", group="importance", stage="mean_ablation",
           compute=OnRun(_ablation_shift), meaning="how much mean ablation changes the head's importance",
           formula="run mean over images of mean_prob_drop - prob_drop (mean_emb_dist - emb_dist for a backbone): "
                   "positive = the head matters more than zeroing says, negative = zeroing overstates it."),
):
    register_metric(_m)


# ---- pattern labels (SPEC "Attention pattern labels"; analysis.metrics.patterns) ----------------

def _pattern_scores(vit, layer, A, batch):
    """{score or label: [B, H]} of block ``layer``, from its binarised patch matrices (computed once)."""
    from analysis.metrics.engine import layer_patch_bits
    from analysis.metrics.patterns import pattern_arrays

    return batch.memo(("patterns", layer), lambda: pattern_arrays(layer_patch_bits(vit, layer, A, batch), vit.grid))


def _pattern(name: str) -> OnAttention:
    return OnAttention(lambda vit, layer, A, batch: _pattern_scores(vit, layer, A, batch)[name])


def _consistency(arrays):
    """Mean Jaccard of each head's binarised patch matrices over image pairs; NaN [L, H] when the
    run's patch bits are not given (e.g. a synthetic run)."""
    import numpy as np

    from analysis.metrics.patterns import consistency

    if "patch_bits" in arrays:
        return consistency(arrays["patch_bits"])
    n, L, H = next(iter(arrays.values())).shape[:3]
    return np.full((L, H), np.nan)


_E = r"Let $E$ be the top-$q$ entries $u \to v$ of the head's binarised patch matrix (rows of the grid counted downwards). "
for _m in (
    Metric("diagonal", "diagonal", group="pattern", compute=_pattern("diagonal"), range=(0, 1),
           meaning="share of attention entries at one fixed neighbour offset",
           formula=_E + r"$\text{offset\_share}(dr, dc)$ is the fraction of $E$ with $(r_v - r_u, c_v - c_u) = (dr, dc)$; "
                        r"diagonal is its maximum over the 9 offsets with $\max(|dr|, |dc|) \le 1$ (paper Fig. 13: a "
                        "diagonal line in the patch matrix, shifted by the offset)."),
    Metric("diagonal_offset", "diagonal offset", group="pattern", value="category", summary=False,
           compute=_pattern("diagonal_offset"), meaning="the neighbour offset of the diagonal score",
           formula=r"the arg max of the diagonal score: $(0,0)$ self, $(0,1)$ right, $(0,-1)$ left, $(1,0)$ below, "
                   r"$(-1,0)$ above, and above-left, above-right, below-left, below-right (ties: that order)."),
    Metric("horizontal", "horizontal", group="pattern", compute=_pattern("horizontal"), range=(0, 1),
           meaning="share of entries along the source's own row, 2+ patches away",
           formula=_E + r"horizontal is the fraction of $E$ with $dr = 0$ and $|dc| \ge 2$."),
    Metric("vertical", "vertical", group="pattern", compute=_pattern("vertical"), range=(0, 1),
           meaning="share of entries on the 10% most attended target patches",
           formula=_E + r"vertical is the fraction of $E$ landing on the $\lceil 0.1 P \rceil$ targets with the most "
                        "entries: many sources attend to the same few patches (vertical stripes; content-relevant)."),
    Metric("block", "block", group="pattern", compute=_pattern("block"), range=(0, 1),
           meaning="share of entries whose reverse entry is also kept",
           formula=_E + r"block is the fraction of $E$ with $u \ne v$ whose reverse $v \to u$ is also in $E$ "
                        "(groups of patches attending to each other)."),
    Metric("pattern", "pattern", group="pattern", value="category", summary=False, compute=_pattern("pattern"),
           meaning="the head's pattern label on this image",
           formula="the name of the largest of diagonal, horizontal, vertical and block if it is at least 0.5 (a "
                   "diagonal named by its offset, e.g. `diagonal:above`), else `mixed` (ties: that order)."),
    Metric("consistency", "consistency", group="pattern", level="head", compute=OnRun(_consistency),
           range=(0, 1), meaning="how alike the head's patterns are across images (Jaccard)",
           formula=r"the mean Jaccard index $|E_x \cap E_{x'}| / |E_x \cup E_{x'}|$ over pairs of the run's images "
                   "(all pairs up to 2000, else 2000 seeded pairs). High: content-agnostic (the paper's isolated "
                   "clusters of one head); low: content-relevant."),
):
    register_metric(_m)
del _m
