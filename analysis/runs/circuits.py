"""The optional ``circuits`` build stage (SPEC "Beyond the paper (v3)", head-to-head paths).

For every analysed image of a classifier run, the APPROXIMATE edge attribution patching score
``path_logit_eap`` (analysis.metrics.paths.eap_scores: one forward and one backward per batch) of
every edge a -> b (a_layer < b_layer), via q, k, v and qkv (= q + k + v), for y = the image's true
class, or its top-1 class where it has no label. Written to (columns in analysis.runs.schema):

- ``circuit_edges.parquet`` (CIRCUIT_EDGE_COLUMNS): per image and via, the edges with
  ``|path_logit_eap| >= EDGE_THRESHOLD x`` the largest ``|path_logit_eap|`` of that image and via;
- ``circuit_mean.parquet`` (CIRCUIT_MEAN_COLUMNS): the run-mean circuit, every edge's mean over
  the images (all edges, per via);
- ``manifest["circuits"]``: the rule, the counts, and the Spearman agreement of EAP with exact path
  patching over the edges of each image of a seeded sample (``agreement_images`` images, via qkv):
  median and quartiles over the sample, its image ids.

Resumable: each EAP batch is kept as ``parts/circuits_<first id>.npz`` (its kept edges and the sums
of its scores), each sampled image's agreement as ``parts/circuit_exact_<id>.json``.
Backbones have no circuits stage: EAP estimates path_logit, which needs a classifier (SPEC:
backbones have the exact path_emb only, computed per image online).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from analysis.errors import InputError
from analysis.metrics.paths import VIAS, eap_scores, head_paths
from analysis.metrics.taylor import per_image_spread, spearman
from analysis.runs import tables
from analysis.runs.batches import load_batch, parts_dir
from analysis.runs.schema import CIRCUIT_EDGE_COLUMNS, CIRCUIT_EDGES_FILE, CIRCUIT_MEAN_COLUMNS, CIRCUIT_MEAN_FILE

# Edges kept per image and via: |score| >= 5% of the image's largest |score| for that via. A circuit
# drawing scales an edge's width with |score| / the largest, so a dropped edge would be under half a
# pixel wide beside an 8-px widest one. On the default model this keeps ~40% of the 2376 edges per
# via (manifest["circuits"]["kept_fraction"]), ~84% of their summed |score|, at ~25 KB per image
# (1% would keep 81%, twice the bytes). Every edge of an image is one online EAP call (~70 ms) away.
EDGE_THRESHOLD = 0.05
AGREEMENT_VIA = "qkv"           # the default via, the sum of the three
# Default exact-agreement sample (BuildConfig.circuit_sample, --circuit-sample): exact path patching
# of all 2376 edges costs ~5.6 s per image on the default model (2 idle cores), and the per-image
# Spearman varies little between images (interquartile range 0.003-0.007 on the default run), so 3
# images give the median to about +-0.005.
AGREEMENT_IMAGES = 3


def edge_index(L: int, H: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a_layer, a_head, b_layer, b_head) of every edge a -> b with a_layer < b_layer, in
    head_paths' order (sender-major, then receiver); each int64 [E], E = H^2 L (L - 1) / 2."""
    a_l, a_h, b_l, b_h = np.meshgrid(np.arange(L), np.arange(H), np.arange(L), np.arange(H), indexing="ij")
    keep = (a_l < b_l).ravel()
    return tuple(v.ravel()[keep] for v in (a_l, a_h, b_l, b_h))


def edge_values(scores: np.ndarray) -> np.ndarray:
    """eap_scores' [B, 3 (q, k, v), L, H (receiver), L, H (sender)] -> [B, 4 (VIAS), E] in edge_index order."""
    B, _, L, H = scores.shape[:4]
    a_l, a_h, b_l, b_h = edge_index(L, H)
    per_part = scores[:, :, b_l, b_h, a_l, a_h]                                # [B, 3, E]
    return np.concatenate([per_part, per_part.sum(1, keepdims=True)], axis=1)


def kept_edges(values: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """bool [..., E]: |value| >= threshold x the largest |value| along the last axis (and not 0)."""
    size = np.abs(values)
    return (size >= threshold * size.max(-1, keepdims=True)) & (size > 0)


def batch_values(vit, x, labels: np.ndarray) -> np.ndarray:
    """EAP values [b, 4 (VIAS), E] of a batch x [b, 3, H, W] (b may be 0: x None) for y = the
    label, the top-1 class where the label is -1 (unknown)."""
    import torch

    scores = np.zeros((len(labels), 3) + (vit.depth, vit.num_heads) * 2)
    for rows in (np.flatnonzero(labels >= 0), np.flatnonzero(labels < 0)):
        if len(rows):
            given = torch.as_tensor(labels[rows]) if labels[rows[0]] >= 0 else None
            scores[rows] = eap_scores(vit, x[torch.as_tensor(rows)], given)[0]
    return edge_values(scores)


def _read_batch(path, ids: list[int]) -> dict | None:
    """A saved EAP batch when it is for exactly these ids and this threshold, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None
    if part["ids"].tolist() != ids or float(part["threshold"]) != EDGE_THRESHOLD:
        return None
    return part


def eap_batches(ctx, ids: np.ndarray, timer) -> tuple[pd.DataFrame, np.ndarray, int]:
    """Every image's EAP edges, batch by batch (reusing the saved batches) -> (the kept edges in
    CIRCUIT_EDGE_COLUMNS, the sums over images [4, E] float64, the number of images)."""
    L, H, size = ctx.vit.depth, ctx.vit.num_heads, ctx.config.batch_size
    a_l, a_h, b_l, b_h = edge_index(L, H)
    bar = timer.bar(f"circuits: EAP of every edge ({len(ids)} images)", len(ids), unit="img")
    frames, total, count = [], np.zeros((len(VIAS), len(a_l))), 0
    for s in range(0, len(ids), size):
        batch = [int(i) for i in ids[s:s + size]]
        path = parts_dir(ctx.run_dir) / f"circuits_{batch[0]:06d}.npz"
        part = _read_batch(path, batch)
        if part is None:
            ok, x, _, _ = load_batch(ctx, batch)
            values = batch_values(ctx.vit, x, np.array([ctx.image_set.items[i].label for i in ok], np.int64))
            image, via, edge = np.nonzero(kept_edges(values))
            part = {"ids": np.asarray(batch, np.int64), "threshold": np.float64(EDGE_THRESHOLD),
                    "image_ids": np.asarray(ok, np.int64), "sums": values.sum(0),
                    "image": np.asarray(ok, np.int64)[image], "via": via.astype(np.int8), "edge": edge,
                    "value": values[image, via, edge].astype(np.float32)}
            buf = io.BytesIO()
            np.savez_compressed(buf, **part)
            tables.atomic_write_bytes(path, buf.getvalue())
        e = part["edge"]
        frames.append(pd.DataFrame({"image_id": part["image"], "a_layer": a_l[e], "a_head": a_h[e], "b_layer": b_l[e],
                                    "b_head": b_h[e], "via": np.asarray(VIAS)[part["via"]],
                                    "path_logit_eap": part["value"]}))
        total += part["sums"]
        count += len(part["image_ids"])
        timer.advance(bar, min(s + size, len(ids)), len(ids))
    bar.close()
    edges = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CIRCUIT_EDGE_COLUMNS))
    return edges, total, count


def mean_table(sums: np.ndarray, count: int, L: int, H: int) -> pd.DataFrame:
    """The run-mean circuit: every edge and via, path_logit_eap = its mean over ``count`` images."""
    a_l, a_h, b_l, b_h = edge_index(L, H)
    E = len(a_l)
    return pd.DataFrame({"a_layer": np.tile(a_l, len(VIAS)), "a_head": np.tile(a_h, len(VIAS)),
                         "b_layer": np.tile(b_l, len(VIAS)), "b_head": np.tile(b_h, len(VIAS)),
                         "via": np.repeat(VIAS, E), "path_logit_eap": (sums / max(count, 1)).ravel()})


def agreement_sample(ids: np.ndarray, size: int, seed: int) -> list[int]:
    """A seeded sample of ``size`` image ids (all when fewer), ascending."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(ids, size=min(size, len(ids)), replace=False))


def image_agreement(vit, image, label: int | None, via: str = AGREEMENT_VIA) -> dict:
    """Spearman of EAP with exact path patching over every edge of one image: {"spearman", "edges"}."""
    exact = head_paths(vit, image, label, via=via)
    eap = head_paths(vit, image, label, via=via, method="eap")
    return {"spearman": spearman(exact["path_logit"].to_numpy(), eap["path_logit_eap"].to_numpy()),
            "edges": len(exact)}


def _read_json(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or cut short: compute it again
        return None


def agreement(ctx, sample: list[int], timer) -> dict:
    """SPEC agreement of EAP with exact over the sample (one saved result per image, reused)."""
    via = AGREEMENT_VIA
    bar = timer.bar(f"circuits: exact path patching of every edge ({len(sample)} sampled images)", len(sample),
                    unit="img")
    rhos, edges = [], 0
    for n, i in enumerate(sample):
        path = parts_dir(ctx.run_dir) / f"circuit_exact_{i:06d}.json"
        saved = _read_json(path)
        if saved is None or saved.get("via") != via or saved.get("image_id") != i:
            ok, x, _, _ = load_batch(ctx, [i])
            label = ctx.image_set.items[i].label
            saved = {"image_id": i, "via": via, **image_agreement(ctx.vit, x[0], label if label >= 0 else None, via)}
            tables.write_json(path, saved)
        rhos.append(saved["spearman"])
        edges = saved["edges"]
        timer.advance(bar, n + 1, len(sample))
    bar.close()
    return {"via": via, "images": len(sample), "image_ids": sample, "edges_per_image": edges,
            "per_image": [float(r) for r in rhos], **per_image_spread(rhos)}


def circuits_stage(ctx, ids: np.ndarray, timer) -> dict:
    """Compute (resuming) and write the circuit tables of a classifier run for images ``ids``;
    returns manifest["circuits"]. ``timer``: the build's stage timer (bars, timings)."""
    vit = ctx.vit
    if not vit.has_head:
        raise InputError(backbone_note(vit.name))
    L, H = vit.depth, vit.num_heads
    edges, sums, count = timer.timed("circuits_eap", eap_batches, ctx, np.asarray(ids), timer)
    sample = agreement_sample(np.asarray(ids), ctx.config.circuit_sample, ctx.config.seed)
    checked = timer.timed("circuits_exact", agreement, ctx, sample, timer)
    tables.write_table(ctx.run_dir / CIRCUIT_EDGES_FILE, edges, CIRCUIT_EDGE_COLUMNS)
    tables.write_table(ctx.run_dir / CIRCUIT_MEAN_FILE, mean_table(sums, count, L, H), CIRCUIT_MEAN_COLUMNS)
    E = len(edge_index(L, H)[0])
    kept = edges.groupby("via").size().reindex(VIAS, fill_value=0) / max(count * E, 1)
    return {"edges_file": CIRCUIT_EDGES_FILE, "mean_file": CIRCUIT_MEAN_FILE,
            "method": "eap (edge attribution patching, APPROXIMATE)", "vias": list(VIAS), "images": count,
            "edges_per_image": E, "target": "the true class; the top-1 class where the image has no label",
            "threshold": EDGE_THRESHOLD,
            "threshold_rule": "per image and via: |path_logit_eap| >= threshold x the largest |path_logit_eap|",
            "kept_fraction": {v: round(float(f), 4) for v, f in kept.items()}, "agreement": checked}


def backbone_note(model: str) -> str:
    return (f"{model} is a backbone without a classifier head: the circuits stage stores edge attribution "
            "patching (EAP) scores, which estimate path_logit and need a classifier. Drop --circuits; a "
            "backbone's head-to-head paths are the exact path_emb (analysis.head_paths(..., method='exact')), "
            "computed per image.")


def summary_lines(manifest: dict) -> list[str]:
    """Build-summary lines of the circuits stage."""
    c = manifest.get("circuits")
    if not c:
        return []
    a = c["agreement"]
    kept = ", ".join(f"{v} {f:.0%}" for v, f in c["kept_fraction"].items())
    return [f"  circuits: EAP edges of {c['images']} images (kept {kept} of {c['edges_per_image']} edges per image "
            f"at |score| >= {c['threshold']:g} x the largest); agreement with exact (Spearman over the edges, via "
            f"{a['via']}, {a['images']} images): median {a['per_image_median']:.3f} "
            f"[q25 {a['per_image_q25']:.3f}, q75 {a['per_image_q75']:.3f}]"]
