"""The run format: file names, fixed columns and the columns derived from the metric registry.

A run directory ``cache/RUN/`` holds:
  manifest.json         schema_version, status ("complete" once every stage finished), model
                        (depth = L, heads = H, ...), dataset, params, metrics (the registry metrics
                        it has values for), versions, timings (s per stage), sizes (bytes), ...
  images.parquet        one row per image             (IMAGE_COLUMNS)
  head_metrics.parquet  one row per image x head      (HEAD_KEYS, a column per image_head metric, LAYOUT_COLUMNS)
  head_summary.parquet  one row per head              (SUMMARY_KEYS, Metric.summary_columns(), n_images)
  skipped.parquet       files that could not be read  (SKIPPED_COLUMNS)
  patch_maps.parquet    one row per image x patch map (PATCH_MAP_COLUMNS; only runs built with the
                        "patch_maps" stage): the map's gh x gw values, row-major (SPEC "Patch attribution")
  circuit_edges.parquet one row per image x via x kept edge a -> b (CIRCUIT_EDGE_COLUMNS; only runs built
                        with the "circuits" stage, analysis.runs.circuits): APPROXIMATE EAP path_logit_eap
  circuit_mean.parquet  one row per via x edge (CIRCUIT_MEAN_COLUMNS): the run-mean circuit
  token_norms.parquet   one row per image x stream l = 0..L (TOKEN_NORM_COLUMNS): the L2 norm of each of
                        the N tokens (prefix first) of block l's input (l = L: after the last block,
                        before the final norm), SPEC v3 "attention sinks"; manifest params.high_norm_factor = f
  thumbs/ID.png         thumbnails the app serves
"""
from __future__ import annotations

import pyarrow as pa

from analysis.columns import HEAD_KEY_NAMES, LAYOUT_COLUMN_NAMES, RESERVED_COLUMNS
from analysis.metrics import registry

SCHEMA_VERSION = 1
IMAGE_COLUMNS = {
    "image_id": pa.int32(), "path": pa.string(), "label": pa.int32(), "label_name": pa.string(),
    "pred": pa.int32(), "prob": pa.float32(),
    "top5_classes": pa.list_(pa.int32()), "top5_probs": pa.list_(pa.float32()),
    "overview_x": pa.float32(), "overview_y": pa.float32(),
}
HEAD_KEYS = {"image_id": pa.int32(), "layer": pa.int16(), "head": pa.int16()}
LAYOUT_COLUMNS = {"cls_x": pa.float32(), "cls_y": pa.float32(), "patch_x": pa.float32(), "patch_y": pa.float32()}
SUMMARY_KEYS = {"layer": pa.int64(), "head": pa.int64()}
SKIPPED_COLUMNS = {"path": pa.string(), "reason": pa.string()}
# The tables open_run requires, with the columns each must have.
REQUIRED_COLUMNS = {"images.parquet": tuple(IMAGE_COLUMNS), "head_metrics.parquet": tuple(HEAD_KEYS),
                    "head_summary.parquet": tuple(SUMMARY_KEYS)}
PATCH_MAPS_FILE = "patch_maps.parquet"
PATCH_MAP_COLUMNS = {"image_id": pa.int32(), "map": pa.string(), "values": pa.list_(pa.float32())}
TOKEN_NORMS_FILE = "token_norms.parquet"
TOKEN_NORM_COLUMNS = {"image_id": pa.int32(), "layer": pa.int16(), "norms": pa.list_(pa.float32())}
CIRCUIT_EDGES_FILE, CIRCUIT_MEAN_FILE = "circuit_edges.parquet", "circuit_mean.parquet"
EDGE_KEYS = {"a_layer": pa.int16(), "a_head": pa.int16(), "b_layer": pa.int16(), "b_head": pa.int16(),
             "via": pa.string()}  # via: "q", "k", "v" or "qkv" (what b reads without a)
CIRCUIT_EDGE_COLUMNS = {"image_id": pa.int32(), **EDGE_KEYS, "path_logit_eap": pa.float32()}
CIRCUIT_MEAN_COLUMNS = {**EDGE_KEYS, "path_logit_eap": pa.float32()}
# The fixed names (and RESERVED_COLUMNS, the names a metric may not take) live in analysis.columns.
assert tuple(HEAD_KEYS) == HEAD_KEY_NAMES and tuple(LAYOUT_COLUMNS) == LAYOUT_COLUMN_NAMES
VALUE_TYPES = {"scalar": pa.float32(), "vector": pa.list_(pa.float32()), "category": pa.string()}
SUMMARY_TYPES = {"scalar": pa.float64(), "vector": pa.list_(pa.float32()), "category": pa.string()}


def head_columns(names=None) -> dict:
    """head_metrics columns and types: keys, one per image_head metric (all registered, or the
    ``names`` a run has), layout coordinates."""
    ms = registry.metrics("image_head", names=names)
    return {**HEAD_KEYS, **{m.name: VALUE_TYPES[m.value] for m in ms}, **LAYOUT_COLUMNS}


def summary_columns(names=None) -> dict:
    """head_summary columns and types (see registry.Metric.summary_columns)."""
    cols = dict(SUMMARY_KEYS)
    for m in registry.metrics(names=names):
        for c in m.summary_columns():
            cols[c] = SUMMARY_TYPES[m.value]
    cols["n_images"] = pa.int64()
    return cols

