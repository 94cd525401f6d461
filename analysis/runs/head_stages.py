"""Optional build stages beyond the paper (SPEC "Beyond the paper"), switched on by build stages:

- ``taylor``: the approximate Taylor metrics (registry stage), ``taylor_only``: the Taylor metrics
  without the exact leave-one-out (for models and data sets where it is too slow; the manifest says
  so in ``importance``);
- ``mean_ablation``: the mean-ablated metrics; the head means over the run's images are a first
  pass (``parts/head_means.npy``, computed once, then shared by every batch, shard and worker);
- ``curves``: cumulative pruning curves (exact, taylor and >= 3 random orders) on up to
  ``curve_images`` labelled images, resumable per image batch (``parts/curves_<first id>.json``),
  written to ``pruning_curves.parquet`` with their areas in ``manifest["pruning_curves"]``;
- ``circuits``: every image's APPROXIMATE EAP head-to-head edges and the run-mean circuit
  (analysis.runs.circuits; classifiers), with the agreement of EAP with exact in ``manifest["circuits"]``.

``--all-stages`` (``BuildConfig.all_stages``) asks for ALL_STAGES, less those the model or data cannot
support (``manifest["stages_skipped"]`` says which and why).

When a run has both prob_drop and the Taylor metrics, ``manifest["taylor_agreement"]`` holds the
SPEC agreement (Spearman over the L*H heads per image: median and quartiles; and of the run means).
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis.errors import HeadScopeError, InputError, LabelError
from analysis.metrics import registry
from analysis.metrics.importance import LEAVE_ONE_OUT
from analysis.runs import circuits, tables
from analysis.runs.batches import batch_plan, load_batch, parts_dir
from analysis.metrics.ablation import head_output_sums
from analysis.metrics.taylor import taylor_agreement as agreement
from analysis.metrics.head_sets import order_by, random_order
from analysis.metrics.head_sets import curve_area, default_steps, heads_before_drop, pruning_curves

EXTRA_STAGES = ("taylor_only", "curves", "circuits")   # build switches that are not metric stages
# What --all-stages asks for: every stage a page of the dashboard shows. patch_maps stays optional: the
# Saliency view computes an image's maps online in about a second, while precomputing them costs ~2 x
# (patches + 1) forwards per image, more than the rest of the default build together.
ALL_STAGES = ("taylor", "mean_ablation", "curves", "circuits")
CURVE_SEEDS = 3
CURVES_FILE = "pruning_curves.parquet"
CURVE_COLUMNS = {"order": pa.string(), "seed": pa.int32(), "k": pa.int32(), "accuracy": pa.float64(),
                 "mean_prob": pa.float64(), "mean_emb_dist": pa.float64()}


def check_stages(stages) -> list[str]:
    """Known, normalised stages (taylor_only implies taylor); InputError naming an unknown one."""
    known = {m.stage for m in registry.metrics() if m.stage} | set(EXTRA_STAGES)
    unknown = sorted(set(stages) - known)
    if unknown:
        raise InputError(f"Unknown build stage(s) {unknown}: use any of {sorted(known)}.")
    stages = set(stages) | ({"taylor"} if "taylor_only" in stages else set())
    return sorted(stages)


def stage_problems(stages, vit, labels) -> dict[str, HeadScopeError]:
    """{stage: the error saying why the model or data cannot support it} for the given stages."""
    problems: dict[str, HeadScopeError] = {}
    if not vit.has_head:
        if "taylor" in stages:
            problems["taylor"] = InputError(
                f"--taylor / --taylor-only need a classifier: {vit.name} is a backbone without a head, so P(y|x) "
                "and its gradient are undefined. Drop the option (backbones use the exact emb_dist).")
        if "circuits" in stages:
            problems["circuits"] = InputError(circuits.backbone_note(vit.name))
    elif not any(l >= 0 for l in labels):
        for stage in ("curves", "taylor"):
            if stage in stages:
                problems[stage] = LabelError(
                    "Pruning curves and the Taylor metrics need true labels, but no image of this data set has "
                    "one. Use a labelled set (class sub-folders or a manifest with labels), or drop the option.")
    return problems


def check_model(stages, vit, labels) -> None:
    """Refuse stages the model or data cannot support, before any image is analysed."""
    for error in stage_problems(stages, vit, labels).values():
        raise error


def drop_unsupported(stages, vit, labels) -> tuple[list[str], dict[str, str]]:
    """--all-stages: (the stages less those the model or data cannot support, {dropped stage: why})."""
    problems = stage_problems(stages, vit, labels)
    dropped = set(problems) | ({"taylor_only"} if "taylor" in problems else set())
    return ([s for s in stages if s not in dropped],
            {s: str(problems.get(s, problems.get("taylor"))) for s in sorted(dropped & set(stages))})


def image_stage_args(ctx) -> dict:
    """Extra analyse_batch arguments of a build's stages: metrics= for taylor_only, options= with the head means."""
    stages, out = ctx.config.stages, {}
    if "taylor_only" in stages:
        out["metrics"] = [m.name for m in registry.computed_metrics("image_head", stages)
                          if m.compute is not LEAVE_ONE_OUT]
    if "mean_ablation" in stages:
        out["options"] = {"head_means": ensure_head_means(ctx)}
    return out


def ensure_head_means(ctx) -> np.ndarray:
    """[L, H, N, d] float32 mean head outputs over the run's readable images (first pass, cached in parts/)."""
    path = parts_dir(ctx.run_dir) / "head_means.npy"
    if path.is_file():
        return np.load(path)
    from tqdm.auto import tqdm

    total, count = None, 0
    plan = batch_plan(len(ctx.image_set.items), ctx.config.batch_size)
    for ids in tqdm(plan, desc="head means (mean ablation)", unit="batch", disable=not ctx.config.progress):
        ok, x, _, _ = load_batch(ctx, ids)
        if ok:
            total, count = head_output_sums(ctx.vit, x, total), count + len(ok)
    means = (total / count).float().cpu().numpy()
    buf = io.BytesIO()
    np.save(buf, means)
    tables.atomic_write_bytes(path, buf.getvalue())
    return means


def taylor_agreement(arrays: dict) -> dict | None:
    """SPEC agreement of taylor_prob_drop and grad_score with the exact prob_drop (images with both)."""
    if not all(k in arrays for k in ("prob_drop", "taylor_prob_drop", "grad_score")):
        return None
    exact = arrays["prob_drop"]
    rows = np.isfinite(exact).all((1, 2)) & np.isfinite(arrays["taylor_prob_drop"]).all((1, 2))
    if not rows.any():
        return None
    return {name: agreement(exact[rows].astype(np.float64), arrays[name][rows].astype(np.float64))
            for name in ("taylor_prob_drop", "grad_score")}


def curve_orders(arrays: dict, L: int, H: int, seed: int, has_head: bool) -> dict[str, list]:
    """SPEC orders: exact (prob_drop, or emb_dist for a backbone), taylor (grad_score), random_<seed> x 3."""
    orders = {}
    for name, col in (("exact", "prob_drop" if has_head else "emb_dist"), ("taylor", "grad_score")):
        a = arrays.get(col)
        if a is not None and np.isfinite(a).any():
            orders[name] = order_by(np.nanmean(a.astype(np.float64), axis=0))
    for s in range(CURVE_SEEDS):
        orders[f"random_{seed + s}"] = random_order(L, H, seed + s)
    return orders


def curves_stage(ctx, arrays: dict, timer) -> tuple[pd.DataFrame, dict]:
    """Cumulative pruning curves of the run (resumable per batch) -> (table rows, manifest entry)."""
    import torch

    cfg, vit = ctx.config, ctx.vit
    L, H = vit.depth, vit.num_heads
    labels = np.array([ctx.image_set.items[i].label for i in arrays["index"]])
    ids = arrays["index"][labels >= 0] if vit.has_head else arrays["index"]
    if vit.has_head and len(ids) == 0:
        raise LabelError("Pruning curves need images with true labels; this run has none. Drop --curves.")
    ids = ids[:cfg.curve_images]
    orders = curve_orders(arrays, L, H, cfg.seed, vit.has_head)
    steps = default_steps(L * H)
    key = hashlib.sha256(json.dumps([orders, steps], sort_keys=True).encode()).hexdigest()[:16]
    bar = timer.bar(f"pruning curves ({len(orders)} orders x {len(steps)} steps, {len(ids)} images)", len(ids), unit="img")
    frames, weights = [], []
    for s in range(0, len(ids), cfg.batch_size):
        batch = [int(i) for i in ids[s:s + cfg.batch_size]]
        path = parts_dir(ctx.run_dir) / f"curves_{batch[0]:06d}.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is None or saved.get("key") != key or saved.get("ids") != batch:
            ok, x, _, _ = load_batch(ctx, batch)
            lab = torch.tensor([ctx.image_set.items[i].label for i in ok]) if vit.has_head else None
            df = pruning_curves(vit, x, lab, orders, steps, batch_size=cfg.batch_size)
            saved = {"key": key, "ids": batch, "n": len(ok), "rows": df.to_dict("records")}
            tables.write_json(path, saved)
        frames.append(pd.DataFrame(saved["rows"]))
        weights.append(saved["n"])
        timer.advance(bar, min(s + cfg.batch_size, len(ids)), len(ids))
    bar.close()
    w = np.asarray(weights, float) / sum(weights)
    value_cols = ["accuracy", "mean_prob"] if vit.has_head else ["mean_emb_dist"]
    curve = frames[0][["order", "k"]].copy()
    for c in value_cols:
        curve[c] = sum(wi * f[c].to_numpy() for wi, f in zip(w, frames))
    for c in ("accuracy", "mean_prob", "mean_emb_dist"):
        curve[c] = curve[c] if c in curve else np.nan
    curve.insert(1, "seed", [int(o.split("_")[1]) if o.startswith("random_") else None for o in curve.order])
    curve["order"] = [o.split("_")[0] for o in curve.order]
    curve["seed"] = curve["seed"].astype("Int32")
    entry = {"file": CURVES_FILE, "images": int(sum(weights)), "steps": steps, "orders": {}}
    for name, group in curve.groupby("order", sort=False):
        per = {}
        for col in value_cols:
            areas = [curve_area(g, col, L * H) for _, g in group.groupby(group.seed.fillna(-1))]
            per[f"area_{col}"] = {"mean": float(np.mean(areas)), "min": float(np.min(areas)), "max": float(np.max(areas))}
        if vit.has_head:
            drops = [heads_before_drop(g) for _, g in group.groupby(group.seed.fillna(-1))]
            per["heads_before_1pt_drop"] = {"mean": float(np.mean(drops)), "min": int(np.min(drops)), "max": int(np.max(drops))}
        per["seeds"] = sorted(int(s) for s in group.seed.dropna().unique()) or None
        entry["orders"][name] = per
    return curve[list(CURVE_COLUMNS)], entry


def merge_extras(ctx, arrays: dict, manifest: dict, timer) -> dict:
    """The run-level parts of these stages: the curves table and the manifest entries."""
    stages = ctx.config.stages
    manifest = dict(manifest)
    manifest["importance"] = {"exact": "taylor_only" not in stages, "taylor": "taylor" in stages,
                              "mean_ablation": "mean_ablation" in stages,
                              "note": ("Taylor metrics only: approximate, no exact leave-one-out"
                                       if "taylor_only" in stages else None)}
    agreement = taylor_agreement(arrays)
    if agreement is not None:
        manifest["taylor_agreement"] = agreement
    if "curves" in stages:
        curve, entry = timer.timed("pruning_curves", curves_stage, ctx, arrays, timer)
        tables.write_table(ctx.run_dir / CURVES_FILE, curve, CURVE_COLUMNS)
        manifest["pruning_curves"] = entry
    if "circuits" in stages:
        manifest["circuits"] = circuits.circuits_stage(ctx, arrays["index"], timer)
    return manifest


def summary_lines(manifest: dict) -> list[str]:
    """Build-summary lines: the Taylor agreement and the curves' areas / heads before a 1-point drop."""
    lines = []
    for name, a in (manifest.get("taylor_agreement") or {}).items():
        lines.append(f"  agreement of {name} with prob_drop (Spearman, {a['images']} images): per image median "
                     f"{a['per_image_median']:.3f} [q25 {a['per_image_q25']:.3f}, q75 {a['per_image_q75']:.3f}], "
                     f"run means {a['run_means']:.3f}")
    curves = manifest.get("pruning_curves")
    if curves:
        lines.append(f"  pruning curves ({curves['images']} images, {len(curves['steps'])} steps):")
        for order, e in curves["orders"].items():
            areas = ", ".join(f"{k[5:]} {v['mean']:.3f}" + (f" [{v['min']:.3f}-{v['max']:.3f}]" if e.get("seeds") else "")
                              for k, v in e.items() if k.startswith("area_"))
            drop = e.get("heads_before_1pt_drop")
            lines.append(f"    {order}: area {areas}" + (f"; heads before a 1-point accuracy drop {drop['mean']:.0f}"
                                                         if drop else ""))
    for stage, why in (manifest.get("stages_skipped") or {}).items():
        lines.append(f"  stage {stage} skipped (--all-stages): {why}")
    return lines + circuits.summary_lines(manifest)
