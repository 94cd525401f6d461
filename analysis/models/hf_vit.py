"""The HuggingFace transformers family: local checkpoint folders of ViT, DeiT and DINOv2.

``load_vit("path/to/folder")`` reads a folder written by ``save_pretrained`` (``config.json`` +
``model.safetensors``, optionally ``preprocessor_config.json``). Weights are read with safetensors
only (``use_safetensors=True``, no pickle). ``HFViT`` recomputes each layer from the layer's own
modules (pre-norm, q/k/v projections, softmax, output projection, layer scale, MLP) so the
engine can read and edit the post-softmax pattern; the HF module is never modified. The
embeddings are HF's own module, so DINOv2's position-embedding interpolation to the input size
is exactly HF's. ``transformers`` is imported only when such a folder or module is loaded.

Covered (class -> pooled output the head reads):
  ViTModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel: CLS after the final layer norm;
  ViTForImageClassification, DeiTForImageClassification: CLS after the final layer norm;
  DeiTForImageClassificationWithTeacher: CLS and distillation token, logits = mean of both heads;
  Dinov2(WithRegisters)ForImageClassification: concat(CLS, mean of patch tokens).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from analysis.errors import ModelLoadError, WeightsMismatchError
from analysis.models.registry import register_family
from analysis.models.family import ModelFamily, frozen_layer_norm, sdpa_heads, softmax_attention
from analysis.models.weights import sha256_file

# class name -> how its head reads the final tokens ("" = backbone, no head)
SUPPORTED = {
    "ViTModel": "", "ViTForImageClassification": "cls",
    "DeiTModel": "", "DeiTForImageClassification": "cls", "DeiTForImageClassificationWithTeacher": "cls+dist",
    "Dinov2Model": "", "Dinov2ForImageClassification": "cls+patch_mean",
    "Dinov2WithRegistersModel": "", "Dinov2WithRegistersForImageClassification": "cls+patch_mean",
}
BACKBONE_OF = {"vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model",
               "dinov2_with_registers": "Dinov2WithRegistersModel"}  # config model_type -> base class
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
TESTED_TRANSFORMERS = "5.23.0"


def supported_classes() -> list[str]:
    """The covered classes the installed transformers provides (all of SUPPORTED when not installed)."""
    try:
        import transformers
    except ImportError:
        return list(SUPPORTED)
    return [c for c in SUPPORTED if hasattr(transformers, c)]


def _unsupported(what: str) -> ModelLoadError:
    return ModelLoadError(f"{what} is not supported. HeadScope reads HuggingFace checkpoints of "
                          f"{', '.join(supported_classes())} (with safetensors weights), and timm ViTs by name.")


class HFViT(ModelFamily):
    """A HuggingFace ViT / DeiT / DINOv2 model behind the family seam.

    img_size: input size (h, w) px; None = the preprocessing's output size (``preprocessor``:
    the folder's preprocessor_config.json as a dict, or None for config image_size + ImageNet
    mean/std). Inputs of another size than config.image_size use HF's position interpolation.
    """
    sized_by_files = True  # a checkpoint folder: reloaded at the size the run recorded

    family = "hf"

    def __init__(self, model: nn.Module, preprocessor: dict | None = None, img_size: tuple[int, int] | None = None):
        arch = type(model).__name__
        if arch not in SUPPORTED:
            raise _unsupported(f"The HuggingFace class {arch}")
        self.module = model.eval()
        self.head = SUPPORTED[arch]
        cfg = model.config
        base = model.base_model
        self.base = base
        self.layers = base.layers if hasattr(base, "layers") else base.encoder.layer
        check_layout(self.layers, arch)
        attn = self.layers[0].attention
        self.depth = len(self.layers)
        self.num_heads = int(attn.num_attention_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = self.head_dim ** -0.5
        self.embed_dim = int(cfg.hidden_size)
        self.num_prefix_tokens = {"deit": 2}.get(cfg.model_type, 1) + int(getattr(cfg, "num_register_tokens", 0) or 0)
        ps = cfg.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        transform, data_config = build_transform(preprocessor, _pair(cfg.image_size), img_size)
        self.transform, self.data_config = transform, data_config
        self.img_size = tuple(data_config["input_size"][1:])
        self.grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self._embed_kwargs = {}
        if cfg.model_type in ("vit", "deit") and self.img_size != _pair(cfg.image_size):
            self._embed_kwargs = {"interpolate_pos_encoding": True}  # DINOv2 interpolates on its own
        self.heads = [getattr(model, n) for n in ("classifier", "cls_classifier", "distillation_classifier")
                      if isinstance(getattr(model, n, None), nn.Linear)]
        self.num_classes = int(self.heads[0].out_features) if self.heads else 0
        if not self.heads:
            self.head = ""  # a classification class saved with num_labels=0 (Identity head): a backbone
        self.pool_reads_prefix_only = self.head != "cls+patch_mean"
        self.default_name = getattr(cfg, "_name_or_path", "") or arch
        self.default_class_names = class_names_of(cfg, self.num_classes)

    # ---- the seam ----------------------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        return self.base.embeddings(images, **self._embed_kwargs)

    def _qkv(self, layer: int, x: Tensor, n_query: int | None):
        """Queries [B, H, Nq, d], keys and values [B, H, N, d] of the layer's pre-normed input."""
        blk = self.layers[layer]
        attn = blk.attention
        x = _norm1(blk)(x)
        xq = x if n_query is None or n_query >= x.shape[1] else x[:, :n_query]

        def heads(linear, t):
            B, N, _ = t.shape
            return linear(t).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

        return heads(attn.q_proj, xq), heads(attn.k_proj, x), heads(attn.v_proj, x)

    def attention_parts(self, layer: int, x: Tensor, n_query: int | None = None) -> tuple[Tensor, Tensor, Any]:
        q, k, v = self._qkv(layer, x, n_query)
        return softmax_attention(q, k, self.scale), v, None

    def fused_heads(self, layer: int, x: Tensor, n_query: int | None = None) -> tuple[Tensor, Any]:
        q, k, v = self._qkv(layer, x, n_query)
        return sdpa_heads(q, k, v, self.scale), None

    def project(self, layer: int, o: Tensor, ctx: Any) -> Tensor:
        return self.layers[layer].attention.o_proj(o)

    def finish_block(self, layer: int, x: Tensor, z: Tensor) -> Tensor:
        blk = self.layers[layer]
        ls1, ls2 = getattr(blk, "layer_scale1", None), getattr(blk, "layer_scale2", None)
        x = x + (ls1(z) if ls1 is not None else z)
        m = blk.mlp(_norm2(blk)(x))
        return x + (ls2(m) if ls2 is not None else m)

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        seq = self.base.layernorm(x)
        if self.head == "cls+patch_mean":
            pooled = torch.cat([seq[:, 0], seq[:, self.num_prefix_tokens:].mean(dim=1)], dim=1)
        elif self.head == "cls+dist":
            pooled = (seq[:, 0] + seq[:, 1]) / 2
            return pooled, (self.heads[0](seq[:, 0]) + self.heads[1](seq[:, 1])) / 2
        else:
            pooled = seq[:, 0]
        return pooled, (self.heads[0](pooled) if self.heads else None)


    # ---- residual-stream pieces ----------------------------------------------------------------
    def head_qkv(self, layer: int, x: Tensor, heads: Sequence[int] | None = None, parts: str = "qkv") -> tuple[Tensor, ...]:
        blk = self.layers[layer]
        attn = blk.attention
        heads = list(range(self.num_heads)) if heads is None else list(heads)
        xn = _norm1(blk)(x)                                                     # [B, H', N, C]

        def project(linear: nn.Linear) -> Tensor:
            out = torch.einsum("bhnc,hdc->bhnd", xn, linear.weight.view(self.num_heads, self.head_dim, -1)[heads])
            return out if linear.bias is None else out + linear.bias.view(self.num_heads, self.head_dim)[heads][:, None]

        linears = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}
        return tuple(project(linears[part]) for part in parts)

    def attention_scale(self, layer: int) -> float:
        return self.scale

    def attention_context(self, layer: int, x: Tensor, n_query: int | None = None) -> Any:
        return None

    def head_writes(self, layer: int, o: Tensor, ctx: Any) -> tuple[Tensor, Tensor]:
        blk = self.layers[layer]
        out = blk.attention.o_proj
        B, H, Nq, d = o.shape
        C = self.embed_dim
        c = torch.einsum("bhnd,chd->bhnc", o, out.weight.view(C, H, d))
        ones = torch.ones(C, device=o.device, dtype=o.dtype)
        ls1 = getattr(blk, "layer_scale1", None)
        scale = ls1(ones) if ls1 is not None else ones                          # layer scale (ones where none)
        bias = out.bias if out.bias is not None else torch.zeros_like(ones)
        return c * scale, bias * scale

    def frozen_readout(self, x: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
        norm = frozen_layer_norm(self.base.layernorm, x)
        T = self.num_prefix_tokens

        def readout(p: Tensor) -> tuple[Tensor, Tensor | None]:
            seq = norm(p)                                                       # [B, M, N, C]
            if self.head == "cls+patch_mean":
                pooled = torch.cat([seq[:, :, 0], seq[:, :, T:].mean(dim=2)], dim=-1)
            elif self.head == "cls+dist":
                cls, dist = seq[:, :, 0], seq[:, :, 1]
                return (cls + dist) / 2, (self.heads[0](cls) + self.heads[1](dist)) / 2
            else:
                pooled = seq[:, :, 0]
            return pooled, (self.heads[0](pooled) if self.heads else None)

        return readout


def _norm1(blk: nn.Module) -> nn.Module:
    return blk.layernorm_before if hasattr(blk, "layernorm_before") else blk.norm1


def _norm2(blk: nn.Module) -> nn.Module:
    return blk.layernorm_after if hasattr(blk, "layernorm_after") else blk.norm2


def check_layout(layers: nn.ModuleList, arch: str) -> None:
    """Raise ModelLoadError unless every layer has the module layout HFViT reads."""
    for blk in layers:
        attn = getattr(blk, "attention", None)
        ok = (attn is not None and all(isinstance(getattr(attn, n, None), nn.Linear)
                                       for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
              and hasattr(blk, "mlp") and (hasattr(blk, "layernorm_before") or hasattr(blk, "norm1")))
        if not ok:
            import transformers

            raise ModelLoadError(
                f"{arch} from transformers {transformers.__version__} has a layer layout HeadScope does not "
                f"read (expected attention.q_proj/k_proj/v_proj/o_proj, a pre-norm and mlp). Install the "
                f"tested version: pip install transformers=={TESTED_TRANSFORMERS}.")


def _pair(size) -> tuple[int, int]:
    if isinstance(size, dict):
        return int(size["height"]), int(size["width"])
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def class_names_of(config, num_classes: int) -> list[str] | None:
    """id2label in index order, or None when absent or HF's placeholder LABEL_i names."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i) for i in range(num_classes)]
    if not num_classes or None in names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def build_transform(preprocessor: dict | None, config_size: tuple[int, int],
                    img_size: tuple[int, int] | None = None):
    """(PIL -> [3, h, w] transform, data_config) from a preprocessor_config.json dict.

    Follows HF's image processors: resize (to height x width, or the shortest edge), optional
    centre crop, rescale, normalise. Without a preprocessor: resize to config.image_size and the
    ImageNet mean/std. img_size (h, w) px overrides the output size (resize scaled alike).
    """
    from torchvision import transforms as T

    p = dict(preprocessor or {})
    resample = PIL_RESAMPLE.get(p.get("resample", 2), "bilinear")
    mode = getattr(T.InterpolationMode, resample.upper())
    size = p.get("size", {"height": config_size[0], "width": config_size[1]})
    crop = p.get("crop_size") if p.get("do_center_crop", False) else None
    if isinstance(size, dict) and "shortest_edge" in size:
        resize = int(size["shortest_edge"])
        out = _pair(crop) if crop is not None else config_size  # HF leaves the long edge free; crop to the model
    else:
        resize = _pair(size)
        out = _pair(crop) if crop is not None else resize
    if img_size is not None and tuple(img_size) != out:
        scale = (img_size[0] / out[0], img_size[1] / out[1])
        resize = (round(resize * scale[0]) if isinstance(resize, int)
                  else (round(resize[0] * scale[0]), round(resize[1] * scale[1])))
        out = tuple(int(s) for s in img_size)
    steps = [T.Resize(resize, interpolation=mode, antialias=True)] if p.get("do_resize", True) else []
    if steps == [] or crop is not None or isinstance(resize, int) or tuple(resize) != out:
        steps.append(T.CenterCrop(out))
    steps.append(T.ToTensor())  # rescales by 1/255
    factor = float(p.get("rescale_factor", 1 / 255)) * 255 if p.get("do_rescale", True) else 255.0
    if abs(factor - 1) > 1e-9:
        steps.append(T.Lambda(lambda t, f=factor: t * f))
    mean = tuple(float(v) for v in p.get("image_mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in p.get("image_std", IMAGENET_STD))
    if not p.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    steps.append(T.Normalize(mean, std))
    short = min(resize) if isinstance(resize, tuple) else resize
    data_config = {"input_size": (3, *out), "mean": mean, "std": std, "interpolation": resample,
                   "crop_pct": round(min(out) / short, 4) if short else 1.0}
    return T.Compose(steps), data_config


# ---- recognising and loading -------------------------------------------------------------------

def accepts_module(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def accepts_name(name: str) -> bool:
    """A folder, or a name that reads as a path (so a missing folder gets its own message)."""
    return Path(name).is_dir() or "/" in name or name.startswith(("~", "."))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path} cannot be read ({err}); re-save the checkpoint with save_pretrained.") from None


def _weights_files(folder: Path) -> list[Path]:
    """The folder's safetensors files (one file, or the shards of model.safetensors.index.json)."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [folder / s for s in shards]
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        raise ModelLoadError(
            f"{folder} holds only pytorch_model.bin (a pickle, which HeadScope does not load). Convert it "
            "once where you trust the file: from transformers import AutoModel; "
            f"AutoModel.from_pretrained('{folder}').save_pretrained('{folder}') writes model.safetensors.")
    raise ModelLoadError(f"{folder} has no model.safetensors: save the model with save_pretrained(folder).")


def load_hf(name: str, weights=None, pretrained: bool = False, img_size: int | None = None,
            num_classes: int | None = None) -> tuple[HFViT, str, list[str] | None]:
    """Load a HuggingFace checkpoint folder -> (family, weights sha256, class names or None)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"Model folder {folder} does not exist. Give a HuggingFace checkpoint folder "
                             "(config.json + model.safetensors) or a timm model name.")
    if weights is not None or pretrained:
        raise ModelLoadError(f"{folder} is a HuggingFace checkpoint folder and brings its own weights "
                             "(model.safetensors); do not pass weights/--weights or pretrained/--pretrained.")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is a folder but not a HuggingFace checkpoint: it has no config.json. "
                             "Save the model with save_pretrained(folder), or pass a timm model name.")
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    archs = config.get("architectures") or [BACKBONE_OF.get(model_type, f"a '{model_type}' model")]
    arch = archs[0]
    if model_type not in BACKBONE_OF or arch not in SUPPORTED:
        raise _unsupported(f"{folder} ({arch}, model_type '{model_type}')")
    files = _weights_files(folder)
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(f"Loading the HuggingFace folder {folder} needs transformers: "
                             f"pip install transformers=={TESTED_TRANSFORMERS}.") from None
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ModelLoadError(f"{arch} is not in the installed transformers {transformers.__version__}; "
                             f"install transformers=={TESTED_TRANSFORMERS}.")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a local load takes a moment: no "Loading weights" bar
    try:
        model, info = cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=True,
                                          dtype=torch.float32, output_loading_info=True)
    except Exception as err:
        raise ModelLoadError(f"Could not load the HuggingFace checkpoint {folder}: "
                             f"{type(err).__name__}: {err}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    unused = ("pooler.", "mask_token")  # modules HeadScope never runs
    missing = sorted(k for k in info.get("missing_keys", ()) if not any(u in k for u in unused))
    mismatched = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in info.get("mismatched_keys", ())]
    if missing or mismatched:
        raise WeightsMismatchError(
            f"The weights in {folder} do not fit its config.json ({arch}): "
            + "; ".join(f"{t}: {', '.join(v[:8])}" for t, v in (("missing keys", missing),
                                                                 ("shape mismatches", mismatched)) if v)
            + ". Re-save the checkpoint with save_pretrained.")
    family = HFViT(model, _read_json(folder / "preprocessor_config.json")
                   if (folder / "preprocessor_config.json").is_file() else None,
                   img_size=None if img_size is None else _pair(img_size))
    if num_classes is not None and num_classes != family.num_classes:
        raise ModelLoadError(f"{folder} has {family.num_classes} classes (its config.json), not {num_classes}.")
    return family, _weights_sha256(files), family.default_class_names


def _weights_sha256(files: list[Path]) -> str:
    """sha256 of the weights file (of the shards' hashes in order, for a sharded checkpoint)."""
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


register_family("hf", family=HFViT, accepts_module=accepts_module, accepts_name=accepts_name,
                load=load_hf, priority=60, brings_weights=lambda name: Path(name).expanduser().is_dir(),
                reference=lambda name: str(Path(name).expanduser().resolve()) if Path(name).expanduser().is_dir() else name,
                short_name=lambda name: Path(name).name if Path(name).is_dir() else name)  # after timm: a timm name wins over a same-named folder
