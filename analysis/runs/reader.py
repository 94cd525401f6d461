"""Reading runs: ``open_run`` / ``list_runs`` and ``Run`` (tables, dense metric arrays, thumbnails).

The app and users read runs only through this module. ``Run.dense(name)`` gives any registry
metric as ``[images, L, H]`` (``[images, L, H, K]`` for a vector), rows in the order of
``Run.images``; ``L`` and ``H`` come from the manifest.
"""
from __future__ import annotations

import json
import threading
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.errors import CacheError
from analysis.metrics import registry
from analysis.paths import default_cache_dir
from analysis.runs.schema import SCHEMA_VERSION, SKIPPED_COLUMNS, TABLE_FILES


class Run:
    """A built run, read lazily. Raises CacheError (with what to do) when missing or stale."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        rebuild = f"python scripts/build_cache.py --out {self.path}"
        if not mf.is_file():
            raise CacheError(f"No HeadScope run at {self.path} (manifest.json missing). Build one with `{rebuild}`.")
        try:
            self.manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as err:
            raise CacheError(f"The manifest of {self.path} cannot be read ({err}). Rebuild the run with `{rebuild}`.") from None
        version = self.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CacheError(f"Run {self.path.name} was built with cache schema v{version}; this HeadScope reads "
                             f"v{SCHEMA_VERSION}. Rebuild it with `{rebuild}` (add the model and data options it was built with).")
        if self.manifest.get("status") != "complete":
            raise CacheError(f"The build of run {self.path.name} has not finished. Resume it with `{rebuild} --resume`.")
        for name in TABLE_FILES:
            if not (self.path / name).is_file():
                raise CacheError(f"Run {self.path.name} lacks {name}. Rebuild it with `{rebuild}`.")
        self._lock = threading.Lock()
        self._dense: dict[str, np.ndarray] = {}

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> dict:
        return self.manifest.get("model", {})

    @property
    def L(self) -> int:
        """Layers (manifest model.depth)."""
        return int(self.model["depth"])

    @property
    def H(self) -> int:
        """Heads per layer (manifest model.heads)."""
        return int(self.model["heads"])

    @cached_property
    def images(self) -> pd.DataFrame:
        """One row per image (IMAGE_COLUMNS), indexed by position; image_id is a column."""
        return pd.read_parquet(self.path / "images.parquet").reset_index(drop=True)

    @cached_property
    def head_metrics(self) -> pd.DataFrame:
        """One row per (image, layer, head), sorted by image_id, layer, head."""
        return pd.read_parquet(self.path / "head_metrics.parquet")

    @cached_property
    def head_summary(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "head_summary.parquet")

    @cached_property
    def skipped(self) -> pd.DataFrame:
        p = self.path / "skipped.parquet"
        return pd.read_parquet(p) if p.is_file() else pd.DataFrame(columns=list(SKIPPED_COLUMNS))

    @cached_property
    def metrics(self) -> list[str]:
        """Registry metrics this run has values for, in registry order (backbone runs lack prob/jsd):
        those its manifest lists under "metrics" (all, for runs written before that key existed)
        that have a value in the tables."""
        listed = self.manifest.get("metrics")
        hm, hs = self.head_metrics, self.head_summary
        return [m.name for m in registry.metrics(names=listed)
                if (m.level == "image_head" and m.name in hm.columns and hm[m.name].notna().any())
                or (m.level == "head" and m.name in hs.columns and hs[m.name].notna().any())]

    def metrics_of(self, *, importance: bool | None = None, value: str | None = None,
                   level: str | None = None) -> list[registry.Metric]:
        """This run's metrics as registry entries, filtered like ``registry.metrics``."""
        return registry.metrics(level, value=value, importance=importance, names=self.metrics)

    @cached_property
    def _positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(row position in ``images``, head index layer*H+head) of every head_metrics row that belongs to an image."""
        hm = self.head_metrics
        pos = pd.Series(np.arange(len(self.images)), index=self.images["image_id"].to_numpy())
        rows = pos.reindex(hm["image_id"].to_numpy()).to_numpy()
        keep = ~np.isnan(rows)
        cols = hm["layer"].to_numpy(np.int64) * self.H + hm["head"].to_numpy(np.int64)
        return np.flatnonzero(keep), rows[keep].astype(np.int64) * (self.L * self.H) + cols[keep]

    def dense(self, name: str) -> np.ndarray:
        """Metric ``name`` as [images, L, H] float32 ([images, L, H, K] for a vector, object for a
        category; NaN / None where missing). A level="head" metric: [L, H]. Cached per run."""
        m = registry.get_metric(name)
        if m.level == "head":
            return self.summary(name)
        if name not in self.head_metrics.columns:
            raise CacheError(f"Run {self.name} has no column {name} (it was built without this metric). "
                             "Rebuild the run to add it.")
        return self._column(name, m.value)

    def layout(self, kind: str) -> np.ndarray | None:
        """The 2-D pattern layout ``kind`` ("cls" or "patch") as [images, L, H, 2]; None when empty."""
        cols = [f"{kind}_x", f"{kind}_y"]
        if not all(c in self.head_metrics.columns and self.head_metrics[c].notna().any() for c in cols):
            return None
        return np.stack([self._column(c, "scalar") for c in cols], axis=-1)

    def _column(self, col: str, value: str) -> np.ndarray:
        with self._lock:
            if col in self._dense:
                return self._dense[col]
        n, L, H = len(self.images), self.L, self.H
        keep, flat = self._positions
        series = self.head_metrics[col]
        if value == "vector":
            values = series.to_numpy()[keep]
            K = max((len(v) for v in values if v is not None), default=0)
            out = np.full((n * L * H, K), np.nan, np.float32)
            filled = [i for i, v in enumerate(values) if v is not None and len(v) == K]
            if filled:
                out[flat[filled]] = np.stack([values[i] for i in filled]).astype(np.float32)
            out = out.reshape(n, L, H, K)
        elif value == "category":
            out = np.full(n * L * H, None, object)
            out[flat] = series.to_numpy()[keep]
            out = out.reshape(n, L, H)
        else:
            out = np.full(n * L * H, np.nan, np.float32)
            out[flat] = series.to_numpy(np.float32, na_value=np.nan)[keep]
            out = out.reshape(n, L, H)
        with self._lock:
            self._dense[col] = out
        return out

    def summary(self, column: str) -> np.ndarray:
        """A head_summary column as [L, H] (float64; [L, H, K] for a list column); NaN where missing."""
        hs = self.head_summary
        L, H = self.L, self.H
        if column not in hs.columns:
            return np.full((L, H), np.nan)
        idx = hs["layer"].to_numpy(np.int64) * H + hs["head"].to_numpy(np.int64)
        values = hs[column].to_numpy()
        if len(values) and isinstance(values[0], (list, np.ndarray)):
            K = max(len(v) for v in values)
            out = np.full((L * H, K), np.nan)
            out[idx] = np.stack([np.asarray(v, float) for v in values])
            return out.reshape(L, H, K)
        out = np.full(L * H, np.nan)
        out[idx] = pd.to_numeric(hs[column], errors="coerce").to_numpy(float)
        return out.reshape(L, H)

    def thumbnail(self, image_id: int) -> Path:
        """Path of an image's thumbnail PNG (it may be missing: check ``.is_file()``)."""
        return self.path / "thumbs" / f"{int(image_id)}.png"

    def open_thumbnail(self, image_id: int):
        """The thumbnail as a PIL image; CacheError when the run lacks it."""
        from PIL import Image

        try:
            with Image.open(self.thumbnail(image_id)) as im:
                return im.convert("RGB")
        except OSError:
            raise CacheError(f"The thumbnail of image {int(image_id)} is missing from run {self.name}. "
                             "Rebuild the run to restore it.") from None


def open_run(path: str | Path) -> Run:
    """Open a built run directory (raises CacheError with the fix when it is not usable)."""
    return Run(path)


def list_runs(cache_dir: str | Path | None = None) -> list[dict]:
    """Every run directory under ``cache_dir``: name, path, status, model, dataset, images,
    size_bytes, created, and ``error`` (why it cannot be opened) or None."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    runs = []
    for d in sorted(p for p in cache_dir.glob("*") if (p / "manifest.json").is_file()):
        info = {"name": d.name, "path": str(d), "error": None}
        try:
            mf = Run(d).manifest
        except CacheError as err:
            info["error"] = str(err)
            try:
                mf = json.loads((d / "manifest.json").read_text())
            except (OSError, ValueError):
                mf = {}
        info.update(status=mf.get("status"), model=mf.get("model", {}).get("name"),
                    dataset=mf.get("dataset", {}).get("name"), images=mf.get("dataset", {}).get("n_images"),
                    size_bytes=mf.get("sizes", {}).get("cache_bytes"), created=mf.get("created"))
        runs.append(info)
    return runs
