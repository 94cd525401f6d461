"""Reading checkpoints: state dicts from .safetensors or weights-only .pth, strict loading with
clear messages, and the file hash a run records."""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from analysis.errors import ModelLoadError, WeightsMismatchError


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
    if path.stat().st_size == 0:
        raise ModelLoadError(f"Weights file {path} is empty (0 bytes): the download or copy did not finish. "
                             "Copy the checkpoint again.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "GLOBAL" not in text.upper():  # damaged, or not a pickle at all
            found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            reason = found.group(1).strip().rstrip(".") if found else (text.strip().splitlines() or ["?"])[0]
            raise ModelLoadError(f"Could not read weights {path}: not a valid checkpoint ({reason}). The file is "
                                 "damaged or not a checkpoint: use a .safetensors file, or a .pth/.pt state dict of "
                                 "tensors.") from None
        # the pickle wants to import and call something (a class, a function): never done here
        raise ModelLoadError(
            f"{path} is a pickle that holds Python objects besides tensors. HeadScope never unpickles code from "
            "a checkpoint (it could run anything). Save the weights as safetensors where the model is defined "
            "and trusted: `from safetensors.torch import save_file; save_file({k: v.contiguous() for k, v in "
            "model.state_dict().items()}, 'model.safetensors')`, then pass that file.") from None
    except Exception as err:  # corrupt or truncated
        reason = str(err).strip().rstrip(".") or type(err).__name__
        raise ModelLoadError(f"Could not read weights {path}: {reason}. The file is damaged or not a checkpoint: use "
                             "a .safetensors file, or a .pth/.pt state dict of tensors.") from None
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


def checkpoint_img_size(model: nn.Module, sd: dict[str, Tensor]) -> int | None:
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
