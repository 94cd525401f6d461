"""Helpers the metric modules share: the labels check and the long (image, layer, head) frame."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis.errors import InputError, LabelError
from analysis.models.adapter import ViT


def check_labels(vit: ViT, labels, batch: int) -> Tensor | None:
    """Labels as LongTensor [B] (None for a backbone); refuses labels outside the classes."""
    if labels is None or not vit.has_head:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(vit.device)
    if labels.numel() != batch:
        raise InputError(f"Got {labels.numel()} labels for {batch} images.")
    bad = ((labels < 0) | (labels >= vit.num_classes)).nonzero().flatten().tolist()
    if bad:
        raise LabelError(f"Labels outside the model's {vit.num_classes} classes at rows {bad[:10]}: "
                         f"{labels[bad[:10]].tolist()}. Check the label column against the model's classes.")
    return labels


def arrays_to_frame(arrays: dict[str, np.ndarray], offset: int = 0) -> pd.DataFrame:
    """{name: [B, L, H]} -> long DataFrame with columns image, layer, head, names..."""
    B, L, H = next(iter(arrays.values())).shape[:3]
    img, lay, hd = np.meshgrid(np.arange(B) + offset, np.arange(L), np.arange(H), indexing="ij")
    df = pd.DataFrame({"image": img.ravel(), "layer": lay.ravel(), "head": hd.ravel()})
    for name, arr in arrays.items():
        df[name] = arr.reshape(B * L * H, *arr.shape[3:]).tolist() if arr.ndim > 3 else arr.ravel()
    return df
