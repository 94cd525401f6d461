"""The explainer side of the app: per-run indexes (arrays read once) and online look-ups.

Views never touch DataFrames per request: ``get_index(run)`` opens the run once (and again only
when its manifest changes) and hands out the run reader's dense arrays as ``values(name)`` of shape
[n_images, L*H] (``[n, L*H, K]`` for a vector), where column ``layer * H + head`` is one head.
Which metrics exist, their labels and units come from the metric registry. Figure builders
(app/figures.py) draw from these.
"""
from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.errors import CacheError
from analysis.metrics import registry
from analysis.runs.reader import Run, open_run, run_fingerprint
from analysis.serving import transport as online

from . import config, state


# the category metric the app shows first (D1's first colouring after "by layer", the Heads page's first table)
FIRST_CATEGORY = "pattern"


def category_metrics(names=None) -> list[registry.Metric]:
    """Registered per-image category metrics (only ``names`` when given), FIRST_CATEGORY first, then
    registry order."""
    found = registry.metrics("image_head", value="category", names=names)
    return sorted(found, key=lambda m: m.name != FIRST_CATEGORY)


def metric_options(names) -> list[dict]:
    """Dropdown options ('name · meaning') for registry metric names."""
    return [{"label": registry.get_metric(n).option, "value": n} for n in names]


@dataclass
class RunIndex:
    """Everything the cached views need from one run (a ``Run``), as arrays [image position, head]."""
    run: Run
    missing: dict[str, str] = field(default_factory=dict)  # view -> what the run lacks
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)
    # tells this index from an earlier one of the same run (replaced in place, or another process):
    # part of the keys of what a page has drawn (A's images, D1's background)
    stamp: str = field(default_factory=lambda: uuid.uuid4().hex[:12], repr=False)

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def manifest(self) -> dict:
        return self.run.manifest

    @property
    def images(self) -> pd.DataFrame:
        return self.run.images

    @property
    def L(self) -> int:
        return self.run.L

    @property
    def H(self) -> int:
        return self.run.H

    @property
    def n(self) -> int:
        return len(self.images)

    @cached_property
    def facts(self) -> state.RunFacts:
        """What the view state is judged against (app.state.judge), built once per index."""
        return state.run_facts(self)

    @cached_property
    def importance(self) -> list[str]:
        """Importance metrics with values in this run (B1, B2, Heads), registry order."""
        return [m.name for m in self.run.metrics_of(importance=True, level="image_head")]

    @cached_property
    def properties(self) -> list[str]:
        """Scalar per-image head properties with values (C1's y axis, Heads)."""
        return [m.name for m in self.run.metrics_of(importance=False, value="scalar", level="image_head")]

    @cached_property
    def run_level(self) -> list[str]:
        """Scalar run-level metrics (one value per head) with values."""
        return [m.name for m in self.run.metrics_of(value="scalar", level="head")]

    @cached_property
    def vectors(self) -> list[str]:
        """Vector per-image head metrics [K] with values (C2's profile), registry order."""
        return [m.name for m in self.run.metrics_of(value="vector", level="image_head")]

    @cached_property
    def categories(self) -> list[str]:
        """Category per-image head metrics (labels) with values (D1's colouring, the Heads label tables),
        FIRST_CATEGORY first."""
        return [m.name for m in category_metrics(self.run.metrics)]

    @cached_property
    def head_metrics(self) -> list[str]:
        """Every scalar metric the Heads page ranks: importance, properties, then run-level ones."""
        return self.importance + self.properties + self.run_level

    def has(self, name: str) -> bool:
        return name in self.run.metrics

    def values(self, name: str) -> np.ndarray:
        """[n, L*H] (vector: [n, L*H, K]) of an image_head metric of this run."""
        a = self.run.dense(name)
        return a.reshape(a.shape[0], self.L * self.H, *a.shape[3:])

    def summary(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) per head [L*H] over images, from head_summary (a run-level metric: its value and
        NaN; a vector: the mean vector [L*H, K] and NaN)."""
        LH = self.L * self.H
        m = registry.get_metric(name)
        flat = lambda a: a.reshape(LH, *a.shape[2:])
        if m.level == "head":
            return flat(self.run.summary(name)), np.full(LH, np.nan)
        if f"{name}_mean" not in self.run.head_summary.columns:  # a run written before the metric had a summary
            return self.memo(("summary", name), lambda: _summarise(self.values(name), m.value == "vector"))
        mean = flat(self.run.summary(f"{name}_mean"))
        return mean, (np.full(LH, np.nan) if m.value == "vector" else flat(self.run.summary(f"{name}_std")))

    @cached_property
    def layouts(self) -> dict[str, np.ndarray]:
        """"cls" / "patch" -> [n, L*H, 2] for the layouts the run has."""
        out = {}
        for kind in ("cls", "patch"):
            xy = self.run.layout(kind)
            if xy is not None:
                out[kind] = xy.reshape(self.n, self.L * self.H, 2)
        return out

    @cached_property
    def image_ids(self) -> np.ndarray:
        return self.images["image_id"].to_numpy()

    @cached_property
    def position(self) -> dict[int, int]:
        return {int(i): p for p, i in enumerate(self.image_ids)}

    def pos(self, image_id) -> int | None:
        """Row position of an image id, None when the id is unknown (or None)."""
        return None if image_id is None else self.position.get(int(image_id))

    def head_index(self, layer, head) -> int | None:
        if layer is None or head is None or not (0 <= int(layer) < self.L and 0 <= int(head) < self.H):
            return None
        return int(layer) * self.H + int(head)

    @cached_property
    def class_names(self) -> list[str] | None:
        names = self.manifest.get("model", {}).get("class_names")
        return list(names) if names else None

    @cached_property
    def label_names(self) -> dict[int, str]:
        """label -> label_name as stored with the images (used when the model has no class names)."""
        if "label_name" not in self.images.columns:
            return {}
        pairs = self.images[["label", "label_name"]].dropna().drop_duplicates("label")
        return {int(l): str(n) for l, n in zip(pairs["label"], pairs["label_name"]) if n}

    def class_name(self, c) -> str:
        if c is None or (isinstance(c, float) and np.isnan(c)) or int(c) < 0:
            return "unknown"
        names = self.class_names
        if names and int(c) < len(names):
            return names[int(c)]
        return self.label_names.get(int(c), f"class {int(c)}")

    @property
    def has_classifier(self) -> bool:
        return "prob" in self.importance

    def thumbnail(self, image_id):
        """The image's thumbnail (PIL), via the run reader (CacheError when missing)."""
        return self.run.open_thumbnail(image_id)

    def memo(self, key, compute):
        """Cache a selection-independent piece (figure background, histogram) for this run."""
        if key not in self._memo:
            value = compute()
            with self._lock:
                self._memo[key] = value
        return self._memo[key]


def _summarise(values: np.ndarray, vector: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std with ddof=0) over images of [n, L*H(, K)] values, as head_summary holds them."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # heads without any value
        mean = np.nanmean(values, axis=0)
        std = np.full(values.shape[1], np.nan) if vector else np.nanstd(values, axis=0)
    return mean, std


def build_index(run: Run) -> RunIndex:
    """Wrap an opened run and note what its views will lack."""
    index = RunIndex(run)
    missing = index.missing
    if "strength_entropy" not in index.properties:
        missing["strength_entropy"] = "This run has no strength_entropy column: the attention strength overview cannot be drawn."
    if not index.properties:
        missing["properties"] = "This run has no per-head property (strength entropy, attention distance, ...)."
    if not index.has("strength"):
        missing["strength"] = "This run has no k-hop strength vectors (column strength)."
    for key in ("cls", "patch"):
        if key not in index.layouts:
            missing[key] = f"This run has no {key} pattern layout (columns {key}_x / {key}_y are empty)."
    for c in ("overview_x", "overview_y"):
        if c not in index.images.columns or index.images[c].isna().all():
            missing["overview"] = "This run has no image overview layout (images.overview_x / overview_y are empty)."
    if not index.importance:
        missing["metrics"] = "This run has no head-importance metric values."
    return index


_indexes: OrderedDict[tuple, RunIndex] = OrderedDict()
_index_lock = threading.Lock()
MAX_RUNS = 3


def get_index(name: str) -> RunIndex:
    """The index of run ``name`` (built on first use; rebuilt when the run's identity changes).
    Raises CacheError with the fix when the run is missing, incomplete or stale."""
    if not name:
        raise CacheError(f"No run selected and no runs found under {config.cache_dir()}. Build one with "
                         "`python scripts/build_cache.py --out cache/default` or pick one on the Runs page.")
    try:
        path = config.run_dir(name)
    except ValueError as err:
        raise CacheError(str(err)) from None
    key = (str(path), run_fingerprint(path))  # a run replaced in place gets a new index
    index = _indexes.get(key)
    if index is not None:
        return index
    with _index_lock:
        if key not in _indexes:
            _indexes[key] = build_index(open_run(path))
            while len(_indexes) > MAX_RUNS:
                _indexes.popitem(last=False)
        return _indexes[key]


# ---- online work (analysis/serving/transport.py, which caches), with the post-processing the views share
def attention(name: str, image_id: int, layer: int, head: int) -> dict:
    """online.attention for a run name, shared by D2-D5 (the transport's cache answers the views
    after the first; concurrent views wait for the one query), attention as float32."""
    out = online.attention(config.run_dir(name), int(image_id), int(layer), int(head))
    out["attention"] = out["attention"].astype(np.float32)
    return out


def partial_pruning(name: str, image_id: int, layer: int, head: int) -> dict:
    return online.partial_pruning(config.run_dir(name), int(image_id), int(layer), int(head))


def head_set(name: str, image_id: int, heads: list) -> dict:
    """online.head_set for a run name: the image with every head of ``heads`` [[layer, head], ...] pruned."""
    return online.head_set(config.run_dir(name), int(image_id), [[int(l), int(h)] for l, h, *_ in heads])


def pair_interactions(name: str, image_id: int, heads: list, metric: str) -> dict:
    """online.pair_interactions for a run name (2-16 heads, metric prob_drop or emb_dist)."""
    return online.pair_interactions(config.run_dir(name), int(image_id), [[int(l), int(h)] for l, h in heads], metric)


def threshold_for(values: np.ndarray, q: float) -> float:
    """The attention value above which the top ``q`` fraction of ``values`` lie."""
    flat = np.sort(np.asarray(values, dtype=np.float32).ravel())
    k = max(1, int(round(q * flat.size)))
    return float(flat[flat.size - min(k, flat.size)])
