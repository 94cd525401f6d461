"""The ViT adapter: one uniform view of any timm Vision Transformer.

``load_vit`` accepts a timm model name, an already built timm module, or one of HeadScope's
embedded defaults, plus optional weights. The returned ``ViT`` exposes the shape facts the
analysis needs (depth, heads, prefix tokens, patch grid), the model's own preprocessing, and a
forward that runs block by block through ``analysis.hooks`` so the attention pattern always
exists and can be captured or pruned, whatever timm's fused-attention setting.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError, ModelLoadError, WeightsMismatchError
from .hooks import AttentionHook, block_forward
from .pruning import Regions, prune_hook


class ViT:
    """A timm ViT with HeadScope's shape facts, preprocessing and hookable forward.

    Attributes: depth L, num_heads H, head_dim, embed_dim, num_prefix_tokens T, grid (gh, gw),
    num_patches P, num_tokens N = T + P, patch_size (px), img_size (h, w) px, num_classes
    (0 for a backbone), has_head, class_names, data_config, transform, name, weights_sha256.
    """

    def __init__(self, model: nn.Module, name: str | None = None, class_names: Sequence[str] | None = None,
                 weights_sha256: str | None = None, device: str | torch.device = "cpu"):
        check_supported(model)
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.name = name or getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
        self.weights_sha256 = weights_sha256
        blk = model.blocks[0]
        self.depth = len(model.blocks)
        self.num_heads = blk.attn.num_heads
        self.head_dim = blk.attn.head_dim
        self.embed_dim = model.embed_dim
        self.num_prefix_tokens = model.num_prefix_tokens
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_tokens = self.num_prefix_tokens + self.num_patches
        ps = model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.img_size = tuple(int(s) for s in model.patch_embed.img_size)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.has_head = self.num_classes > 0
        if class_names is None and self.num_classes == 1000:
            class_names = imagenet_class_names()
        self.class_names = list(class_names) if class_names is not None else None
        # The pooled output reads only the prefix tokens ('token' pooling, DeiT distillation):
        # the last block then only needs the prefix tokens as queries.
        self.pool_reads_prefix_only = (
            type(model).__name__ == "VisionTransformerDistilled"
            or (model.global_pool == "token" and model.attn_pool is None)
        )
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        cfg["input_size"] = (3, *self.img_size)
        self.data_config = cfg
        self.transform = timm.data.create_transform(**cfg, is_training=False)

    def __repr__(self) -> str:
        return (f"ViT({self.name!r}, L={self.depth}, H={self.num_heads}, T={self.num_prefix_tokens}, "
                f"grid={self.grid}, patch={self.patch_size}px, classes={self.num_classes})")

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
        m = self.model
        x = m.patch_embed(self.check_images(images))
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def blocks(self, x: Tensor, start: int = 0, stop: int | None = None, hook: AttentionHook | None = None,
               prefix_only_last: bool = False) -> Tensor:
        """Run blocks start..stop-1 on x [B, N, C]. With prefix_only_last the final model block
        only computes the prefix tokens (enough for the pooled output)."""
        stop = self.depth if stop is None else stop
        for layer in range(start, stop):
            n_query = self.num_prefix_tokens if (prefix_only_last and layer == self.depth - 1) else None
            x = block_forward(self.model.blocks[layer], x, layer, hook, n_query)
        return x

    @torch.inference_mode()
    def __call__(self, images: Tensor, prune: Iterable[tuple[int, int, Regions]] | None = None) -> Tensor:
        """Logits [B, C] (or pooled embedding [B, D] for a backbone), optionally pruned."""
        hook = self._hook(prune)
        x = self.blocks(self.embed(images), hook=hook, prefix_only_last=self.pool_reads_prefix_only)
        pooled, logits = self.outputs(x)
        return pooled if logits is None else logits

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Final block output [B, N', C] -> (pooled embedding [B, D], logits [B, C] or None)."""
        m = self.model
        x = m.norm(x)
        pooled = m.forward_head(x, pre_logits=True)
        logits = m.forward_head(x) if self.has_head else None
        return pooled, logits

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

def check_supported(model: nn.Module) -> None:
    """Raise ModelLoadError unless ``model`` is a timm VisionTransformer with standard attention."""
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ModelLoadError(
            f"{type(model).__name__} is not a supported ViT: HeadScope needs a timm VisionTransformer "
            "(vit_*, deit_*, deit3_*, vit_*_dinov2, vit_*_reg4_dinov2).")
    odd = {type(b.attn).__name__ for b in model.blocks if not isinstance(b.attn, Attention)}
    if odd or not all(hasattr(b, "ls1") and hasattr(b, "norm2") for b in model.blocks):
        raise ModelLoadError(
            f"{type(model).__name__} uses blocks or attention HeadScope cannot hook ({', '.join(sorted(odd)) or 'non-standard blocks'}); "
            "use a standard timm ViT such as vit_small_patch16_224.")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from timm's ImageNetInfo)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from .safetensors, or .pth/.pt/.bin loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"Weights file {path} does not exist. Check the path passed as weights/--weights.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or pickled with arbitrary code
        raise ModelLoadError(f"Could not read weights {path}: {err}. Use a .safetensors file, or a "
                             ".pth/.pt state dict that loads with torch.load(weights_only=True).") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str = "weights") -> None:
    """Strictly load a state dict; pos_embed of another grid is resampled (bicubic, like timm).

    Raises WeightsMismatchError naming missing / unexpected keys and shape mismatches.
    """
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict()
    sd = dict(state_dict)
    pe = sd.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape and pe.ndim == 3:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        old = int(round((pe.shape[1] - prefix) ** 0.5))
        if old * old == pe.shape[1] - prefix:
            sd["pos_embed"] = resample_abs_pos_embed(pe, new_size=model.patch_embed.grid_size,
                                                     old_size=(old, old), num_prefix_tokens=prefix)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise WeightsMismatchError(
            f"The {source} do not fit {type(model).__name__}: " + "; ".join(parts)
            + ". Check that the model name (and num_classes / img_size) match the checkpoint.")
    model.load_state_dict(sd, strict=True)


def _checkpoint_img_size(model: nn.Module, sd: dict[str, Tensor]) -> int | None:
    """The input size (px) a checkpoint's square pos_embed grid was trained for, when it differs
    from the model's; None when it matches or cannot be told."""
    pe = sd.get("pos_embed")
    if pe is None or pe.ndim != 3 or not hasattr(model, "patch_embed"):
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    side = int(round(max(pe.shape[1] - prefix, 0) ** 0.5))
    grid = tuple(model.patch_embed.grid_size)
    if side * side != pe.shape[1] - prefix or grid == (side, side) or getattr(model, "dynamic_img_size", False):
        return None
    return side * model.patch_embed.patch_size[0]


def _unknown_model(name: str) -> ModelLoadError:
    import timm

    close = difflib.get_close_matches(name, timm.list_models("*vit*") + timm.list_models("deit*"), n=4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ModelLoadError(f"Unknown model '{name}'.{hint} Use a timm ViT name (timm.list_models('vit_*')), "
                          "'default' or 'default-backbone'.")


def load_vit(model: str | nn.Module, weights: str | Path | None = None, pretrained: bool = False,
             img_size: int | None = None, num_classes: int | None = None,
             class_names: Sequence[str] | None = None, device: str = "cpu") -> ViT:
    """Load a ViT for analysis.

    model: a timm model name, a built timm VisionTransformer, "default" (DINOv2 ViT-S/14 with the
    Fashion-MNIST probe, 112 px) or "default-backbone" (the same backbone without a head, 224 px).
    weights: .safetensors / .pth / .pt state dict, loaded strictly (num_classes is read from the
    checkpoint's head, and img_size from its position grid, when not given).
    pretrained: download timm's weights (needs internet).
    """
    sha = None
    if isinstance(model, nn.Module):
        name = None
        module = model
    elif isinstance(model, str):
        from . import defaults

        name = model
        if model in defaults.DEFAULT_MODELS:
            if weights is not None or pretrained:
                raise ModelLoadError(f"'{model}' brings its own weights; do not pass weights or pretrained.")
            module, meta = defaults.build_default(model)
            return ViT(module, name=model, class_names=meta.get("class_names"),
                       weights_sha256=meta.get("weights_sha256"), device=device)
        import timm

        if not timm.is_model(model):
            raise _unknown_model(model)
        sd = read_state_dict(weights) if weights is not None else None
        kwargs = {}
        if img_size is not None:
            kwargs["img_size"] = img_size
        if num_classes is None and sd is not None:
            head = sd.get("head.weight")
            num_classes = int(head.shape[0]) if head is not None else 0
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        try:
            module = timm.create_model(model, pretrained=pretrained, **kwargs)
        except Exception as err:
            if pretrained:
                raise ModelLoadError(
                    f"Could not download pretrained weights for '{model}' ({type(err).__name__}: {err}). "
                    "Are you offline? Pass a local checkpoint with weights=PATH (--weights PATH) instead.") from None
            raise ModelLoadError(f"Could not build '{model}': {err}") from None
        check_supported(module)
        trained_px = _checkpoint_img_size(module, sd) if sd is not None and img_size is None else None
        if trained_px is not None:  # e.g. a 384 px checkpoint under a *_224 name: build it at 384
            module = timm.create_model(model, pretrained=False, **kwargs, img_size=trained_px)
        if sd is not None:
            load_weights(module, sd, source=f"weights in {weights}")
            sha = sha256_file(weights)
    else:
        raise ModelLoadError(f"load_vit takes a model name or a timm module, not {type(model).__name__}.")
    if isinstance(model, nn.Module) and weights is not None:
        load_weights(module, read_state_dict(weights), source=f"weights in {weights}")
        sha = sha256_file(weights)
    return ViT(module, name=name, class_names=class_names, weights_sha256=sha, device=device)
