"""Reading runs: ``open_run`` / ``list_runs`` and ``Run`` (tables, dense metric arrays, thumbnails).

The app and users read runs only through this module. ``Run.dense(name)`` gives any registry
metric as ``[images, L, H]`` (``[images, L, H, K]`` for a vector), rows in the order of
``Run.images``; ``L`` and ``H`` come from the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import threading
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.errors import CacheError
from analysis.metrics import registry
from analysis.metrics.patterns import PATTERN_METRICS
from analysis.paths import default_cache_dir
from analysis.reprs import run_html
from analysis.metrics.paths import check_via
from analysis.runs.schema import (CIRCUIT_EDGES_FILE, CIRCUIT_MEAN_FILE, HEAD_KEYS, IMAGE_COLUMNS, PATCH_MAPS_FILE,
                                  REQUIRED_COLUMNS, SCHEMA_VERSION, SKIPPED_COLUMNS, SUMMARY_KEYS, TOKEN_NORMS_FILE,
                                  head_columns, summary_columns)


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
        version = self.manifest.get("schema_version") if isinstance(self.manifest, dict) else None
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise CacheError(f"Run {self.path.name} was built by a newer HeadScope (cache schema v{version}; this one "
                             f"reads v{SCHEMA_VERSION}). Upgrade HeadScope to open it.")
        if version != SCHEMA_VERSION:
            raise CacheError(f"Run {self.path.name} was built with cache schema v{version}; this HeadScope reads "
                             f"v{SCHEMA_VERSION}. Rebuild it with `{rebuild}` (add the model and data options it was built with).")
        if self.manifest.get("status") != "complete":
            raise CacheError(f"The build of run {self.path.name} has not finished. Resume it with `{rebuild} --resume`.")
        stamp = _tables_stamp(self.path)
        if _checked.get(str(self.path)) != stamp:  # tables unchanged since they last passed: not read again
            schemas = {}
            for name, columns in REQUIRED_COLUMNS.items():
                if not (self.path / name).is_file():
                    raise CacheError(f"Run {self.path.name} lacks {name}. Rebuild it with `{rebuild}`.")
                try:
                    schemas[name] = pq.read_schema(self.path / name)
                except (OSError, pa.ArrowException) as err:
                    raise CacheError(f"{name} of run {self.path.name} is corrupt ({type(err).__name__}: {err}). "
                                     f"Rebuild the run with `{rebuild}`.") from None
                missing = [c for c in columns if c not in schemas[name].names]
                if missing:
                    raise CacheError(f"{name} of run {self.path.name} lacks the columns {', '.join(missing)} (it was "
                                     f"changed or written by another program). Rebuild the run with `{rebuild}`.")
            self._check_tables(schemas)
            _checked[str(self.path)] = stamp
        self._lock = threading.Lock()
        self._dense: dict[str, np.ndarray] = {}

    # ---- the contract a run's tables keep (checked on open, from the Parquet schemas and the keys) ----
    def _table_fix(self) -> str:
        """What to do about a table that breaks the contract: rewrite the tables from the run's parts
        when it has them (and was built by build_cache.py), else rebuild; or restore a backup."""
        if (self.path / "parts").is_dir() and self.manifest.get("build_config"):
            how = (f"write the tables again from the run's parts with `python scripts/build_cache.py --out {self.path} "
                   "--resume --merge`")
        else:
            how = f"rebuild the run with `python scripts/build_cache.py --out {self.path}`"
        return f"Restore the table from a backup, or {how}."

    def _check_tables(self, schemas: dict[str, pa.Schema]) -> None:
        """CacheError naming the table, the column and the fix when a column of a required table has
        the wrong type (strings where numbers belong, ...), or when the ids are not unique or out of
        range: image_id in images, (layer, head) in head_summary. Types come from the Parquet
        schemas (``schemas``: {table: its schema}, read once by the caller); only the key columns are read."""
        expected = {"images.parquet": IMAGE_COLUMNS, "head_metrics.parquet": head_columns(),
                    "head_summary.parquet": summary_columns()}
        for name, columns in expected.items():
            for field in schemas[name]:
                want = columns.get(field.name)
                if want is None:  # a column this HeadScope does not know (a metric registered elsewhere)
                    continue
                key = field.name in HEAD_KEYS or field.name in SUMMARY_KEYS or field.name == "n_images"
                if not _type_fits(field.type, want, nullable=not key):
                    raise CacheError(f"{name} of run {self.name}: column {field.name} holds {field.type} values where "
                                     f"{_kind(want)} values belong (the table was changed or written by another "
                                     f"program). {self._table_fix()}")
        ids = self._keys("images.parquet", ["image_id"]).column(0)
        if ids.null_count:
            raise CacheError(f"images.parquet of run {self.name}: column image_id has {ids.null_count} empty "
                             f"value(s). {self._table_fix()}")
        values, counts = np.unique(ids.to_numpy(), return_counts=True)
        if (counts > 1).any():
            twice = ", ".join(str(int(v)) for v in values[counts > 1][:5])
            raise CacheError(f"images.parquet of run {self.name}: column image_id repeats ids ({twice}"
                             f"{', ...' if (counts > 1).sum() > 5 else ''}); each image must appear once. "
                             f"{self._table_fix()}")
        keys = self._keys("head_summary.parquet", list(SUMMARY_KEYS))
        if keys.num_rows:
            if any(c.null_count for c in keys.columns):
                raise CacheError(f"head_summary.parquet of run {self.name}: columns layer / head have empty "
                                 f"values. {self._table_fix()}")
            layer, head = (keys.column(c).to_numpy().astype(np.int64) for c in SUMMARY_KEYS)
            try:
                L, H = self.L, self.H
            except (KeyError, TypeError, ValueError):
                raise CacheError(f"The manifest of run {self.name} lacks model.depth / model.heads. "
                                 f"Rebuild the run with `python scripts/build_cache.py --out {self.path}`.") from None
            if layer.min() < 0 or layer.max() >= L or head.min() < 0 or head.max() >= H:
                raise CacheError(f"head_summary.parquet of run {self.name}: columns layer / head name heads outside "
                                 f"the model's {L} layers x {H} heads. {self._table_fix()}")
            if len(np.unique(layer * H + head)) != len(layer):
                raise CacheError(f"head_summary.parquet of run {self.name}: columns layer / head repeat heads; "
                                 f"each head must appear once. {self._table_fix()}")

    def _keys(self, name: str, columns: list[str]) -> pa.Table:
        """The key ``columns`` of table ``name``; CacheError saying "rebuild" when they cannot be read."""
        try:
            return pq.read_table(self.path / name, columns=columns)
        except (OSError, pa.ArrowException) as err:
            raise CacheError(f"{name} of run {self.name} is corrupt ({type(err).__name__}: {err}). "
                             f"{self._table_fix()}") from None

    @property
    def name(self) -> str:
        return self.path.name

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, model={self.model.get('name')!r}, images={len(self.images)})"

    def _repr_html_(self) -> str:
        """The run's summary in Jupyter (analysis.reprs.run_html)."""
        return run_html(self)

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
        return self._read("images.parquet").reset_index(drop=True)

    @cached_property
    def head_metrics(self) -> pd.DataFrame:
        """One row per (image, layer, head), sorted by image_id, layer, head."""
        return self._read("head_metrics.parquet")

    @cached_property
    def head_columns(self) -> list[str]:
        """The columns of head_metrics (from the Parquet schema: no data read)."""
        import pyarrow.parquet as pq

        return list(pq.read_schema(self.path / "head_metrics.parquet").names)

    def _head_frame(self, cols: list[str]) -> pd.DataFrame:
        """Some head_metrics columns, read alone unless the whole table is already loaded."""
        if "head_metrics" in self.__dict__:
            return self.head_metrics[cols]
        return pd.read_parquet(self.path / "head_metrics.parquet", columns=cols)

    def _head_column(self, col: str) -> pd.Series:
        return self._head_frame([col])[col]

    @cached_property
    def head_summary(self) -> pd.DataFrame:
        return self._read("head_summary.parquet")

    @cached_property
    def skipped(self) -> pd.DataFrame:
        p = self.path / "skipped.parquet"
        return self._read("skipped.parquet") if p.is_file() else pd.DataFrame(columns=list(SKIPPED_COLUMNS))

    def _read(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """A table of the run (only ``columns`` when given); CacheError saying "rebuild" when unreadable."""
        try:
            return pd.read_parquet(self.path / name, columns=columns)
        except (OSError, pa.ArrowException) as err:
            raise CacheError(f"{name} of run {self.path.name} cannot be read ({type(err).__name__}: {err}). "
                             f"Rebuild the run with `python scripts/build_cache.py --out {self.path}`.") from None

    @property
    def has_patch_maps(self) -> bool:
        """Whether the run was built with the "patch_maps" stage (precomputed maps per image)."""
        return (self.path / PATCH_MAPS_FILE).is_file()

    @cached_property
    def _patch_maps(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / PATCH_MAPS_FILE) if self.has_patch_maps else pd.DataFrame()

    def patch_maps(self, image_id: int) -> dict[str, np.ndarray] | None:
        """The precomputed maps of one image, {name: float32 [gh, gw]} (SPEC "Patch attribution");
        None when the run has none for it."""
        table = self._patch_maps
        if table.empty:
            return None
        rows = table[table["image_id"] == int(image_id)]
        if rows.empty:
            return None
        gh, gw = (int(g) for g in self.model["grid"])
        return {r.map: np.asarray(r.values, np.float32).reshape(gh, gw) for r in rows.itertuples()}

    # ---- token norms (SPEC v3 "attention sinks"): computed by the image stage ------------------------
    @property
    def has_token_norms(self) -> bool:
        """Whether the run stores its images' token norms (runs built before them do not)."""
        return (self.path / TOKEN_NORMS_FILE).is_file()

    @cached_property
    def _token_norms(self) -> dict[int, np.ndarray]:
        table = self._read(TOKEN_NORMS_FILE).sort_values(["image_id", "layer"], kind="stable")
        return {int(i): np.stack(rows["norms"].to_numpy()).astype(np.float32)
                for i, rows in table.groupby("image_id", sort=False)}

    def image_row(self, image_id: int) -> int | None:
        """The row of image ``image_id`` in ``images`` (the first axis of ``dense``); None when the run lacks it."""
        rows = np.flatnonzero(self.images.image_id.to_numpy() == int(image_id))
        return int(rows[0]) if len(rows) else None

    def token_norms(self, image_id: int) -> np.ndarray | None:
        """The L2 norms of one image's tokens in the residual stream, float32 [L + 1, N]: row l = block l's
        input (row L: after the last block, before the final norm), columns = the N tokens, prefix
        tokens first, then the patches row-major. High-norm patch tokens of block l: norms[l, T:] >
        f x their median, f = ``manifest["params"]["high_norm_factor"]``. None for an image the run
        lacks; CacheError saying how to add them when the run has no token norms."""
        if not self.has_token_norms:
            raise CacheError(self.lacks("token_norms"))
        return self._token_norms.get(int(image_id))

    # ---- circuits: the "circuits" stage (analysis.runs.circuits), APPROXIMATE EAP edges ----------
    @property
    def has_circuits(self) -> bool:
        """Whether the run was built with (or given) the "circuits" stage: its tables and manifest entry."""
        return ("circuits" in self.manifest and (self.path / CIRCUIT_EDGES_FILE).is_file()
                and (self.path / CIRCUIT_MEAN_FILE).is_file())

    def lacks_circuits(self) -> str | None:
        """Why this run has no stored circuits and how to add them; None when it has them."""
        if self.has_circuits:
            return None
        if not self.model.get("num_classes"):
            return (f"Run {self.name} is a backbone run: stored circuits are edge attribution patching scores, which "
                    "estimate path_logit and need a classifier. A backbone's head-to-head paths are the exact "
                    "path_emb, computed per image (analysis.head_paths(..., method='exact')).")
        return (f"Run {self.name} was built without the circuits stage. Add it without recomputing the rest "
                f"(about a second per 10 images, plus the exact check of a few): python scripts/build_cache.py "
                f"--out {self.path} --add-circuits")

    def _circuit_table(self, name: str) -> pd.DataFrame:
        problem = self.lacks_circuits()
        if problem:
            raise CacheError(problem)
        table = self._read(name)
        table["via"] = table["via"].astype("category")
        return table

    @cached_property
    def _circuit_edges(self) -> tuple[pd.DataFrame, dict]:
        table = self._circuit_table(CIRCUIT_EDGES_FILE)
        return table, table.groupby(["image_id", "via"], observed=True).indices

    def circuit_edges(self, image_id: int, via: str = "qkv") -> pd.DataFrame:
        """The stored edges a -> b of one image, via "q", "k", "v" or "qkv": columns a_layer,
        a_head, b_layer, b_head, path_logit_eap (APPROXIMATE, logit units, signed), sorted by
        |path_logit_eap| descending; only edges with |path_logit_eap| >= manifest["circuits"]
        ["threshold"] x the image's largest for that via (empty for an image the run lacks).
        CacheError saying how to add them when the run has no circuits."""
        check_via(via)
        table, index = self._circuit_edges
        rows = table.iloc[index.get((int(image_id), via), [])]
        return self._edge_frame(rows)

    def circuit_mean(self, via: str = "qkv") -> pd.DataFrame:
        """The run-mean circuit, via "q", "k", "v" or "qkv": every edge a -> b (a_layer < b_layer)
        with columns a_layer, a_head, b_layer, b_head, path_logit_eap (APPROXIMATE: the mean over
        manifest["circuits"]["images"] images), sorted by |path_logit_eap| descending. CacheError
        saying how to add them when the run has no circuits."""
        check_via(via)
        table = self._circuit_mean
        return self._edge_frame(table[table["via"] == via])

    @cached_property
    def _circuit_mean(self) -> pd.DataFrame:
        return self._circuit_table(CIRCUIT_MEAN_FILE)

    @staticmethod
    def _edge_frame(rows: pd.DataFrame) -> pd.DataFrame:
        order = np.argsort(-np.abs(rows["path_logit_eap"].to_numpy()), kind="stable")
        cols = ["a_layer", "a_head", "b_layer", "b_head", "path_logit_eap"]
        return rows.iloc[order][cols].reset_index(drop=True)

    @property
    def circuit_agreement(self) -> dict | None:
        """manifest["circuits"]["agreement"]: Spearman of EAP with exact path patching over the edges
        of each image of a seeded sample (via, images, image_ids, per_image, per_image_median,
        per_image_q25, per_image_q75); None without circuits."""
        return (self.manifest.get("circuits") or {}).get("agreement")

    @cached_property
    def metrics(self) -> list[str]:
        """Registry metrics this run has values for, in registry order (backbone runs lack prob/jsd):
        those its manifest lists under "metrics" (all, for runs written before that key existed)
        that have a value in the tables."""
        listed = self.manifest.get("metrics")
        hs, cols = self.head_summary, self.head_columns
        # only the columns looked at are read; a vector column the manifest lists (slow to read) is trusted
        check = [m.name for m in registry.metrics("image_head", names=listed)
                 if m.name in cols and (m.value != "vector" or listed is None)]
        present = self._head_frame(check).notna().any() if check else pd.Series(dtype=bool)
        return [m.name for m in registry.metrics(names=listed)
                if (m.level == "image_head" and m.name in cols and (m.name not in check or present[m.name]))
                or (m.level == "head" and m.name in hs.columns and hs[m.name].notna().any())]

    def metrics_of(self, *, importance: bool | None = None, value: str | None = None,
                   level: str | None = None) -> list[registry.Metric]:
        """This run's metrics as registry entries, filtered like ``registry.metrics``."""
        return registry.metrics(level, value=value, importance=importance, names=self.metrics)

    @cached_property
    def _positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(row position in ``images``, head index layer*H+head) of every head_metrics row that belongs to an image."""
        hm = self._head_frame(["image_id", "layer", "head"])
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
        if name not in self.head_columns:
            raise CacheError(self.lacks(name))
        return self._column(name, m.value)

    def lacks(self, name: str) -> str | None:
        """Why this run has no values of metric ``name`` (or of its ``"token_norms"``) and how to add
        them; None when it has them."""
        if name == "token_norms":
            return None if self.has_token_norms else (
                f"Run {self.name} was built before the image stage stored token norms. Rebuild it into a new folder "
                f"to add them (and the direct-effect and attention-sink metrics): {self.build_command()}")
        if name in self.metrics:
            return None
        if name in PATTERN_METRICS:
            return (f"Run {self.name} was built before the pattern labels existed. Add them without recomputing "
                    f"the rest: python scripts/build_cache.py --out {self.path} --add-pattern-labels")
        m = registry.get_metric(name)
        kind = "classifier" if self.model.get("num_classes") else "backbone"
        if kind not in m.applies_to:
            return f"{name} is defined for {' and '.join(sorted(m.applies_to))} models; run {self.name}'s model is a {kind}."
        if m.needs_label and not (self.images["label"] >= 0).any():
            return f"{name} needs the images' true labels, and no image of run {self.name} has one."
        if m.stage:
            flag = "--" + m.stage.replace("_", "-")
            return (f"Run {self.name} was built without the {m.stage} stage, which computes {name}. Rebuild it with "
                    f"the stage into a new folder: {self.build_command()} {flag}")
        return (f"Run {self.name} was built before HeadScope computed {name} (the image stage computes it by default "
                f"now). Rebuild it into a new folder to add it: {self.build_command()}")

    def build_command(self, out: str | Path | None = None) -> str:
        """The build_cache.py command that builds this run's model, images and stages again, into
        ``out`` (default: this run's folder + "-new")."""
        cfg = self.manifest.get("build_config") or {}
        out = str(out or f"{self.path}-new")
        if not cfg.get("model"):
            return (f"python scripts/build_cache.py --out {shlex.quote(out)} (with the model and image options this "
                    "run was built with)")
        opts = [("--model", cfg["model"]), ("--weights", cfg.get("weights")), ("--img-size", cfg.get("img_size")),
                (dataset_flag(cfg.get("dataset"), cfg.get("dataset_kind")), cfg.get("dataset")), ("--labels", cfg.get("labels")), ("--limit", cfg.get("limit"))]
        args = ["--out", out] + [str(a) for flag, value in opts if value is not None for a in (flag, value)]
        args += ["--pretrained"] * bool(cfg.get("pretrained"))
        args += ["--" + stage.replace("_", "-") for stage in cfg.get("stages") or ()]
        return "python scripts/build_cache.py " + shlex.join(args)

    def layout(self, kind: str) -> np.ndarray | None:
        """The 2-D pattern layout ``kind`` ("cls" or "patch") as [images, L, H, 2]; None when empty."""
        cols = [f"{kind}_x", f"{kind}_y"]
        if not all(c in self.head_columns and self._head_column(c).notna().any() for c in cols):
            return None
        return np.stack([self._column(c, "scalar") for c in cols], axis=-1)

    def _column(self, col: str, value: str) -> np.ndarray:
        with self._lock:
            if col in self._dense:
                return self._dense[col]
        n, L, H = len(self.images), self.L, self.H
        keep, flat = self._positions
        series = self._head_column(col)
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

    def file(self, relative: str) -> Path | None:
        """The run's regular file at ``relative`` (e.g. "thumbs/3.png"), resolved (links followed), or
        None when it is missing, not a regular file, or lies outside the resolved run directory (a
        link out of the run): what the app may send or read from a run goes through here."""
        root = self.path.resolve()
        try:
            target = (root / relative).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a link loop
            return None
        return target if target.is_relative_to(root) and target.is_file() else None

    def thumbnail(self, image_id: int) -> Path:
        """Path of an image's thumbnail PNG (it may be missing: check ``.is_file()``; to send or read
        it, use ``thumbnail_file``, which refuses links out of the run)."""
        return self.path / "thumbs" / f"{int(image_id)}.png"

    def thumbnail_file(self, image_id: int) -> Path | None:
        """The thumbnail PNG of an image as a resolved file inside the run; None when missing, not a
        file, or a link out of the run (see ``file``)."""
        return self.file(f"thumbs/{int(image_id)}.png")

    def open_thumbnail(self, image_id: int):
        """The thumbnail as a PIL image; CacheError when the run lacks it (or it lies outside the run)."""
        from PIL import Image

        try:
            path = self.thumbnail_file(image_id)
            if path is None:
                raise FileNotFoundError
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError:
            raise CacheError(f"The thumbnail of image {int(image_id)} is missing from run {self.name}. "
                             "Rebuild the run to restore it.") from None


def dataset_flag(dataset: str | None, kind: str | None) -> str:
    """The build_cache.py option that names an image set of a build config (its dataset and dataset_kind)."""
    if kind in ("folder", "manifest"):
        return "--images" if kind == "folder" else "--manifest"
    if dataset in ("fashion", "photos"):
        return "--dataset"
    return "--manifest" if str(dataset).lower().endswith(".csv") else "--images"


def _kind(t: pa.DataType) -> str:
    """What a column of type ``t`` holds, in words: "integer", "number", "text", "list of numbers", ..."""
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _kind(t.value_type)
        return f"list of {'number' if inner == 'integer' else inner}s"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def _type_fits(found: pa.DataType, want: pa.DataType, nullable: bool = True) -> bool:
    """Whether a column stored as ``found`` reads as the schema's ``want``: the same kind (any width;
    integers where numbers belong), or an all-empty (null) column where ``nullable``."""
    have, need = _kind(found), _kind(want)
    if have == "null":
        return nullable
    if need == "number":
        return have in ("number", "integer")
    if need == "list of numbers":
        return have == "list of numbers"
    return have == need


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


# ---- a run's name and identity (the app, the worker and every online cache key on these) -------
RUN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_RUN_NAME = 128  # characters in a run name (file systems allow 255 bytes)
_fingerprints: dict[str, tuple[tuple, str]] = {}
# {run directory: _tables_stamp when its tables last passed the open checks}: list_runs and the pages
# open runs on every request, and the key columns are read again only when a table or the manifest changed.
_checked: dict[str, tuple] = {}


def _tables_stamp(path: Path) -> tuple:
    """The stat of the manifest and the required tables (inode, size, mtime, ctime; None if missing)."""
    out = []
    for name in ("manifest.json", *REQUIRED_COLUMNS):
        try:
            st = os.stat(path / name)
            out.append((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def run_name_problem(name) -> str | None:
    """Why ``name`` cannot be a run name (None when it can): one directory name under the cache
    dir of letters, digits and ._- , at most MAX_RUN_NAME characters, not . or .."""
    if not isinstance(name, str) or not name:
        return "A run name is required."
    if len(name) > MAX_RUN_NAME:
        return f"Run name too long ({len(name)} characters; at most {MAX_RUN_NAME})."
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        return f"{name!r} is not a run name: use letters, digits, '.', '_' and '-' only."
    return None


def valid_run_name(name) -> bool:
    return run_name_problem(name) is None


def run_fingerprint(path: str | Path) -> str | None:
    """The identity of the run in ``path``: a hash of its manifest's bytes (16 hex digits), or
    None without a readable manifest. Replacing or rebuilding a run in place changes it (the
    manifest records the model, the images and the build time), so caches keyed on it never serve
    another run's numbers. Re-hashed only when the manifest file's stat changes."""
    mf = os.path.join(os.path.abspath(path), "manifest.json")
    try:
        st = os.stat(mf)
    except OSError:
        return None
    stamp = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _fingerprints.get(mf)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with open(mf, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None
    _fingerprints[mf] = (stamp, digest)
    return digest
