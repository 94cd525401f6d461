"""The one writer of the run format: dense per-image arrays -> the run's tables and manifest.

The build (``analysis.runs.build.merge_run``), ``scripts/make_synthetic_cache.py`` and test runs
all end in ``write_run``; nothing else writes head_metrics / head_summary. Columns come from the
metric registry (``analysis.runs.schema``).
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.errors import CacheError
from analysis.metrics import registry
from analysis.runs import schema
from analysis.metrics.patch_maps import MAPS


TEMP_GRACE_S = 600  # temporaries older than this are leftovers of a killed process


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file ``.<name>.XXXX`` and rename, so readers never see half a file.
    On failure the temporary is removed; a full disk raises CacheError saying how to resume."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"The disk is full (no space left writing {path}, {len(data) / 1e6:.1f} MB). Finished "
                             "work is kept: free some space, then resume with `python scripts/build_cache.py "
                             f"--out {_run_of(path)} --resume`.") from None
        raise


def _run_of(path: Path) -> Path:
    """The run directory a file of a run lies in (the folder holding manifest.json)."""
    for parent in path.parents:
        if (parent / "manifest.json").is_file():
            return parent
    return path.parent


def remove_temporaries(run_dir: Path, older_than_s: float = TEMP_GRACE_S) -> int:
    """Delete temporaries (``.<name>.XXXX`` of atomic_write_bytes) that a killed or failed build left
    in the run directory and its sub-folders; recent ones may belong to another shard's write in
    flight and are kept. Returns how many were removed."""
    removed, now = 0, time.time()
    for folder in [run_dir] + [d for d in run_dir.iterdir() if d.is_dir()] if run_dir.is_dir() else []:
        for p in folder.glob(".*.*"):
            try:
                if p.is_file() and now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    removed += 1
            except OSError:
                pass
    return removed


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


def _has_values(metric: registry.Metric, a: np.ndarray) -> bool:
    if metric.value == "category":
        return any(isinstance(v, str) and v for v in np.asarray(a, dtype=object).ravel())
    return a.ndim == (4 if metric.value == "vector" else 3) and bool(np.isfinite(a).any())


def _column(metric: registry.Metric, a: np.ndarray | None, rows: int) -> list | np.ndarray:
    """A dense array [n, L, H(, K)] as one head_metrics column (None / NaN where missing)."""
    if metric.value == "vector":
        return [None] * rows if a is None or a.ndim != 4 else list(a.reshape(rows, -1).astype(np.float32))
    if metric.value == "category":  # "" = missing
        values = [] if a is None else [str(v) if isinstance(v, str) and v else None for v in np.asarray(a).ravel()]
        return values or [None] * rows
    return np.full(rows, np.nan, np.float32) if a is None else a.reshape(rows)


def head_table(image_ids: np.ndarray, arrays: dict, L: int, H: int, layouts: dict | None = None) -> pd.DataFrame:
    """One row per (image, layer, head), sorted by image_id, layer, head. ``arrays``: {metric:
    [n, L, H(, K)]} in the order of ``image_ids`` (ascending); ``layouts``: {"cls"/"patch": [n*L*H, 2]}."""
    n = len(image_ids)
    img, lay, hd = np.meshgrid(np.asarray(image_ids), np.arange(L), np.arange(H), indexing="ij")
    df = pd.DataFrame({"image_id": img.ravel(), "layer": lay.ravel(), "head": hd.ravel()})
    for m in registry.metrics("image_head", names=arrays):
        df[m.name] = _column(m, arrays[m.name], n * L * H)
    for key in ("cls", "patch"):
        xy = (layouts or {}).get(key)
        xy = np.full((n * L * H, 2), np.nan, np.float32) if xy is None else np.asarray(xy).reshape(n * L * H, 2)
        df[f"{key}_x"], df[f"{key}_y"] = xy[:, 0], xy[:, 1]
    return df


def summary_table(arrays: dict, L: int, H: int, stages: Iterable[str] = (), inputs: dict | None = None) -> pd.DataFrame:
    """One row per head: for each image_head metric with ``summary`` its ``<name>_mean`` and
    ``<name>_std`` over images (population std, ddof=0; NaN where undefined; a vector: the mean
    vector only), every run-level (level="head") metric of these ``stages`` (its hook sees
    ``arrays`` and the engine arrays in ``inputs``, e.g. patch_bits), and n_images."""
    lay, hd = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
    df = pd.DataFrame({"layer": lay.ravel(), "head": hd.ravel()})
    n = 0
    for m in registry.metrics("image_head", names=arrays):
        a = arrays[m.name]
        n = len(a)
        if not m.summary:
            continue
        if m.value == "vector":
            df[f"{m.name}_mean"] = (list(a.mean(axis=0).reshape(L * H, -1).astype(np.float32)) if a.ndim == 4
                                    else [None] * (L * H))
            continue
        a = a.astype(np.float64).reshape(len(a), L * H)
        defined = np.isfinite(a).any(axis=0)
        mean, std = np.full(L * H, np.nan), np.full(L * H, np.nan)
        mean[defined] = np.nanmean(a[:, defined], axis=0)
        std[defined] = np.nanstd(a[:, defined], axis=0)
        df[f"{m.name}_mean"], df[f"{m.name}_std"] = mean, std
    for m in registry.computed_metrics("head", stages):
        values = np.asarray(m.compute.fn({**arrays, **(inputs or {})}))
        df[m.name] = values.reshape(L * H) if m.value != "vector" else list(values.reshape(L * H, -1))
    df["n_images"] = n
    return df


def present_metrics(arrays: dict, summary: pd.DataFrame) -> list[str]:
    """Registry names with at least one value in this run (both levels), in registry order."""
    out = []
    for m in registry.metrics():
        if m.level == "image_head" and m.name in arrays and _has_values(m, np.asarray(arrays[m.name])):
            out.append(m.name)
        elif m.level == "head" and m.name in summary.columns:
            col = summary[m.name]
            if col.notna().any():
                out.append(m.name)
    return out


def patch_maps_table(image_ids: np.ndarray, maps: np.ndarray) -> pd.DataFrame:
    """[n, len(MAPS), gh, gw] maps (NaN = a map the model lacks) -> PATCH_MAP_COLUMNS rows, image-major."""
    rows = [(int(i), name, maps[k, j].ravel().tolist()) for k, i in enumerate(image_ids)
            for j, name in enumerate(MAPS) if not np.isnan(maps[k, j]).all()]
    return pd.DataFrame(rows, columns=list(schema.PATCH_MAP_COLUMNS))


def token_norms_table(image_ids: np.ndarray, norms: np.ndarray) -> pd.DataFrame:
    """[n, L + 1, N] token norms -> TOKEN_NORM_COLUMNS rows (image_id, layer l = 0..L, the N norms), image-major."""
    n, streams = norms.shape[:2]
    return pd.DataFrame({"image_id": np.repeat(np.asarray(image_ids), streams), "layer": np.tile(np.arange(streams), n),
                         "norms": list(np.asarray(norms, np.float32).reshape(n * streams, -1))})


def write_run(run_dir: Path, manifest: dict, images: pd.DataFrame, arrays: dict, *, L: int, H: int,
              layouts: dict | None = None, skipped: pd.DataFrame | None = None, stages: Iterable[str] = (),
              sizes: Callable[[Path], dict] | None = None, inputs: dict | None = None,
              patch_maps: np.ndarray | None = None, token_norms: np.ndarray | None = None) -> dict:
    """Write a complete run: images, head_metrics, head_summary and skipped tables (and patch_maps
    when ``patch_maps`` [n, len(MAPS), gh, gw] is given, token_norms when ``token_norms``
    [n, L + 1, N] float32 is: the caller records f in manifest params.high_norm_factor), then the
    manifest with status "complete",
    ``metrics`` (the registry metrics with values), timings.tables and ``sizes``
    (``sizes(run_dir)``, default {"cache_bytes"}). ``images`` has IMAGE_COLUMNS, one row per image
    in ascending image_id; ``arrays`` {metric name: [n, L, H(, K)]} in the same order; ``inputs``
    engine arrays in the same order for run-level hooks only (``patch_bits``). Returns the manifest."""
    run_dir = Path(run_dir)
    ids = images["image_id"].to_numpy()
    if len(ids) and np.any(np.diff(ids) <= 0):
        raise ValueError("write_run needs the images in ascending, unique image_id order.")
    unknown = [k for k in arrays if k not in {m.name for m in registry.metrics("image_head")}]
    if unknown:
        raise ValueError(f"write_run got arrays {unknown} that are not registered image_head metrics.")
    for name, a in arrays.items():
        if np.asarray(a).shape[:3] != (len(ids), L, H):
            raise ValueError(f"metric {name}: shape {np.asarray(a).shape}, expected ({len(ids)}, {L}, {H}, ...).")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN heads (e.g. no SIFT keypoints)
        summary = summary_table(arrays, L, H, stages, inputs)
    write_table(run_dir / "images.parquet", images, schema.IMAGE_COLUMNS)
    write_table(run_dir / "head_metrics.parquet", head_table(ids, arrays, L, H, layouts), schema.head_columns(arrays))
    write_table(run_dir / "head_summary.parquet", summary, schema.summary_columns(list(arrays) + list(summary.columns)))
    skipped = skipped if skipped is not None else pd.DataFrame(columns=list(schema.SKIPPED_COLUMNS))
    write_table(run_dir / "skipped.parquet", skipped, schema.SKIPPED_COLUMNS)
    if patch_maps is not None:
        write_table(run_dir / schema.PATCH_MAPS_FILE, patch_maps_table(ids, patch_maps), schema.PATCH_MAP_COLUMNS)
    if token_norms is not None:
        if np.asarray(token_norms).shape[:2] != (len(ids), L + 1):
            raise ValueError(f"token_norms: shape {np.asarray(token_norms).shape}, expected ({len(ids)}, {L + 1}, N).")
        write_table(run_dir / schema.TOKEN_NORMS_FILE, token_norms_table(ids, token_norms), schema.TOKEN_NORM_COLUMNS)
    manifest = {**manifest, "schema_version": schema.SCHEMA_VERSION, "metrics": present_metrics(arrays, summary),
                "status": "complete"}
    manifest["timings"] = {**manifest.get("timings", {}), "tables": round(time.perf_counter() - start, 3)}
    measure = sizes or (lambda d: {"cache_bytes": int(sum(p.stat().st_size for p in d.rglob("*") if p.is_file()))})
    manifest["sizes"] = measure(run_dir)
    write_json(run_dir / "manifest.json", manifest)
    manifest["sizes"] = measure(run_dir)  # include the manifest itself
    write_json(run_dir / "manifest.json", manifest)
    return manifest
