"""The explainer side of the app: per-run indexes (numpy arrays built once) and online look-ups.

Views never touch DataFrames per request: ``get_index(run)`` builds, once per run (and again only
when its manifest changes), arrays such as ``metric["prob"]`` of shape [n_images, L*H] where
column ``layer * H + head`` is one head. Figure builders (app/figures.py) draw from these.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.runs import store
from analysis.errors import CacheError

from . import config

METRIC_LABELS = {
    "prob": "P(true) when pruned",
    "prob_drop": "drop of P(true)",
    "jsd": "JSD (bits)",
    "cls_dist": "CLS cos. distance",
    "patch_dist": "patch cos. distance",
    "emb_dist": "embedding cos. dist.",
}
METRIC_AXIS = {"prob": "P(true)", "prob_drop": "ΔP(true)", "jsd": "JSD (bits)", "cls_dist": "CLS cos. dist.",
               "patch_dist": "patch cos. dist.", "emb_dist": "emb. cos. dist."}
METRIC_SHORT = {"prob": "prob · P(true class) with the head pruned", "prob_drop": "prob_drop · drop of P(true class)",
                "jsd": "jsd · change of the output (JSD)", "cls_dist": "cls_dist · change of the CLS output",
                "patch_dist": "patch_dist · change of the patch outputs", "emb_dist": "emb_dist · change of the embedding"}


@dataclass
class RunIndex:
    """Everything the cached views need from one run, as arrays indexed [image position, head]."""
    name: str
    path: Path
    manifest: dict
    images: pd.DataFrame
    L: int
    H: int
    metrics: list[str]
    metric: dict[str, np.ndarray]            # name -> [n, L*H] float32 (NaN where missing)
    mean: dict[str, np.ndarray]              # name -> [L*H]
    std: dict[str, np.ndarray]               # name -> [L*H]
    entropy: np.ndarray | None               # [n, L*H]
    strength: np.ndarray | None              # [n, L*H, K]
    mean_distance: np.ndarray | None         # [n, L*H]
    layouts: dict[str, np.ndarray]           # "cls" / "patch" -> [n, L*H, 2]
    missing: dict[str, str] = field(default_factory=dict)  # view -> what the run lacks
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.images)

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
        return "prob" in self.metrics

    def memo(self, key, compute):
        """Cache a selection-independent piece (figure background, histogram) for this run."""
        if key not in self._memo:
            value = compute()
            with self._lock:
                self._memo[key] = value
        return self._memo[key]


def _grid(df: pd.DataFrame, values: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int, LH: int,
          tail: tuple = ()) -> np.ndarray:
    out = np.full((n, LH, *tail), np.nan, dtype=np.float32)
    out[rows, cols] = values
    return out


def build_index(run: store.Run) -> RunIndex:
    """Read the three tables once and turn them into arrays."""
    images = run.images.reset_index(drop=True)
    hm = run.head_metrics
    L = int(hm["layer"].max()) + 1 if len(hm) else int(run.model.get("depth", 0))
    H = int(hm["head"].max()) + 1 if len(hm) else int(run.model.get("heads", 0))
    n, LH = len(images), L * H
    pos = pd.Series(np.arange(n), index=images["image_id"].to_numpy())
    rows = pos.reindex(hm["image_id"].to_numpy()).to_numpy()
    keep = ~np.isnan(rows)
    hm = hm[keep]
    rows = rows[keep].astype(np.int64)
    cols = hm["layer"].to_numpy(np.int64) * H + hm["head"].to_numpy(np.int64)
    missing = {}

    def column(name):
        if name not in hm.columns or hm[name].isna().all():
            return None
        return _grid(hm, hm[name].to_numpy(np.float32, na_value=np.nan), rows, cols, n, LH)

    metrics = [m for m in store.METRIC_COLUMNS if m in hm.columns and hm[m].notna().any()]
    metric = {m: column(m) for m in metrics}
    mean = {m: np.nanmean(a, axis=0) if n else np.zeros(LH) for m, a in metric.items()}
    std = {m: np.nanstd(a, axis=0) if n else np.zeros(LH) for m, a in metric.items()}
    entropy = column("strength_entropy")
    if entropy is None:
        missing["strength_entropy"] = "This run has no strength_entropy column: the attention strength overview cannot be drawn."
    strength = None
    if "strength" in hm.columns and hm["strength"].notna().any():
        vals = [np.asarray(v, dtype=np.float32) if v is not None else None for v in hm["strength"].to_numpy()]
        K = max((len(v) for v in vals if v is not None), default=0)
        if K:
            stacked = np.full((len(vals), K), np.nan, dtype=np.float32)
            for i, v in enumerate(vals):
                if v is not None:
                    stacked[i, :len(v)] = v
            strength = _grid(hm, stacked, rows, cols, n, LH, (K,))
    if strength is None:
        missing["strength"] = "This run has no k-hop strength vectors (column strength)."
    layouts = {}
    for key in ("cls", "patch"):
        x, y = column(f"{key}_x"), column(f"{key}_y")
        if x is None or y is None:
            missing[key] = f"This run has no {key} pattern layout (columns {key}_x / {key}_y are empty)."
        else:
            layouts[key] = np.stack([x, y], axis=-1)
    for c in ("overview_x", "overview_y"):
        if c not in images.columns or images[c].isna().all():
            missing["overview"] = "This run has no image overview layout (images.overview_x / overview_y are empty)."
    if not metrics:
        missing["metrics"] = "This run has no head-importance metric values."
    return RunIndex(name=run.name, path=run.path, manifest=run.manifest, images=images, L=L, H=H,
                    metrics=metrics, metric=metric, mean=mean, std=std, entropy=entropy, strength=strength,
                    mean_distance=column("mean_distance_px"), layouts=layouts, missing=missing)


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
    key = (str(path), store.run_fingerprint(path))  # a run replaced in place gets a new index
    index = _indexes.get(key)
    if index is not None:
        return index
    with _index_lock:
        if key not in _indexes:
            _indexes[key] = build_index(store.open_run(path))
            while len(_indexes) > MAX_RUNS:
                _indexes.popitem(last=False)
        return _indexes[key]


# ---- online work (analysis/serving/transport.py, which caches), with the post-processing the views share
def attention(name: str, image_id: int, layer: int, head: int) -> dict:
    """online.attention for a run name, shared by D2-D5 (the transport's cache answers the views
    after the first; concurrent views wait for the one query), attention as float32."""
    from analysis.serving import transport as online

    out = online.attention(config.run_dir(name), int(image_id), int(layer), int(head))
    out["attention"] = out["attention"].astype(np.float32)
    return out


def partial_pruning(name: str, image_id: int, layer: int, head: int) -> dict:
    from analysis.serving import transport as online

    return online.partial_pruning(config.run_dir(name), int(image_id), int(layer), int(head))


def threshold_for(values: np.ndarray, q: float) -> float:
    """The attention value above which the top ``q`` fraction of ``values`` lie."""
    flat = np.sort(np.asarray(values, dtype=np.float32).ravel())
    k = max(1, int(round(q * flat.size)))
    return float(flat[flat.size - min(k, flat.size)])
