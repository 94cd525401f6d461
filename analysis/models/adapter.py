"""The ViT adapter: one uniform view of any supported Vision Transformer.

``load_vit`` accepts a model name (timm), a checkpoint folder or built module of a registered
family, or one of HeadScope's embedded defaults, plus optional weights. The returned ``ViT``
exposes the shape facts the analysis needs (depth, heads, prefix tokens, patch grid), the model's
own preprocessing, and a forward that runs block by block through its ``ModelFamily`` with two
hook points (TransformerLens style) so the attention pattern always exists and can be captured
or pruned, and each head's output can be gated or replaced:

- ``hook(layer, A [B, H, Nq, N]) -> edited A or None``: the post-softmax pattern;
- ``head_hook(layer, o [B, H, Nq, d]) -> edited o or None``: per-head outputs ``A V`` before W_O.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from analysis.errors import InputError, ModelLoadError
from analysis.reprs import vit_html
from analysis.models.registry import families, family_for_module, family_for_name
from analysis.models.timm_vit import check_supported, unknown_model
from analysis.models.family import ModelFamily, heads_concat
from analysis.models.pruning import Regions, prune_hook
from analysis.models.weights import load_weights, read_state_dict, sha256_file

AttentionHook = Callable[[int, Tensor], Optional[Tensor]]  # (layer, A [B,H,Nq,N]) -> A' or None
HeadHook = Callable[[int, Tensor], Optional[Tensor]]       # (layer, o [B,H,Nq,d]) -> o' or None


class ViT:
    """A Vision Transformer with HeadScope's shape facts, preprocessing and hookable forward.

    Attributes: depth L, num_heads H, head_dim, embed_dim, num_prefix_tokens T, grid (gh, gw),
    num_patches P, num_tokens N = T + P, patch_size (px), img_size (h, w) px, num_classes
    (0 for a backbone), has_head, class_names, data_config, transform, name, weights_sha256,
    family (the ModelFamily), model (the underlying torch module, eval mode, never modified).
    """

    def __init__(self, model: nn.Module | ModelFamily, name: str | None = None,
                 class_names: Sequence[str] | None = None, weights_sha256: str | None = None,
                 device: str | torch.device = "cpu"):
        if isinstance(model, ModelFamily):
            family = model
        else:
            entry = family_for_module(model)
            if entry is None:
                check_supported(model)  # raises the message that lists what is supported
            family = entry.family(model)
        family.module = family.module.eval().to(device)
        self.family = family
        self.model = family.module
        self.device = torch.device(device)
        self.name = name or family.default_name
        self.weights_sha256 = weights_sha256
        for attr in ("depth", "num_heads", "head_dim", "embed_dim", "num_prefix_tokens", "grid", "patch_size",
                     "img_size", "num_classes", "pool_reads_prefix_only", "data_config", "transform"):
            setattr(self, attr, getattr(family, attr))
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_tokens = self.num_prefix_tokens + self.num_patches
        self.has_head = self.num_classes > 0
        if class_names is None:
            class_names = family.default_class_names
        self.class_names = list(class_names) if class_names is not None else None

    def __repr__(self) -> str:
        return (f"ViT({self.name!r}, family={self.family.family}, L={self.depth}, H={self.num_heads}, "
                f"T={self.num_prefix_tokens}, grid={self.grid}, patch={self.patch_size}px, classes={self.num_classes})")

    def _repr_html_(self) -> str:
        """The shape facts in Jupyter (analysis.reprs.vit_html)."""
        return vit_html(self)

    # ---- input ---------------------------------------------------------------------------
    def preprocess(self, pil_images: Iterable) -> Tensor:
        """PIL images -> float tensor [B, 3, H, W] with the model's own eval transform."""
        return torch.stack([self.transform(im.convert("RGB")) for im in pil_images])

    def check_images(self, images: Tensor) -> Tensor:
        """Validate a preprocessed batch [B, 3, H, W] and move it to the model's device."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InputError(f"Images must be a float tensor [B, 3, H, W]; got {shape}. "
                             "Use vit.preprocess(pil_images) to build one.")
        if tuple(images.shape[-2:]) != self.img_size:
            raise InputError(f"Images are {images.shape[-2]}x{images.shape[-1]} px but {self.name} expects "
                             f"{self.img_size[0]}x{self.img_size[1]} px. Preprocess with vit.preprocess() "
                             f"or vit.transform, or load the model with img_size={images.shape[-1]}.")
        return images.to(self.device, torch.float32)

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """Patch + position embedding: [B, 3, H, W] -> tokens [B, N, C] (input of block 0)."""
        return self.family.embed(self.check_images(images))

    def attention_parts(self, layer: int, x: Tensor, n_query: int | None = None):
        """Block ``layer``'s (A [B, H, Nq, N], v [B, H, N, d], ctx) on its input x [B, N, C]."""
        return self.family.attention_parts(layer, x, n_query)

    def project(self, layer: int, o: Tensor, ctx) -> Tensor:
        """Concatenated head outputs o [..., Nq, H*d] -> z [..., Nq, C]."""
        return self.family.project(layer, o, ctx)

    def finish_block(self, layer: int, x: Tensor, z: Tensor) -> Tensor:
        """Residual add of z and the MLP half of block ``layer``: [..., Nq, C] -> [..., Nq, C]."""
        return self.family.finish_block(layer, x, z)

    # ---- residual-stream pieces (direct effects, head-to-head paths; analysis.metrics.circuits) ----
    def head_qkv(self, layer: int, x: Tensor, heads: Sequence[int] | None = None, parts: str = "qkv"):
        """q, k and/or v [B, H', N, d] (one per letter of ``parts``) of block ``layer``'s heads (default
        all), head heads[i] reading x[:, i] (x [B, H', N, C], pre-norm included)."""
        return self.family.head_qkv(layer, x, heads, parts)

    def attention_scale(self, layer: int) -> float:
        """The factor on q k^T before block ``layer``'s softmax."""
        return self.family.attention_scale(layer)

    def attention_context(self, layer: int, x: Tensor, n_query: int | None = None):
        """The ctx ``project`` / ``head_writes`` need besides o, from block ``layer``'s input x [B, N, C]."""
        return self.family.attention_context(layer, x, n_query)

    def head_writes(self, layer: int, o: Tensor, ctx) -> tuple[Tensor, Tensor]:
        """Per-head outputs o [B, H, Nq, d] -> (c [B, H, Nq, C] each head's write into the stream
        (layer scale included), the block's bias write [C])."""
        return self.family.head_writes(layer, o, ctx)

    def frozen_readout(self, x: Tensor):
        """The read-out with norm scales frozen on the clean final stream x [B, N, C]: an affine
        function p [B, M, N, C] -> (pooled [B, M, D], logits [B, M, K] or None)."""
        return self.family.frozen_readout(x)

    def block(self, layer: int, x: Tensor, hook: AttentionHook | None = None, n_query: int | None = None,
              head_hook: HeadHook | None = None) -> Tensor:
        """One block with the hook points. x [B, N, C] -> [B, Nq, C]. Without hooks the pattern is
        not materialised (the family's fused attention)."""
        if hook is None and head_hook is None:
            o, ctx = self.family.fused_heads(layer, x, n_query)
        else:
            A, v, ctx = self.family.attention_parts(layer, x, n_query)
            if hook is not None:
                edited = hook(layer, A)
                A = A if edited is None else edited
            o = A @ v
            if head_hook is not None:
                edited = head_hook(layer, o)
                o = o if edited is None else edited
            o = heads_concat(o)
        z = self.family.project(layer, o, ctx)
        return self.family.finish_block(layer, x[:, : o.shape[1]], z)

    def blocks(self, x: Tensor, start: int = 0, stop: int | None = None, hook: AttentionHook | None = None,
               prefix_only_last: bool = False, head_hook: HeadHook | None = None) -> Tensor:
        """Run blocks start..stop-1 on x [B, N, C]. With prefix_only_last the final model block
        only computes the prefix tokens (enough for the pooled output)."""
        stop = self.depth if stop is None else stop
        for layer in range(start, stop):
            n_query = self.num_prefix_tokens if (prefix_only_last and layer == self.depth - 1) else None
            x = self.block(layer, x, hook, n_query, head_hook)
        return x

    def forward(self, images: Tensor, prune: Iterable[tuple[int, int, Regions]] | None = None,
                head_hook: HeadHook | None = None) -> Tensor:
        """Logits [B, C] (or pooled embedding [B, D] for a backbone), optionally pruned; differentiable."""
        hook = self._hook(prune)
        x = self.blocks(self.embed(images), hook=hook, prefix_only_last=self.pool_reads_prefix_only,
                        head_hook=head_hook)
        pooled, logits = self.outputs(x)
        return pooled if logits is None else logits

    @torch.inference_mode()
    def __call__(self, images: Tensor, prune: Iterable[tuple[int, int, Regions]] | None = None) -> Tensor:
        """Logits [B, C] (or pooled embedding [B, D] for a backbone), optionally pruned."""
        return self.forward(images, prune)

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Final block output [B, N', C] -> (pooled embedding [B, D], logits [B, C] or None)."""
        return self.family.outputs(x)

    def _hook(self, prune) -> AttentionHook | None:
        extra = getattr(self, "_context_prune", None)
        spec = list(prune or []) + list(extra or [])
        if not spec:
            return None
        return prune_hook(spec, self.num_heads, self.depth, self.num_prefix_tokens)

    @contextlib.contextmanager
    def prune(self, spec: Iterable[tuple[int, int, Regions]]):
        """Context in which every forward prunes ``[(layer, head, regions), ...]``."""
        spec = list(spec)
        prune_hook(spec, self.num_heads, self.depth, self.num_prefix_tokens)  # validate now
        previous = getattr(self, "_context_prune", None)
        self._context_prune = list(previous or []) + spec
        try:
            yield self
        finally:
            self._context_prune = previous

    @torch.inference_mode()
    def capture_attention(self, images: Tensor, layers: Sequence[int] | None = None,
                          dtype: torch.dtype = torch.float32) -> Tensor:
        """Post-softmax attention [B, L', H, N, N] of the given blocks (default all).

        Runs only up to the last requested block and keeps only the requested matrices.
        """
        layers = list(range(self.depth)) if layers is None else [int(l) for l in layers]
        bad = [l for l in layers if not 0 <= l < self.depth]
        if bad:
            raise InputError(f"Layers {bad} do not exist: {self.name} has layers 0-{self.depth - 1}.")
        x = self.embed(images)
        out = torch.empty(x.shape[0], len(layers), self.num_heads, self.num_tokens, self.num_tokens,
                          dtype=dtype, device=x.device)
        slot = {l: i for i, l in enumerate(layers)}
        base_hook = self._hook(None)

        def hook(layer: int, A: Tensor):
            edited = base_hook(layer, A) if base_hook else None
            if layer in slot:
                out[:, slot[layer]] = (A if edited is None else edited).to(dtype)
            return edited

        if layers:
            self.blocks(x, stop=max(layers) + 1, hook=hook)
        return out


# ---- loading -----------------------------------------------------------------------------

def load_vit(model: str | nn.Module, weights: str | Path | None = None, pretrained: bool = False,
             img_size: int | None = None, num_classes: int | None = None,
             class_names: Sequence[str] | None = None, device: str = "cpu") -> ViT:
    """Load a ViT for analysis.

    model: a timm model name, a checkpoint folder of a registered family (HuggingFace), a built
    module of a registered family, "default" (DINOv2 ViT-S/14 with the Fashion-MNIST probe,
    112 px) or "default-backbone" (the same backbone without a head, 224 px).
    weights: .safetensors / .pth / .pt state dict, loaded strictly (num_classes is read from the
    checkpoint's head, and img_size from its position grid, when not given).
    pretrained: download the family's weights (needs internet).
    """
    if isinstance(model, nn.Module):
        sha = None
        if weights is not None:
            load_weights(model, read_state_dict(weights), source=f"weights in {weights}")
            sha = sha256_file(weights)
        return ViT(model, class_names=class_names, weights_sha256=sha, device=device)
    if not isinstance(model, str):
        raise ModelLoadError(f"load_vit takes a model name, a checkpoint folder or a module, not {type(model).__name__}.")
    entry = family_for_name(model)
    if entry is None:
        raise unknown_model(model)
    family, sha, names = entry.load(model, weights=weights, pretrained=pretrained, img_size=img_size,
                                    num_classes=num_classes)
    return ViT(family, name=model, class_names=class_names or names, weights_sha256=sha, device=device)


def model_from_manifest(model: dict, device: str = "cpu") -> ViT:
    """Re-load the model a run was built with (manifest["model"]). A run written from a notebook's
    in-memory model (``in_memory``; analysis.notebook.save_result) names no weights to reload:
    ModelLoadError saying so, never a silently re-initialised model."""
    if model.get("in_memory"):
        raise ModelLoadError(
            f"This run was written from a notebook's in-memory model ({model.get('name')}); no weights to reload "
            "were saved with it, so its online views need that model: serve the run from the notebook that holds "
            "it with analysis.notebook.explorer(result, vit=vit, images=images), or build a run from saved "
            "weights with `headscope build`. Precomputed views keep working.")
    family = next((e.family for e in families() if e.family.family == model.get("family")), None)
    sized = model.get("weights") or model.get("pretrained") or (family is not None and family.sized_by_files)
    return load_vit(model["name"], weights=model.get("weights"), pretrained=bool(model.get("pretrained")),
                    img_size=model.get("img_size") if sized else None,
                    num_classes=model.get("num_classes"), class_names=model.get("class_names"), device=device)


def model_reference(name: str) -> str:
    """The model as a run records it: its family's reference (a checkpoint folder as its absolute
    path), anything else as given."""
    entry = family_for_name(name)
    return entry.reference(name) if entry is not None and entry.reference is not None else name


def model_short_name(name: str) -> str:
    """The model's part of a default run folder name: its family's short name (a checkpoint folder:
    the folder's own name), anything else as given."""
    entry = family_for_name(name)
    return entry.short_name(name) if entry is not None and entry.short_name is not None else name


def brings_weights(name: str) -> bool:
    """Does ``name`` load trained weights by itself (an embedded default, a checkpoint folder)?"""
    entry = family_for_name(name)
    return entry is not None and entry.brings_weights is not None and entry.brings_weights(name)
