"""One call that computes every per-image array the cache needs: the registry's image_head
metrics (attention-level hooks ride on a single unpruned pass, batch-level hooks add their own
passes) plus the pattern inputs of the layouts (CLS vectors, binarised patch patterns)."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.metrics import registry
from analysis.metrics.common import arrays_to_frame
from analysis.metrics.direct import StreamTrace, direct_pieces, top1_labels, trace_stream
from analysis.metrics.patterns import cls_vector, layer_patch_bits
from analysis.models.adapter import ViT

# Arrays of a batch that are not registry metrics: probs [B, C] float32 (classifier models);
# cls_vectors [B, L, H, N + P] float16; patch_bits [B, L, H, ceil(P*P/8)] uint8 (layout inputs);
# patch_maps [B, len(MAPS), gh, gw] float32 (the "patch_maps" stage; analysis.metrics.patch_maps);
# token_norms [B, L + 1, N] float32 (SPEC v3 token norms; analysis.metrics.sinks).
ENGINE_ARRAYS = ("probs", "cls_vectors", "patch_bits", "patch_maps", "token_norms")


class BatchResult(dict):
    """{name: array} of one batch: every computed registry metric ``[B, L, H]`` (``[B, L, H, K]``
    for a vector; NaN where it does not apply) and the ENGINE_ARRAYS present."""

    @property
    def importance(self) -> dict[str, np.ndarray]:
        """The importance metrics only."""
        return {m.name: self[m.name] for m in registry.metrics(importance=True) if m.name in self}


class Batch:
    """What compute hooks see of a batch: ``images`` [B, 3, H, W], ``labels`` LongTensor [B] or None,
    ``options`` (build options such as ``q``; ``label_known``: bool [B], False where the true label is
    unknown and ``labels`` holds 0 in its place, None without labels), ``metrics`` (the names of the
    registry metrics this batch computes), ``memo(key, compute)`` to share work between hooks,
    ``outputs`` for engine arrays (``probs``), ``trace()`` (the shared clean pass), ``direct_terms()``
    and ``take_attention_pass()`` (below)."""

    def __init__(self, vit: ViT, images: Tensor, labels: Tensor | None, options: dict, attention_hook,
                 metrics: Iterable[str] = ()):
        self.vit, self.images, self.labels, self.options = vit, images, labels, options
        self.metrics = frozenset(metrics)
        self.outputs: dict[str, np.ndarray] = {}
        self._memo: dict = {}
        self._attention_hook = attention_hook

    def memo(self, key, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def take_attention_pass(self):
        """For a batch hook that runs an unpruned forward anyway: the ``hook(layer, A)`` to pass to it,
        so the attention-level metrics ride on that pass (None once taken: run no second one)."""
        hook, self._attention_hook = self._attention_hook, None
        return hook

    @property
    def attention_pass_taken(self) -> bool:
        return self._attention_hook is None

    def trace(self) -> StreamTrace:
        """The batch's clean forward keeping every block's input and per-head output
        (``direct.trace_stream``), run once in inference mode and shared by the hooks that need it:
        the leave-one-out's unpruned pass, the direct effects and the attention sinks. It hosts the
        attention pass (unless a hook took that before)."""
        def run() -> StreamTrace:
            with torch.inference_mode():
                return trace_stream(self.vit, self.images, self.take_attention_pass())
        return self.memo("trace", run)

    def direct_terms(self) -> np.ndarray:
        """Each head's direct term on the shared clean pass, [B, L, H] float64 (``direct.direct_pieces``):
        logit units of y = the label (each image's top-1 class without labels) for a classifier, the
        share of the pooled embedding for a backbone. Shared by direct_logit / direct_emb and indirect_logit."""
        def run() -> np.ndarray:
            trace = self.trace()
            with torch.inference_mode():
                return direct_pieces(self.vit, trace, top1_labels(self.vit, trace, self.labels))["heads"].cpu().numpy()
        return self.memo("direct_terms", run)


def _numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    return np.asarray(x)


class AttentionAnalyser:
    """Attention hook: runs every OnAttention metric (and the pattern inputs) on each block's A."""

    def __init__(self, vit: ViT, metrics: list[registry.Metric], patterns: bool):
        self.vit, self.metrics, self.patterns = vit, metrics, patterns
        self.batch: Batch | None = None
        self.values: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
        if patterns:
            self.values.update(cls_vectors=[], patch_bits=[])

    def __call__(self, layer: int, A: Tensor) -> None:
        for m in self.metrics:
            self.values[m.name].append(_numpy(m.compute.fn(self.vit, layer, A, self.batch)))
        if self.patterns:
            T = self.vit.num_prefix_tokens
            self.values["cls_vectors"].append(cls_vector(A, T).to(torch.float16).cpu().numpy())
            self.values["patch_bits"].append(layer_patch_bits(self.vit, layer, A, self.batch))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.stack(v, axis=1) for k, v in self.values.items() if v}  # L x [B, H, ...] -> [B, L, H, ...]


def model_kind(vit: ViT) -> str:
    return "classifier" if vit.has_head else "backbone"


def analyse_batch(vit: ViT, images: Tensor, labels=None, q: float = 0.01, *, metrics: Iterable[str] | None = None,
                  stages: Iterable[str] = (), patterns: bool = True, semantic: bool = True,
                  options: dict | None = None) -> BatchResult:
    """Everything per image for a batch. images [B, 3, H, W] preprocessed; labels [B] or None
    (-1 = unknown: metrics with ``needs_label`` are NaN for that image; ignored for a backbone).

    metrics: registry names to compute (default: every image_head metric whose stage is None or
    in ``stages``); patterns: also the CLS vectors and patch bits; semantic=False drops the
    semantic group (SIFT); options: extra ``batch.options`` for the hooks (e.g. "head_means" for
    mean ablation). Metrics not applying to this kind of model are NaN [B, L, H].
    Batch hooks run with autograd available (gradient metrics); the attention pass runs in inference mode.
    """
    images = vit.check_images(images)
    B, L, H = images.shape[0], vit.depth, vit.num_heads
    chosen = registry.computed_metrics("image_head", stages)
    if metrics is not None:
        chosen = registry.metrics("image_head", names=metrics)
    if not semantic:
        chosen = [m for m in chosen if m.group != "semantic"]
    kind = model_kind(vit)
    active = [m for m in chosen if kind in m.applies_to]
    known = None
    if labels is not None and vit.has_head:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        known = (labels >= 0).numpy()
        labels = labels.clamp_min(0).to(vit.device)
    else:
        labels = None
    analyser = AttentionAnalyser(vit, [m for m in active if isinstance(m.compute, registry.OnAttention)], patterns)
    batch = Batch(vit, images, labels, {"q": q, "label_known": known, **(options or {})}, analyser,
                  metrics=[m.name for m in active])
    analyser.batch = batch
    out = BatchResult()
    hooks = list(dict.fromkeys(m.compute for m in active if isinstance(m.compute, registry.OnBatch)))
    # batch hooks in registry order; the first to take the attention pass (the shared clean pass,
    # batch.trace(), under the leave-one-out, direct effects and sinks) hosts the attention-level
    # metrics, else one plain pass below does
    for hook in hooks:
        out.update({k: _numpy(v) for k, v in hook.fn(vit, images, labels, batch).items()})
    if not batch.attention_pass_taken and (analyser.metrics or patterns):
        with torch.inference_mode():
            vit.blocks(vit.embed(images), hook=batch.take_attention_pass())
    out.update(analyser.arrays())
    out.update(batch.outputs)
    result = BatchResult({k: v for k, v in out.items() if k in ENGINE_ARRAYS})
    for m in chosen:
        if m in active and m.name in out:
            a = out[m.name]
            if m.needs_label and known is not None and not known.all():
                a = a.astype(np.float64) if a.dtype.kind != "f" else a.copy()
                a[~known] = np.nan
            result[m.name] = a
        else:  # not applicable to this model (or not produced): missing values
            result[m.name] = (np.full((B, L, H), "", dtype="U1") if m.value == "category"
                              else np.full((B, L, H), np.nan, dtype=np.float32))
    return result


def attention_strength(vit: ViT, images: Tensor, batch_size: int = 32) -> pd.DataFrame:
    """k-hop strength of every head for every image.

    images: [B, 3, H, W] preprocessed. Returns one row per (image, layer, head): image, layer,
    head, strength (list of K = max(gh, gw) floats), strength_entropy (in [0, 1]),
    mean_distance_px (attention-weighted mean patch distance, pixels).
    """
    images = vit.check_images(images)
    names = ("strength", "strength_entropy", "mean_distance_px")
    frames = []
    for s in range(0, images.shape[0], batch_size):
        r = analyse_batch(vit, images[s:s + batch_size], metrics=names, patterns=False)
        frames.append(arrays_to_frame({k: r[k] for k in names}, offset=s))
    return pd.concat(frames, ignore_index=True)
