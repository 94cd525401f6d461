"""The cache of a run: schema, writing helpers, loader and version check.

A run directory ``cache/RUN/`` holds:
  manifest.json         schema_version, status ("complete" once every stage finished), model,
                        dataset, params, versions, timings (s per stage), sizes (bytes), ...
  images.parquet        one row per image       (IMAGE_COLUMNS)
  head_metrics.parquet  one row per image x head (HEAD_COLUMNS)
  head_summary.parquet  one row per head: mean and std over images of SUMMARY_METRICS
  skipped.parquet       files that could not be read: path, reason
  thumbs/ID.png         thumbnails the app serves
The app and users read runs only through ``open_run`` / ``list_runs``.
"""
from __future__ import annotations

import json
import os
import tempfile
from functools import cached_property
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.errors import CacheError
from analysis.paths import default_cache_dir

SCHEMA_VERSION = 1
METRIC_COLUMNS = ("prob", "prob_drop", "jsd", "cls_dist", "patch_dist", "emb_dist")
IMAGE_COLUMNS = {
    "image_id": pa.int32(), "path": pa.string(), "label": pa.int32(), "label_name": pa.string(),
    "pred": pa.int32(), "prob": pa.float32(),
    "top5_classes": pa.list_(pa.int32()), "top5_probs": pa.list_(pa.float32()),
    "overview_x": pa.float32(), "overview_y": pa.float32(),
}
HEAD_COLUMNS = {
    "image_id": pa.int32(), "layer": pa.int16(), "head": pa.int16(),
    **{m: pa.float32() for m in METRIC_COLUMNS},
    "strength": pa.list_(pa.float32()), "strength_entropy": pa.float32(), "mean_distance_px": pa.float32(),
    "semantic_concentration": pa.float32(), "cls_semantic_concentration": pa.float32(),
    "cls_x": pa.float32(), "cls_y": pa.float32(), "patch_x": pa.float32(), "patch_y": pa.float32(),
}
SEMANTIC_COLUMNS = ("semantic_concentration", "cls_semantic_concentration")  # see analysis.semantic
SUMMARY_METRICS = METRIC_COLUMNS + ("strength_entropy", "mean_distance_px") + SEMANTIC_COLUMNS
SKIPPED_COLUMNS = {"path": pa.string(), "reason": pa.string()}


def schema(columns: dict) -> pa.Schema:
    return pa.schema(list(columns.items()))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, default=str).encode())


def write_table(path: Path, df: pd.DataFrame, columns: dict | None = None) -> None:
    """Write a DataFrame as Parquet atomically; with ``columns`` the contract's columns come first
    with their declared types (extra columns are kept)."""
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"table {Path(path).name} lacks contract columns {missing}")
        extra = [c for c in df.columns if c not in columns]
        fields = list(columns.items())
        table = pa.Table.from_pandas(df[list(columns) + extra], preserve_index=False)
        table = table.cast(pa.schema(fields + [table.schema.field(c) for c in extra]))
    else:
        table = pa.Table.from_pandas(df, preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())


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
        for name in ("images.parquet", "head_metrics.parquet", "head_summary.parquet"):
            if not (self.path / name).is_file():
                raise CacheError(f"Run {self.path.name} lacks {name}. Rebuild it with `{rebuild}`.")

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def images(self) -> pd.DataFrame:
        """One row per image (IMAGE_COLUMNS), indexed by position; image_id is a column."""
        return pd.read_parquet(self.path / "images.parquet")

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

    @property
    def model(self) -> dict:
        return self.manifest.get("model", {})

    @property
    def metrics(self) -> list[str]:
        """The importance metrics this run has values for (backbone runs lack prob/jsd)."""
        hm = self.head_metrics
        return [m for m in METRIC_COLUMNS if m in hm.columns and hm[m].notna().any()]

    def thumbnail(self, image_id: int) -> Path:
        return self.path / "thumbs" / f"{int(image_id)}.png"

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, model={self.model.get('name')!r}, images={len(self.images)})"

    def _repr_html_(self) -> str:
        """The run's summary in Jupyter (analysis.notebook.run_html)."""
        from analysis.notebook import run_html

        return run_html(self)


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
