"""A build's batches: the batch plan, the parts folder, loading and preprocessing a batch of images
and their thumbnails (shared by the build and its optional stages, ``head_stages``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from analysis.datasets import open_image
from analysis.errors import ImageReadError, InputError


def parts_dir(run_dir: Path) -> Path:
    return run_dir / "parts"


def batch_plan(n_images: int, batch_size: int, shard: tuple[int, int] | None = None) -> list[list[int]]:
    """Image ids in batches; with shard (K, N) the K-th (1-based) of N contiguous groups of batches."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}.")
    batches = [list(range(s, min(s + batch_size, n_images))) for s in range(0, n_images, batch_size)]
    if shard is None:
        return batches
    k, n = shard
    if not (1 <= k <= n):
        raise InputError(f"--shard {k}/{n} is not valid: use K/N with 1 <= K <= N, e.g. --shard 1/4.")
    bounds = np.linspace(0, len(batches), n + 1).round().astype(int)
    return batches[bounds[k - 1]:bounds[k]]


def thumb_side(vit, thumb_px: int | None = None) -> int:
    """Thumbnail width in px: ``thumb_px``, else the model's input size clamped to 112-224."""
    return thumb_px or int(min(max(vit.img_size[0], 112), 224))


def thumbnail_transform(vit, thumb_px: int | None):
    """PIL -> the image as the model sees it (resize/crop, no normalisation) at thumb_px px."""
    steps = []
    for t in getattr(vit.transform, "transforms", []):
        if "ToTensor" in type(t).__name__:
            break
        steps.append(t)
    side = thumb_side(vit, thumb_px)

    def apply(im):
        for t in steps:
            im = t(im)
        im = im.convert("RGB")
        if im.size != (side, side):
            im = im.resize((side, round(side * im.height / im.width)), Image.BICUBIC)
        return im
    return apply


def load_batch(ctx, ids: Sequence[int]):
    """Open and preprocess images of a build (``ctx``: build.BuildContext) -> (ok ids, tensor
    [b, 3, H, W] or None, thumbnails, skipped)."""
    ok, pils, skipped = [], [], []
    for i in ids:
        try:
            im = open_image(ctx.image_set.items[i].ref)
            ok.append(i)
            pils.append(im)
        except ImageReadError as err:
            skipped.append((i, str(err)))
    x = ctx.vit.preprocess(pils) if pils else None
    make_thumb = thumbnail_transform(ctx.vit, ctx.config.thumb_px)
    return ok, x, [make_thumb(im) for im in pils], skipped
