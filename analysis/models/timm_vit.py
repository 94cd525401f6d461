"""The timm Vision Transformer family: the only module that knows timm's internals.

timm's ``Attention`` may run fused (``scaled_dot_product_attention``), where the attention matrix
never exists. ``TimmViT`` therefore recomputes each block step by step from the block's own
weights (qkv, q/k norm, softmax, optional gate, norm, proj; layer scale, drop path, MLP), so
the engine can read and edit the post-softmax pattern. The timm model is never modified.
Covers vit_*, deit_* (distilled too), deit3_*, *_dinov2 and *_reg4_dinov2 models.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from analysis.errors import ModelLoadError
from analysis.models.labels import imagenet_names
from analysis.models.registry import register_family
from analysis.models.family import ModelFamily, frozen_layer_norm, sdpa_heads, softmax_attention
from analysis.models.weights import checkpoint_img_size, load_weights, read_state_dict, sha256_file


class TimmViT(ModelFamily):
    """A timm ``VisionTransformer`` (or ``VisionTransformerDistilled``) behind the family seam."""

    family = "timm-vit"

    def __init__(self, model: nn.Module):
        check_supported(model)
        self.module = model.eval()
        blk = model.blocks[0]
        self.depth = len(model.blocks)
        self.num_heads = blk.attn.num_heads
        self.head_dim = blk.attn.head_dim
        self.embed_dim = model.embed_dim
        self.num_prefix_tokens = model.num_prefix_tokens
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        ps = model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.img_size = tuple(int(s) for s in model.patch_embed.img_size)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.pool_reads_prefix_only = (
            type(model).__name__ == "VisionTransformerDistilled"
            or (model.global_pool == "token" and model.attn_pool is None)
        )
        self.default_name = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
        self.default_class_names = imagenet_class_names() if self.num_classes == 1000 else None
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        cfg["input_size"] = (3, *self.img_size)
        self.data_config = cfg
        self.transform = timm.data.create_transform(**cfg, is_training=False)

    # ---- the seam ----------------------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        m = self.module
        x = m._pos_embed(m.patch_embed(images))
        return m.norm_pre(m.patch_drop(x))

    def _qkv(self, layer: int, x: Tensor, n_query: int | None):
        """Queries [B, H, Nq, d], keys and values [B, H, N, d], gate [B, Nq, H*d] or None."""
        blk = self.module.blocks[layer]
        attn = blk.attn
        x = blk.norm1(x)
        B, N, _ = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        xq = x
        if n_query is not None and n_query < N:
            q, xq = q[:, :, :n_query], x[:, :n_query]
        gate = attn.gate(xq).sigmoid() if getattr(attn, "gate", None) is not None else None
        return q, k, v, gate

    def attention_parts(self, layer: int, x: Tensor, n_query: int | None = None) -> tuple[Tensor, Tensor, Any]:
        q, k, v, gate = self._qkv(layer, x, n_query)
        return softmax_attention(q, k, self.module.blocks[layer].attn.scale), v, gate

    def fused_heads(self, layer: int, x: Tensor, n_query: int | None = None) -> tuple[Tensor, Any]:
        q, k, v, gate = self._qkv(layer, x, n_query)
        return sdpa_heads(q, k, v, self.module.blocks[layer].attn.scale), gate

    def project(self, layer: int, o: Tensor, ctx: Any) -> Tensor:
        attn = self.module.blocks[layer].attn
        o = attn.norm(o)
        if ctx is not None:  # gated attention: ctx is the sigmoid gate [B, Nq, H*d]
            o = o * ctx
        return attn.proj(o)

    def finish_block(self, layer: int, x: Tensor, z: Tensor) -> Tensor:
        blk = self.module.blocks[layer]
        x = x + blk.drop_path1(blk.ls1(z))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        m = self.module
        x = m.norm(x)
        pooled = m.forward_head(x, pre_logits=True)
        logits = m.forward_head(x) if self.num_classes > 0 else None
        return pooled, logits

    # ---- residual-stream pieces ----------------------------------------------------------------
    def head_qkv(self, layer: int, x: Tensor, heads: Sequence[int] | None = None, parts: str = "qkv") -> tuple[Tensor, ...]:
        blk = self.module.blocks[layer]
        attn = blk.attn
        heads = list(range(self.num_heads)) if heads is None else list(heads)
        xn = blk.norm1(x)                                                       # [B, H', N, C]
        weight = attn.qkv.weight.view(3, self.num_heads, self.head_dim, -1)     # [3, H, d, C]
        bias = None if attn.qkv.bias is None else attn.qkv.bias.view(3, self.num_heads, self.head_dim)
        post = {"q": attn.q_norm, "k": attn.k_norm, "v": lambda t: t}
        out = []
        for part in parts:
            i = "qkv".index(part)
            t = torch.einsum("bhnc,hdc->bhnd", xn, weight[i, heads])
            out.append(post[part](t if bias is None else t + bias[i, heads][:, None]))
        return tuple(out)

    def attention_scale(self, layer: int) -> float:
        return self.module.blocks[layer].attn.scale

    def attention_context(self, layer: int, x: Tensor, n_query: int | None = None) -> Any:
        blk = self.module.blocks[layer]
        gate = getattr(blk.attn, "gate", None)
        if gate is None:
            return None
        xq = blk.norm1(x if n_query is None else x[:, :n_query])
        return gate(xq).sigmoid()

    def head_writes(self, layer: int, o: Tensor, ctx: Any) -> tuple[Tensor, Tensor]:
        blk = self.module.blocks[layer]
        attn = blk.attn
        if not isinstance(getattr(attn, "norm", None), (nn.Identity, type(None))):
            raise ModelLoadError(f"Block {layer} normalises the concatenated head outputs (timm scale_norm), so "
                                 "a head's write into the stream is not its own: direct effects and paths need "
                                 "a ViT without scale_norm (e.g. vit_small_patch16_224).")
        B, H, Nq, d = o.shape
        if ctx is not None:  # gated attention: each head's output times its slice of the gate
            o = o * ctx.view(B, Nq, H, d).transpose(1, 2)
        C = self.embed_dim
        c = torch.einsum("bhnd,chd->bhnc", o, attn.proj.weight.view(C, H, d))
        scale = blk.ls1(torch.ones(C, device=o.device, dtype=o.dtype))       # layer scale (ones where none)
        bias = attn.proj.bias if attn.proj.bias is not None else torch.zeros(C, device=o.device, dtype=o.dtype)
        return c * scale, bias * scale

    def frozen_readout(self, x: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
        m = self.module
        distilled = type(m).__name__ == "VisionTransformerDistilled"
        if getattr(m, "attn_pool", None) is not None or (not distilled and m.global_pool not in ("token", "avg")):
            pool = "attention pooling" if getattr(m, "attn_pool", None) is not None else f"global_pool={m.global_pool!r}"
            raise ModelLoadError(f"{type(m).__name__} pools its tokens with {pool}, which is not linear: direct "
                                 "effects and paths need 'token' or 'avg' pooling (a read-out made affine by "
                                 "freezing the norms). Use a model with global_pool='token' or 'avg'.")
        norm = frozen_layer_norm(m.norm, x)
        fc_norm = None if distilled else frozen_layer_norm(m.fc_norm, m.pool(m.norm(x)))
        classes = self.num_classes > 0

        def readout(p: Tensor) -> tuple[Tensor, Tensor | None]:
            seq = norm(p)                                                       # [B, M, N, C]
            if distilled:  # CLS and distillation token, two heads averaged (timm's eval forward_head)
                cls, dist = seq[:, :, 0], seq[:, :, 1]
                return (cls + dist) / 2, ((m.head(cls) + m.head_dist(dist)) / 2 if classes else None)
            pooled = fc_norm(m.pool(seq.flatten(0, 1)).unflatten(0, seq.shape[:2]))
            return pooled, (m.head(pooled) if classes else None)

        return readout


# ---- recognising and loading -------------------------------------------------------------------

def accepts_module(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def accepts_name(name: str) -> bool:
    import timm

    return timm.is_model(name)


def check_supported(model: nn.Module) -> None:
    """Raise ModelLoadError unless ``model`` is a timm VisionTransformer with standard attention."""
    from timm.layers import Attention

    if not accepts_module(model):
        raise ModelLoadError(
            f"{type(model).__name__} is not a supported ViT: HeadScope needs a timm VisionTransformer "
            "(vit_*, deit_*, deit3_*, vit_*_dinov2, vit_*_reg4_dinov2) or a HuggingFace checkpoint folder.")
    odd = {type(b.attn).__name__ for b in model.blocks if not isinstance(b.attn, Attention)}
    if odd or not all(hasattr(b, "ls1") and hasattr(b, "norm2") for b in model.blocks):
        raise ModelLoadError(
            f"{type(model).__name__} uses blocks or attention HeadScope cannot hook ({', '.join(sorted(odd)) or 'non-standard blocks'}); "
            "use a standard timm ViT such as vit_small_patch16_224.")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from timm's ImageNetInfo)."""
    return list(imagenet_names()[1])


def unknown_model(name: str) -> ModelLoadError:
    import timm

    close = difflib.get_close_matches(name, timm.list_models("*vit*") + timm.list_models("deit*"), n=4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ModelLoadError(f"Unknown model '{name}'.{hint} Use a timm ViT name (timm.list_models('vit_*')), "
                          "a HuggingFace checkpoint folder, 'default' or 'default-backbone'.")


def load_timm(name: str, weights: str | Path | None = None, pretrained: bool = False,
              img_size: int | None = None, num_classes: int | None = None) -> tuple[TimmViT, str | None, None]:
    """Build timm model ``name`` (optionally with a state-dict file) -> (family, weights sha256, class names)."""
    import timm

    if not timm.is_model(name):
        raise unknown_model(name)
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
        with _offline_unless_hub_reachable(pretrained):
            module = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:
        if pretrained:
            raise ModelLoadError(
                f"Could not download pretrained weights for '{name}' ({type(err).__name__}: {err}). "
                "Are you offline? Pass a local checkpoint with weights=PATH (--weights PATH) instead.") from None
        raise ModelLoadError(f"Could not build '{name}': {err}") from None
    check_supported(module)
    trained_px = checkpoint_img_size(module, sd) if sd is not None and img_size is None else None
    if trained_px is not None:  # e.g. a 384 px checkpoint under a *_224 name: build it at 384
        module = timm.create_model(name, pretrained=False, **kwargs, img_size=trained_px)
    sha = None
    if sd is not None:
        load_weights(module, sd, source=f"weights in {weights}")
        sha = sha256_file(weights)
    return TimmViT(module), sha, None


HUB_TIMEOUT_S = 3.0  # how long the pretrained-weights path waits to see whether the hub answers


@contextlib.contextmanager
def _offline_unless_hub_reachable(pretrained: bool):
    """While loading pretrained weights with the HuggingFace hub out of reach (or HEADSCOPE_OFFLINE=1),
    switch huggingface_hub to offline mode: weights in its local cache still load, missing ones fail
    at once instead of after ~40 s of retries."""
    if not pretrained:
        yield
        return
    from huggingface_hub import constants

    offline = os.environ.get("HEADSCOPE_OFFLINE") == "1" or not _reachable(constants.ENDPOINT)
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _reachable(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


register_family("timm-vit", family=TimmViT, accepts_module=accepts_module, accepts_name=accepts_name,
                load=load_timm, priority=50)
