"""Which patches matter: per-image patch attribution maps (SPEC "Patch attribution").

Four maps of one image, each a float64 array [gh, gw] over the patch grid:

- ``occlusion``: P(y|x) - P(y|x'), x' = the image with patch t's p x p pixels set to 0 (the
  normalised mean colour, SPEC's baseline); the P (+1) images run batched through the model. Beyond
  SPEC, ``occlusion_baseline`` may fill the patch with black pixels or with the same pixels of the
  image blurred (OCCLUSION_BASELINES).
- ``token_drop``: P(y|x) - P(y|x without token t), patch token t removed after the position
  embedding, every block running on N-1 tokens; the P sequences run batched.
- ``rollout`` (Abnar & Zuidema 2020): R = B_{L-1} ... B_0, B_l = 0.5 mean_h A[l,h] + 0.5 I
  (rows renormalised); the map is R[0, T:].
- ``grad_rollout`` (Chefer et al. 2021, classifier models): R = I; R = R + Abar_l R for
  l = 0..L-1, Abar_l = mean_h (dlogit_y/dA[l,h] * A[l,h])^+; the map is R[0, T:].

For a backbone each P(y) difference is the cosine distance of the pooled embeddings. Without a
label, a classifier's maps explain its top-1 class. Also here: the heads' alignment with a map
(Spearman of each head's CLS row over the patches against the map), the maps' agreement with
each other, and deletion curves (P(y), or emb_dist, after dropping the top-n tokens of a map).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from analysis.errors import InputError
from analysis.metrics.common import check_labels
from analysis.metrics.importance import SEQUENCE_TOKENS, cosine_distance
from analysis.metrics.registry import Metric, OnBatch, register_metric
from analysis.models.adapter import ViT

MAPS = ("occlusion", "token_drop", "rollout", "grad_rollout")
# What an occluded patch is filled with: "mean" = the normalised mean colour (0 after normalisation,
# SPEC), "black" = pixel value 0 before normalisation, "blur" = the image blurred by a Gaussian of
# sigma = half a patch (its features gone, its colours kept). Beyond SPEC but the default.
OCCLUSION_BASELINES = {"mean": "mean colour", "black": "black", "blur": "blurred image"}
CLASSIFIER_ONLY = frozenset({"grad_rollout"})
NEEDS_PREFIX = frozenset({"rollout", "grad_rollout"})


def map_unit(name: str, classifier: bool) -> str:
    """Unit of a map's values, for colour bars: the two ablations are P(y) drops (classifier)
    or cosine distances (backbone); the rollouts are shares of the CLS token's attention flow."""
    if name in ("occlusion", "token_drop"):
        return "P(y) drop" if classifier else "cosine distance"
    return "rollout weight" if name == "rollout" else "relevance"


def available_maps(vit: ViT) -> tuple[str, ...]:
    """The maps this model supports (grad_rollout needs a head, the rollouts a prefix token)."""
    return tuple(m for m in MAPS if (vit.has_head or m not in CLASSIFIER_ONLY)
                 and (vit.num_prefix_tokens > 0 or m not in NEEDS_PREFIX))


# ---- input checks ------------------------------------------------------------------------------

def check_image(vit: ViT, image: Tensor) -> Tensor:
    """One preprocessed image [3, H, W] (or [1, 3, H, W]) on the model's grid -> [1, 3, H, W]."""
    if isinstance(image, Tensor) and image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InputError(f"Patch maps take one preprocessed image [3, H, W]; got {shape}. "
                         "Use vit.preprocess([pil_image])[0].")
    p = vit.patch_size
    grid = (image.shape[1] // p, image.shape[2] // p)
    if grid != tuple(vit.grid) or tuple(image.shape[1:]) != tuple(vit.img_size):
        raise InputError(f"The image is {image.shape[1]}x{image.shape[2]} px, a {grid[0]}x{grid[1]} grid of "
                         f"{p} px patches, but {vit.name} has a {vit.grid[0]}x{vit.grid[1]} grid "
                         f"({vit.img_size[0]}x{vit.img_size[1]} px). Preprocess it with vit.preprocess().")
    return vit.check_images(image[None])


def check_maps(vit: ViT, maps: Iterable[str] | None) -> tuple[str, ...]:
    """Requested map names (default: every map the model supports), refusing unknown or unsupported ones."""
    if maps is None:
        return available_maps(vit)
    maps = (maps,) if isinstance(maps, str) else tuple(maps)
    unknown = [m for m in maps if m not in MAPS]
    if unknown:
        raise InputError(f"Unknown patch maps {unknown}; choose from {list(MAPS)}.")
    if not vit.has_head and CLASSIFIER_ONLY & set(maps):
        raise InputError(f"{sorted(CLASSIFIER_ONLY & set(maps))} needs a classifier (the gradient of the "
                         f"label's logit), but {vit.name} is a backbone without a head. "
                         f"Choose from {list(available_maps(vit))}.")
    if vit.num_prefix_tokens == 0 and NEEDS_PREFIX & set(maps):
        raise InputError(f"{sorted(NEEDS_PREFIX & set(maps))} reads the CLS token's row, but {vit.name} has "
                         "no prefix token. Use occlusion or token_drop.")
    return maps


def check_patches(vit: ViT, patches: Iterable[int] | None) -> np.ndarray:
    """Flat patch indices (r * gw + c) -> int array, refusing patches outside the grid."""
    P = vit.num_patches
    if patches is None:
        return np.arange(P)
    idx = np.asarray(list(patches) if not isinstance(patches, (int, np.integer)) else [patches])
    if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
        raise InputError(f"Patches must be a list of flat indices r * {vit.grid[1]} + c; got {idx.tolist()}.")
    bad = idx[(idx < 0) | (idx >= P)]
    if bad.size:
        raise InputError(f"Patches {bad[:10].tolist()} are outside the {vit.grid[0]}x{vit.grid[1]} grid "
                         f"(flat indices 0-{P - 1}, r * {vit.grid[1]} + c).")
    return idx


def target_class(vit: ViT, image: Tensor, label: int | None) -> int | None:
    """The class the maps explain: the label, or the top-1 class without one; None for a backbone."""
    if not vit.has_head:
        return None
    if label is None:
        return int(vit(image)[0].argmax())
    return int(check_labels(vit, [label], 1)[0])


# ---- outputs of token sequences ----------------------------------------------------------------

class Scorer:
    """Scores perturbed outputs against the unperturbed image: P(y|x) - P(y|x') for a classifier,
    the cosine distance of the pooled embeddings for a backbone (float64 [S])."""

    def __init__(self, vit: ViT, x0: Tensor, target: int | None):
        self.target = target
        self.pooled0, logits = run_tokens(vit, x0)
        self.p0 = None if logits is None else torch.softmax(logits.double(), -1)[:, target]

    def prob(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits.double(), -1)[:, self.target]

    def drop(self, pooled: Tensor, logits: Tensor | None) -> Tensor:
        if self.target is None:
            return cosine_distance(self.pooled0, pooled)
        return self.p0 - self.prob(logits)


def run_tokens(vit: ViT, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Token sequences [S, N', C] (the input of block 0) -> (pooled [S, D], logits [S, C] or None)."""
    return vit.outputs(vit.blocks(x, prefix_only_last=vit.pool_reads_prefix_only))


def chunks(items: np.ndarray, tokens_per_item: int, progress, desc: str):
    """Split ``items`` into groups of about SEQUENCE_TOKENS tokens (bounded memory, fast CPU matmuls)."""
    step = max(1, SEQUENCE_TOKENS // tokens_per_item)
    groups = [items[s:s + step] for s in range(0, len(items), step)]
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc=desc, unit="chunk")
    return groups


# ---- the four maps (flat [P] arrays, NaN where a patch was not requested) ----------------------

def check_baseline(baseline: str) -> str:
    if baseline not in OCCLUSION_BASELINES:
        raise InputError(f"Unknown occlusion baseline {baseline!r}: use {', '.join(map(repr, OCCLUSION_BASELINES))}.")
    return baseline


def baseline_image(vit: ViT, image: Tensor, baseline: str = "mean") -> Tensor:
    """What occlusion fills a patch with, as a preprocessed image like ``image`` [1, 3, H, W]: zeros
    (mean), (0 - mean) / std per channel (black), or ``image`` blurred by a Gaussian of sigma = p / 2
    px, kernel 2 * p + 1 px, reflected at the border (blur)."""
    if check_baseline(baseline) == "mean":
        return torch.zeros_like(image)
    if baseline == "black":
        mean, std = (torch.tensor(vit.data_config[k], dtype=image.dtype, device=image.device) for k in ("mean", "std"))
        return ((0 - mean) / std).view(1, 3, 1, 1).expand_as(image).clone()
    p = vit.patch_size
    return gaussian_blur(image, kernel_size=[2 * p + 1] * 2, sigma=[p / 2] * 2)


def occlusion(vit: ViT, image: Tensor, scorer: Scorer, patches: np.ndarray, progress=False,
              baseline: str = "mean") -> np.ndarray:
    """P(y|x) - P(y|x with patch t's pixels replaced by the baseline's, see baseline_image), for each
    requested t; [P] float64. image: [1, 3, H, W] preprocessed."""
    gw, p = vit.grid[1], vit.patch_size
    fill = baseline_image(vit, image, baseline)
    out = np.full(vit.num_patches, np.nan)
    for group in chunks(patches, vit.num_tokens, progress, "occlusion"):
        imgs = image.repeat(len(group), 1, 1, 1)
        for i, t in enumerate(group):
            r, c = divmod(int(t), gw)
            rows, cols = slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p)
            imgs[i, :, rows, cols] = fill[0, :, rows, cols]
        out[group] = scorer.drop(*run_tokens(vit, vit.embed(imgs))).cpu().numpy()
    return out


def token_drop(vit: ViT, x0: Tensor, scorer: Scorer, patches: np.ndarray, progress=False) -> np.ndarray:
    """P(y|x) - P(y|x without patch token t), for each requested t; [P] float64. x0: [1, N, C] embedded."""
    T, N = vit.num_prefix_tokens, vit.num_tokens
    out = np.full(vit.num_patches, np.nan)
    everything = torch.arange(N, device=x0.device)
    for group in chunks(patches, N - 1, progress, "token drop"):
        keep = torch.stack([everything[everything != T + int(t)] for t in group])  # [S, N-1]
        out[group] = scorer.drop(*run_tokens(vit, x0[0][keep])).cpu().numpy()
    return out


def rollout(vit: ViT, attention: Tensor) -> np.ndarray:
    """Attention rollout from A [L, H, N, N]: R[0, T:] of R = B_{L-1} ... B_0; [P] float64.
    Only R's first row is needed: r = e_0^T B_{L-1} ... B_0, vector times matrix from the left."""
    A = attention.double().mean(1)                                  # [L, N, N]
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    r = eye[0]
    for l in reversed(range(A.shape[0])):
        B = 0.5 * A[l] + 0.5 * eye
        r = r @ (B / B.sum(-1, keepdim=True))
    return r[vit.num_prefix_tokens:].cpu().numpy()


def gradient_rollout(vit: ViT, attention: Tensor, grads: Tensor) -> np.ndarray:
    """Chefer et al.'s rollout from A and dlogit_y/dA [L, H, N, N]: R[0, T:]; [P] float64.
    R = I; R = R + Abar_l R (l = 0..L-1) is (I + Abar_{L-1}) ... (I + Abar_0); its first row
    is computed from the left, r = r + r Abar_l for l = L-1..0."""
    Abar = (grads.double() * attention.double()).clamp_min(0).mean(1)  # [L, N, N]
    r = torch.zeros(Abar.shape[-1], dtype=Abar.dtype, device=Abar.device)
    r[0] = 1
    for l in reversed(range(Abar.shape[0])):
        r = r + r @ Abar[l]
    return r[vit.num_prefix_tokens:].cpu().numpy()


def attention_and_gradient(vit: ViT, image: Tensor, target: int) -> tuple[Tensor, Tensor]:
    """Every block's attention A and dlogit_target/dA, each [L, H, N, N] float32 (one differentiable
    pass through the adapter's attention hook; the model's parameters get no .grad)."""
    captured: list[Tensor] = []

    def keep(layer: int, A: Tensor) -> None:
        captured.append(A)

    with torch.inference_mode(False), torch.enable_grad():
        x = image.clone().requires_grad_(True)  # the graph exists even if the weights are frozen
        _, logits = vit.outputs(vit.blocks(vit.embed(x), hook=keep))
        grads = torch.autograd.grad(logits[0, target], captured)
    return torch.cat([a.detach() for a in captured]), torch.cat([g.detach() for g in grads])


@torch.inference_mode()
def patch_maps(vit: ViT, image: Tensor, label: int | None = None, maps: Iterable[str] | None = None,
               patches: Iterable[int] | None = None, progress: bool = False,
               occlusion_baseline: str = "mean") -> dict[str, np.ndarray]:
    """Patch attribution maps of one image (SPEC "Patch attribution").

    image: [3, H, W] preprocessed; label: the true class (None: a classifier's top-1 class; a
    backbone has none); maps: names from MAPS (default: all the model supports, i.e. without
    grad_rollout for a backbone); patches: flat indices r * gw + c to ablate (default all; other
    patches are NaN in occlusion and token_drop); occlusion_baseline: what an occluded patch is
    filled with (OCCLUSION_BASELINES; "mean" is SPEC's). Returns {name: float64 [gh, gw]}.
    """
    maps = check_maps(vit, maps)
    img = check_image(vit, image)
    idx = check_patches(vit, patches)
    check_baseline(occlusion_baseline)
    return compute_maps(vit, img, target_class(vit, img, label), maps, idx, progress, occlusion_baseline)[0]


def compute_maps(vit: ViT, img: Tensor, target: int | None, maps: Sequence[str], patches: np.ndarray,
                 progress=False, occlusion_baseline: str = "mean") -> tuple[dict[str, np.ndarray], Tensor | None]:
    """The checked-input core of patch_maps: ({name: [gh, gw]}, the attention [L, H, N, N] when a
    rollout map captured it, else None). img [1, 3, H, W]; target from target_class."""
    out: dict[str, np.ndarray] = {}
    attention = None
    if {"occlusion", "token_drop"} & set(maps):
        x0 = vit.embed(img)
        scorer = Scorer(vit, x0, target)
        if "occlusion" in maps:
            out["occlusion"] = occlusion(vit, img, scorer, patches, progress, occlusion_baseline)
        if "token_drop" in maps:
            out["token_drop"] = token_drop(vit, x0, scorer, patches, progress)
    if "grad_rollout" in maps:
        attention, G = attention_and_gradient(vit, img, target)
        out["grad_rollout"] = gradient_rollout(vit, attention, G)
    elif "rollout" in maps:
        attention = vit.capture_attention(img)[0]
    if "rollout" in maps:
        out["rollout"] = rollout(vit, attention)
    return {m: out[m].reshape(vit.grid) for m in maps}, attention


@torch.inference_mode()
def batch_patch_maps(vit: ViT, images: Tensor, labels: Sequence[int | None] | None = None,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every map the model supports for a batch, plus each head's alignment with the occlusion map.

    images [B, 3, H, W] preprocessed; labels: per image the class to explain (None or -1: the
    top-1 class; ignored for a backbone). Returns (maps [B, len(MAPS), gh, gw] float32 in MAPS
    order, NaN for maps the model lacks; alignment [B, L, H] float32, head_saliency_alignment
    with occlusion, NaN without a prefix token).
    """
    images = vit.check_images(images)
    B, (gh, gw) = images.shape[0], vit.grid
    names = available_maps(vit)
    maps = np.full((B, len(MAPS), gh, gw), np.nan, np.float32)
    alignment = np.full((B, vit.depth, vit.num_heads), np.nan, np.float32)
    rows = range(B)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="patch maps", unit="img")
    for i in rows:
        label = None if labels is None or labels[i] is None or int(labels[i]) < 0 else int(labels[i])
        img = images[i:i + 1]
        out, attention = compute_maps(vit, img, target_class(vit, img, label), names,
                                      np.arange(vit.num_patches))
        for name, values in out.items():
            maps[i, MAPS.index(name)] = values
        if attention is not None:
            alignment[i] = head_saliency_alignment(vit, out["occlusion"], attention=attention)
    return maps, alignment


# ---- comparing maps and heads ------------------------------------------------------------------

def spearman(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of X [..., P] with y [P] (average ranks for ties);
    NaN where a row or y is constant or has NaN."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    rx = rankdata(X, axis=-1)
    ry = rankdata(y)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean()
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(-1) / den
    bad = np.isnan(X).any(-1) | np.isnan(y).any() | (den == 0)
    return np.where(bad, np.nan, rho)


def head_saliency_alignment(vit: ViT, saliency: np.ndarray, image: Tensor | None = None,
                            attention: Tensor | np.ndarray | None = None) -> np.ndarray:
    """Per head, the Spearman correlation of its CLS -> patch attention A[l,h][0, T:] with a
    patch map (e.g. occlusion) of the same image: [L, H] float64 in [-1, 1].

    saliency: [gh, gw] or [P]; give either the image [3, H, W] or its attention [L, H, N, N]
    (e.g. from vit.capture_attention(...)[0]); the CLS rows alone [L, H, P] also do.
    """
    if vit.num_prefix_tokens == 0:
        raise InputError(f"Head-saliency alignment reads the CLS row, but {vit.name} has no prefix token.")
    saliency = np.asarray(saliency, dtype=np.float64)
    if saliency.size != vit.num_patches:
        raise InputError(f"The map has {saliency.size} values but {vit.name} has {vit.num_patches} patches "
                         f"({vit.grid[0]}x{vit.grid[1]}).")
    if attention is None:
        if image is None:
            raise InputError("Give the image or its attention [L, H, N, N].")
        attention = vit.capture_attention(check_image(vit, image))[0]
    A = torch.as_tensor(attention).cpu().double().numpy()
    T, P = vit.num_prefix_tokens, vit.num_patches
    if A.shape == (vit.depth, vit.num_heads, P):
        cls_rows = A
    elif A.shape == (vit.depth, vit.num_heads, vit.num_tokens, vit.num_tokens):
        cls_rows = A[:, :, 0, T:]
    else:
        raise InputError(f"Attention must be [L, H, N, N] = {[vit.depth, vit.num_heads, vit.num_tokens, vit.num_tokens]} "
                         f"or CLS rows [L, H, P]; got {list(A.shape)}.")
    return spearman(cls_rows, saliency.ravel())


def map_agreement(maps: dict[str, np.ndarray]) -> pd.DataFrame:
    """Spearman correlation over patches between every pair of maps: a square DataFrame."""
    names = list(maps)
    flat = np.stack([np.asarray(maps[m], dtype=np.float64).ravel() for m in names])
    rho = np.array([spearman(flat, flat[i]) for i in range(len(names))])
    return pd.DataFrame(rho, index=names, columns=names)


# ---- deletion curves ---------------------------------------------------------------------------

def deletion_steps(vit: ViT, points: int = 17) -> list[int]:
    """Default n grid of a deletion curve: ~``points`` evenly spaced counts from 0 to the largest
    droppable count (every patch when the output reads only prefix tokens, else all but one)."""
    top = max_deletion(vit)
    return sorted({int(round(v)) for v in np.linspace(0, top, min(points, top + 1))})


def max_deletion(vit: ViT) -> int:
    """Most patch tokens a deletion can drop and still leave the pooled output defined."""
    whole = vit.num_prefix_tokens > 0 and vit.pool_reads_prefix_only
    return vit.num_patches if whole else vit.num_patches - 1


@torch.inference_mode()
def deletion_curves(vit: ViT, image: Tensor, label: int | None, maps: dict[str, np.ndarray],
                    steps: Sequence[int] | None = None, progress: bool = False) -> pd.DataFrame:
    """Deletion curves: drop the patch tokens of the n highest values of each map (token drop,
    as SPEC's token_drop, after the position embedding; ties by patch index) and read the output.

    maps: {name: [gh, gw] or [P]}; steps: the n grid (default deletion_steps). Returns a long
    DataFrame map, n, and ``prob`` = P(y | x without those tokens) for a classifier (n = 0 is the
    unpruned P(y)), or ``emb_dist`` = cosine distance of the pooled embeddings to the unpruned
    one for a backbone (0 at n = 0).
    """
    img = check_image(vit, image)
    target = target_class(vit, img, label)
    steps = deletion_steps(vit) if steps is None else [int(n) for n in steps]
    top = max_deletion(vit)
    bad = [n for n in steps if not 0 <= n <= top]
    if bad:
        raise InputError(f"Deletion counts {bad} are outside 0-{top} (the {vit.num_patches} patches of "
                         f"{vit.name}{'' if top == vit.num_patches else ', leaving one for the pooled output'}).")
    T, P = vit.num_prefix_tokens, vit.num_patches
    x0 = vit.embed(img)
    scorer = Scorer(vit, x0, target)
    rows = []
    work = [(name, n) for name in maps for n in steps]
    if progress:
        from tqdm.auto import tqdm

        work = tqdm(work, desc="deletion curves", unit="forward")
    order = {}
    for name, values in maps.items():
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size != P or np.isnan(values).any():
            raise InputError(f"Map {name!r} must have {P} finite values (one per patch); got {values.size}"
                             f"{' with NaN' if np.isnan(values).any() else ''}.")
        order[name] = np.argsort(-values, kind="stable")
    for name, n in work:
        drop = set((T + order[name][:n]).tolist())
        keep = torch.tensor([i for i in range(vit.num_tokens) if i not in drop], device=x0.device)
        pooled, logits = run_tokens(vit, x0[:, keep])
        value = (cosine_distance(scorer.pooled0, pooled) if target is None else scorer.prob(logits))
        rows.append((name, n, float(value[0])))
    return pd.DataFrame(rows, columns=["map", "n", "prob" if target is not None else "emb_dist"])


# ---- the metrics this module computes, declared with the registry (analysis.metrics.registry) ----

def _patch_maps_hook(vit, images, labels, batch):
    """The "patch_maps" stage: the four maps of every image (kept for the run's patch_maps table)
    and each head's alignment with the occlusion map."""
    known = batch.options.get("label_known")
    per_image = None if labels is None else [int(y) if known is None or known[i] else None
                                             for i, y in enumerate(labels.tolist())]
    maps, alignment = batch_patch_maps(vit, images, per_image)
    batch.outputs["patch_maps"] = maps
    return {"saliency_alignment": alignment}


register_metric(Metric("saliency_alignment", "head-saliency alignment", group="saliency", stage="patch_maps", range=(-1, 1),
                       compute=OnBatch(_patch_maps_hook), meaning="does the head's CLS row look where occlusion matters",
                       formula=r"the Spearman correlation over the $P$ patches between the head's CLS attention row "
                               r"$A[0, T{:}]$ and the image's occlusion map $P(y|x) - P(y|x'_t)$ (patch $t$ set to the mean "
                               "colour; for a backbone the cosine distance of the pooled embeddings; $y$ = the true class, "
                               "or the top-1 class when it is unknown). +1: the head attends most to the patches whose "
                               "removal hurts most. Computed when the run is built with --patch-maps."))
