"""Write a synthetic HeadScope run (random but plausible values) for tests and benchmarks.

The values are made up here; the tables and manifest are written by the build's own writer
(analysis.runs.tables.write_run), so the run has exactly the build's columns and summaries.
Every registered image_head metric gets values: the quantities below have generators of their own,
any other one gets values of its declared kind from the registry (``made_up_values``: scalar, vector
[K] or category, inside its ``range``, NaN / "" where ``applies_to`` excludes a classifier); the
writer computes the head-level (OnRun) metrics from them. A newly registered metric needs no edit here.

    python scripts/make_synthetic_cache.py --out cache/synthetic --images 1000 --layers 12 --heads 12
    python scripts/make_synthetic_cache.py --out /tmp/tiny --images 40 --model test_vit --img-size 96

Without --model the manifest names no loadable model, so online queries (partial pruning, attention)
fail with a clear message: the dashboard's cached views still work. With --model NAME (a timm ViT
name, e.g. test_vit or vit_small_patch14_dinov2) a randomly initialised model is saved as
safetensors in the run and layers/heads/grid are taken from it, so analysis.service can reload it
and answer online queries on the run's PNG images.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from analysis.runs.reader import open_run
from analysis.runs.tables import write_run
from analysis.metrics.patterns import OFFSET_NAMES, PATTERN_LABELS, PATTERN_SCORES, PATTERN_THRESHOLD
from analysis.metrics import registry
from analysis.metrics.sinks import DEFAULT_FACTOR
from analysis.models.labels import FASHION_MNIST_CLASSES as fashion
from analysis.models.adapter import ViT


def save_random_model(name: str, img_size: int, num_classes: int, path: Path, seed: int) -> dict:
    """A randomly initialised timm ViT saved as safetensors -> the shape facts for the manifest."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, img_size=img_size, num_classes=num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    vit = ViT(model)  # the shape facts through the family seam (no module internals read here)
    return {"depth": vit.depth, "heads": vit.num_heads, "prefix_tokens": int(vit.num_prefix_tokens),
            "grid": [int(g) for g in vit.grid], "patch_size": int(vit.patch_size)}


def draw_image(rng: np.random.Generator, label: int, n_classes: int, size: int) -> Image.Image:
    """A small picture: a class-coloured shape on a noisy background (compresses well as PNG)."""
    hue = label / max(n_classes, 1)
    base = np.array([0.5 + 0.5 * math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)]) * 200 + 30
    bg = (rng.normal(235, 8, (size // 8, size // 8, 3))).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(bg).resize((size, size), Image.BILINEAR)
    d = ImageDraw.Draw(im)
    c = rng.uniform(0.3, 0.7, 2) * size
    r = rng.uniform(0.15, 0.3) * size
    box = [c[0] - r, c[1] - r, c[0] + r, c[1] + r]
    colour = tuple(int(v) for v in base)
    if label % 3 == 0:
        d.ellipse(box, fill=colour)
    elif label % 3 == 1:
        d.rectangle(box, fill=colour)
    else:
        d.pieslice(box, start=30, end=330, fill=colour)
    return im


def head_profiles(rng, L: int, H: int, K: int):
    """Per head: locality (0 local .. 1 global) and pattern-cluster centres for the layouts."""
    depth = np.repeat(np.arange(L) / max(L - 1, 1), H)
    locality = np.clip(depth + rng.normal(0, 0.25, L * H), 0, 1)
    locality[rng.random(L * H) < 0.15] = 1.0  # some early heads attend globally (paper Fig. 8C)
    centres = rng.normal(0, 25, (2, L * H, 2))
    spread = 0.8 + 10 * depth  # content-agnostic low layers: tight clusters; high layers: a cloud
    centres[:, :, :] *= (1 - 0.8 * depth)[None, :, None]
    return locality, centres, spread


def strength_vectors(rng, locality: np.ndarray, n: int, K: int, N: int) -> np.ndarray:
    """[n, LH, K] k-hop strength vectors: local heads decay fast with k, global ones are flat."""
    k = np.arange(K)
    tau = 0.3 + 6 * locality[None, :, None] * rng.uniform(0.7, 1.3, (n, len(locality), 1))
    prof = np.exp(-k / tau)
    prof /= prof.sum(-1, keepdims=True)
    # s_k is a mean attention per neighbour: scale so a flat profile gives ~ 1/N
    return (prof * K / N).astype(np.float32)


def entropy(s: np.ndarray) -> np.ndarray:
    p = s / s.sum(-1, keepdims=True)
    return (-(p * np.log(np.clip(p, 1e-12, None))).sum(-1) / math.log(s.shape[-1])).astype(np.float32)


def pattern_labels(rng, depth: np.ndarray, n: int) -> dict:
    """Pattern scores and labels [n, LH]: low heads keep one neighbour offset on most images
    (content-agnostic diagonals), high heads attend to a few shared targets (vertical)."""
    LH = len(depth)
    offset = rng.integers(0, len(OFFSET_NAMES), LH)
    offset = np.where(rng.random((n, LH)) < 0.1, rng.integers(0, len(OFFSET_NAMES), (n, LH)), offset[None])
    scores = {"diagonal": rng.beta(2 + 6 * (1 - depth), 2 + 6 * depth, (n, LH)),
              "horizontal": rng.beta(1, 12, (n, LH)),
              "vertical": rng.beta(2 + 6 * depth, 2 + 6 * (1 - depth), (n, LH)),
              "block": rng.beta(1, 8, (n, LH))}
    stacked = np.stack([scores[k] for k in PATTERN_SCORES], -1)
    best = stacked.argmax(-1)
    label = np.where(best == 0, offset, len(OFFSET_NAMES) - 1 + best)
    label = np.where(stacked.max(-1) >= PATTERN_THRESHOLD, label, len(PATTERN_LABELS) - 1)
    return {**scores, "diagonal_offset": np.asarray(OFFSET_NAMES)[offset], "pattern": np.asarray(PATTERN_LABELS)[label]}


SYNTHETIC_KIND = "classifier"  # a synthetic run's model always has a head (n_classes classes)


def made_up_values(rng, metric: registry.Metric, shape: tuple, K: int) -> np.ndarray:
    """Values of a registered image_head metric that has no generator of its own, from its
    declaration: ``shape`` (n, L*H) floats (a scalar), (n, L*H, K) (a vector) or str (a category,
    three made-up values). Floats are small positive gamma noise (like a drop or a distance), kept
    inside ``range``: clipped when the range holds [0, 1], else scaled into it."""
    if metric.value == "category":
        return np.asarray([f"{metric.name} {c}" for c in "abc"])[rng.integers(0, 3, shape)]
    values = rng.gamma(1.5, 0.05, shape if metric.value == "scalar" else (*shape, K))
    if metric.range is not None:
        lo, hi = metric.range
        values = (np.clip(values, lo, hi) if lo <= 0 and hi >= 1
                  else lo + (hi - lo) * np.clip(values, 0, 1))
    return values


def v3_values(rng, importance: np.ndarray, depth: np.ndarray, n: int, L: int, H: int, N: int, T: int):
    """SPEC v3 values, made up: ({direct_logit, logit_drop, indirect_logit, prefix_share,
    high_norm_share, high_norm_count: [n, L*H]}, token norms [n, L + 1, N] float32). logit_drop
    follows the heads' importance (logit units); late heads act mostly directly, early ones through
    later heads; from the middle of the network a few patch tokens get high norms (Darcet et al.'s
    artefacts: high_norm_count by the rule of analysis.metrics.sinks with f = DEFAULT_FACTOR) and
    some heads attend to them; the prefix share rises with depth."""
    LH = L * H
    logit_drop = importance[None] * rng.gamma(2, 4.0, (n, LH)) + rng.normal(0, 0.05, (n, LH))
    direct = logit_drop * np.clip(depth[None] + rng.normal(0, 0.25, (n, LH)), -0.3, 1.2)
    norms = rng.lognormal(np.log(8) + 0.08 * np.arange(L + 1)[None, :, None], 0.15, (n, L + 1, N))
    for i in range(n):
        tokens = T + rng.choice(N - T, size=rng.integers(0, 4), replace=False)
        norms[i, L // 2 + 1:, tokens] *= rng.uniform(5, 8, (len(tokens), 1))
    patches = norms[:, :L, T:]
    high = patches > DEFAULT_FACTOR * np.median(patches, axis=-1, keepdims=True)   # [n, L, P]
    count = np.repeat(high.sum(-1), H, axis=1)                                      # [n, L*H]
    sink = rng.beta(1, 6, (n, LH)) + rng.beta(2, 2, LH)[None] * (rng.random(LH) < 0.2)[None]
    values = {"direct_logit": direct, "logit_drop": logit_drop, "indirect_logit": logit_drop - direct,
              "prefix_share": np.clip(rng.beta(1 + 4 * depth, 4, (n, LH)) * (T > 0), 0, 1),
              "high_norm_share": np.where(count > 0, np.clip(sink * count / (N - T) * 4, 0, 1), 0.0),
              "high_norm_count": count.astype(np.float64)}
    return values, norms.astype(np.float32)


def missing_values(metric: registry.Metric, shape: tuple) -> np.ndarray:
    """What the engine gives a metric that does not apply to the model: NaN, or "" for a category."""
    return np.full(shape, "", dtype="U1") if metric.value == "category" else np.full(shape, np.nan, dtype=np.float32)


def make_run(out: Path, n_images: int = 200, layers: int = 12, heads: int = 12, grid: int = 14,
             n_classes: int = 10, seed: int = 0, model: str | None = None, img_size: int | None = None,
             image_px: int = 96, thumb_px: int = 64) -> Path:
    """Write a complete synthetic run to ``out`` and return its path."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)

    class_names = fashion[:n_classes] if n_classes <= len(fashion) else [f"class {c}" for c in range(n_classes)]
    patch_size, prefix = 16, 1
    model_info = {"name": "synthetic", "weights": None, "pretrained": False, "num_classes": n_classes,
                  "class_names": class_names}
    if model:
        img_size = img_size or grid * 16
        facts = save_random_model(model, img_size, n_classes, out / "model.safetensors", seed)
        layers, heads, grid, patch_size, prefix = (facts["depth"], facts["heads"], facts["grid"][0],
                                                   facts["patch_size"], facts["prefix_tokens"])
        model_info.update(name=model, weights=str((out / "model.safetensors").resolve()), img_size=img_size, **facts)
    else:
        model_info.update(img_size=grid * patch_size, depth=layers, heads=heads, prefix_tokens=prefix,
                          grid=[grid, grid], patch_size=patch_size)
    L, H, K, N = layers, heads, grid, grid * grid + prefix
    LH = L * H

    # ---- images -------------------------------------------------------------------------
    labels = np.arange(n_images) % n_classes
    rng.shuffle(labels)
    difficulty = rng.beta(2, 2, n_images)                     # 0 easy .. 1 hard
    p_true = np.clip(1 - difficulty + rng.normal(0, 0.1, n_images), 0.01, 0.99)
    rows = []
    for i in range(n_images):
        im = draw_image(rng, int(labels[i]), n_classes, image_px)
        path = out / "images" / f"{i}.png"
        im.save(path)
        im.resize((thumb_px, thumb_px), Image.BILINEAR).save(out / "thumbs" / f"{i}.png")
        probs = rng.dirichlet(np.ones(n_classes) * 0.5) * (1 - p_true[i])
        probs[labels[i]] += p_true[i]
        top = np.argsort(-probs)[:5]
        rows.append({"image_id": i, "path": str(path.resolve()), "label": int(labels[i]),
                     "label_name": class_names[labels[i]], "pred": int(top[0]), "prob": float(probs[labels[i]]),
                     "top5_classes": top.astype(int).tolist(), "top5_probs": probs[top].astype(float).tolist()})
    images = pd.DataFrame(rows)
    angle = 2 * math.pi * labels / n_classes
    radius = 20 + 25 * p_true
    images["overview_x"] = radius * np.cos(angle) + rng.normal(0, 4, n_images)
    images["overview_y"] = radius * np.sin(angle) + rng.normal(0, 4, n_images)

    # ---- heads --------------------------------------------------------------------------
    locality, centres, spread = head_profiles(rng, L, H, K)
    importance = rng.gamma(0.6, 0.02, LH)                     # most heads matter little ...
    for idx in rng.choice(LH, size=max(1, LH // 40), replace=False):
        importance[idx] = rng.uniform(0.2, 0.5)               # ... a few matter a lot
    sens = rng.gamma(2, 0.5, (n_images, LH)) * (0.5 + difficulty[:, None])
    drop = np.clip(importance[None, :] * sens, -0.2, None)
    prob = np.clip(p_true[:, None] - drop, 0, 1)
    prob_drop = p_true[:, None] - prob
    jsd = np.clip(np.abs(prob_drop) * 0.8 + rng.gamma(1, 0.002, (n_images, LH)), 0, 1)
    depth = np.repeat(np.arange(L) / max(L - 1, 1), H)[None, :]
    cls_dist = np.clip(rng.gamma(1.5, 0.03, (n_images, LH)) * (1 + 3 * importance) * (0.5 + depth), 0, 2)
    patch_dist = np.clip(rng.gamma(1.5, 0.04, (n_images, LH)) * (1.5 - depth), 0, 2)
    emb_dist = np.clip(np.abs(prob_drop) * 0.3 + rng.gamma(1, 0.005, (n_images, LH)), 0, 2)
    strength = strength_vectors(rng, locality, n_images, K, N - prefix)
    ent = entropy(strength)
    mean_dist = (strength * np.arange(K)).sum(-1) / strength.sum(-1) * patch_size
    noise = rng.normal(0, 1, (2, n_images, LH, 2)) * spread[None, None, :, None]
    semantic = rng.lognormal(0.15 * (1 - depth), 0.2, (n_images, LH))       # ~1 = uniform over keypoints
    cls_semantic = rng.lognormal(0.3 * depth, 0.3, (n_images, LH))
    peak = np.clip((1 - ent) * rng.uniform(0.6, 1.0, ent.shape) + 0.05, 1 / N, 1)  # local heads are peaked
    cls_xy = centres[0][None] + noise[0]
    patch_xy = centres[1][None] + noise[1]

    arrays = {"prob": prob, "prob_drop": prob_drop, "jsd": jsd, "cls_dist": cls_dist, "patch_dist": patch_dist,
              "emb_dist": emb_dist, "strength": strength, "strength_entropy": ent, "mean_distance_px": mean_dist,
              "peak_attention": peak,
              "semantic_concentration": semantic, "cls_semantic_concentration": cls_semantic,
              **pattern_labels(rng, depth[0], n_images)}
    v3, token_norms = v3_values(np.random.default_rng([seed, 3]), importance, depth[0], n_images, L, H, N, prefix)
    declared = registry.metrics("image_head")
    for m in declared:  # registered metrics without a generator above: values from their declaration
        if m.value == "scalar" or m.name not in arrays:  # (a scalar's noise is drawn either way: the seed's
            arrays.setdefault(m.name, made_up_values(rng, m, (n_images, LH), K))  # values stay as they were)
    arrays.update(v3)  # (drawn from a generator of their own, for the same reason)
    arrays = {m.name: (arrays[m.name] if SYNTHETIC_KIND in m.applies_to else missing_values(m, (n_images, LH)))
              for m in declared}  # registry order; a generator's metric that is not registered is left out
    arrays = {k: v.reshape(n_images, L, H, *v.shape[2:]) for k, v in arrays.items()}
    manifest = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info,
        "dataset": {"name": f"synthetic-{n_images}", "kind": "folder", "n_images": n_images,
                    "class_names": class_names},
        "params": {"q": 0.01, "synthetic": True, "seed": seed, "high_norm_factor": DEFAULT_FACTOR},
        "timings": {}, "versions": {},
    }
    every_stage = sorted({m.stage for m in registry.metrics() if m.stage})  # a synthetic run has every metric
    write_run(out, manifest, images, arrays, L=L, H=H, stages=every_stage,
                    layouts={"cls": cls_xy.reshape(-1, 2), "patch": patch_xy.reshape(-1, 2)}, token_norms=token_norms)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run directory to write (e.g. cache/synthetic)")
    ap.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    ap.add_argument("--layers", type=int, default=12, help="layers L (ignored with --model; default 12)")
    ap.add_argument("--heads", type=int, default=12, help="heads per layer H (ignored with --model; default 12)")
    ap.add_argument("--grid", type=int, default=14, help="patch grid side (ignored with --model; default 14)")
    ap.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None,
                    help="timm ViT name to save randomly initialised so online queries work (e.g. test_vit)")
    ap.add_argument("--img-size", type=int, default=None, help="model input size in px with --model")
    args = ap.parse_args(argv)
    out = make_run(Path(args.out), args.images, args.layers, args.heads, args.grid, args.classes, args.seed,
                   args.model, args.img_size)
    run = open_run(out)
    print(f"wrote {out}: {len(run.images)} images, {len(run.head_metrics)} head rows, metrics {', '.join(run.metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
