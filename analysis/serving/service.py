"""Online computations for a built run: one image's partial pruning and attention.

One code path for the computation, used in-process by the app (local run, no Redis) and by the
Celery worker (``worker/``). Models are loaded lazily once per run; recent results are kept in
an LRU cache. Results are plain JSON-able dicts so any transport can carry them.
"""
from __future__ import annotations

import base64
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from analysis.errors import InputError
from analysis.runs.store import Run, open_run
from analysis.models.adapter import ViT, load_vit


def model_from_manifest(model: dict, device: str = "cpu") -> ViT:
    """Re-load the model a run was built with (manifest["model"])."""
    return load_vit(model["name"], weights=model.get("weights"), pretrained=bool(model.get("pretrained")),
                    img_size=model.get("img_size") if model.get("weights") or model.get("pretrained") else None,
                    num_classes=model.get("num_classes"), class_names=model.get("class_names"), device=device)


def encode_array(a: np.ndarray) -> dict:
    """float16 array -> {"shape", "dtype", "b64"} (compact for JSON transports)."""
    a = np.ascontiguousarray(a, dtype=np.float16)
    return {"shape": list(a.shape), "dtype": "float16", "b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=d["dtype"]).reshape(d["shape"])


class ModelService:
    """Serves online queries for any run; thread-safe; one model per run kept in memory."""

    def __init__(self, device: str | None = None, max_models: int = 2, max_results: int = 512):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_models, self.max_results = max_models, max_results
        self._models: OrderedDict[str, ViT] = OrderedDict()
        self._results: OrderedDict[tuple, dict] = OrderedDict()
        self._runs: dict[Path, tuple] = {}
        self._lock = threading.RLock()

    def run(self, run_dir: str | Path) -> Run:
        """The opened run, re-opened only when its manifest changes (a rebuild)."""
        path = Path(run_dir).resolve()
        try:
            stamp = (path / "manifest.json").stat().st_mtime_ns
        except OSError:
            stamp = None
        with self._lock:
            cached = self._runs.get(path)
            if cached is None or cached[0] != stamp:
                self._runs[path] = cached = (stamp, open_run(path))
            return cached[1]

    def vit(self, run_dir: str | Path) -> ViT:
        model = self.run(run_dir).model
        key = json.dumps(model, sort_keys=True, default=str)  # same model -> loaded once, across runs
        with self._lock:
            if key not in self._models:
                self._models[key] = model_from_manifest(model, self.device)
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def image(self, run_dir, image_id: int) -> tuple[torch.Tensor, int | None]:
        """Preprocessed image [3, H, W] and its label (None when unknown)."""
        from analysis.datasets import open_image

        images = self.run(run_dir).images
        row = images[images.image_id == int(image_id)]
        if row.empty:
            raise InputError(f"Image {image_id} is not in run {Path(run_dir).name} "
                             f"(ids {images.image_id.min()}-{images.image_id.max()}).")
        row = row.iloc[0]
        label = int(row.label) if row.label is not None and int(row.label) >= 0 else None
        return self.vit(run_dir).preprocess([open_image(row.path)])[0], label

    def _check_head(self, vit: ViT, layer: int, head: int) -> None:
        if not (0 <= int(layer) < vit.depth and 0 <= int(head) < vit.num_heads):
            raise InputError(f"Head ({layer}, {head}) does not exist: layers 0-{vit.depth - 1}, "
                             f"heads 0-{vit.num_heads - 1}.")

    def _cached(self, key: tuple, compute) -> dict:
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
        value = compute()
        with self._lock:
            self._results[key] = value
            while len(self._results) > self.max_results:
                self._results.popitem(last=False)
        return value

    def partial_pruning(self, run_dir, image_id: int, layer: int, head: int) -> dict:
        """All 8 pruning modes of one head: {"rows": [ {mode, regions, metrics..., top5_*} ]}."""
        from analysis.metrics.importance import partial_pruning

        def compute():
            vit = self.vit(run_dir)
            self._check_head(vit, layer, head)
            image, label = self.image(run_dir, image_id)
            with self._lock:
                df = partial_pruning(vit, image, label if vit.has_head else None, int(layer), int(head))
            df = df.astype(object).where(df.notna(), None)
            return {"image_id": int(image_id), "layer": int(layer), "head": int(head),
                    "label": label, "rows": df.to_dict(orient="records")}

        return self._cached(("prune", str(run_dir), int(image_id), int(layer), int(head)), compute)

    def attention(self, run_dir, image_id: int, layer: int, head: int) -> dict:
        """One head's post-softmax attention [N, N] (float16) with the token facts, and, per layer
        of this image, the largest attention value over all its heads outside the prefix->prefix
        block R1 (``layer_max`` [L]: the shared colour scale that lets the Explorer compare heads;
        CLS self-attention, often near 1, would wash it out)."""

        def compute():
            vit = self.vit(run_dir)
            self._check_head(vit, layer, head)
            image, _ = self.image(run_dir, image_id)
            with self._lock:
                every = vit.capture_attention(image[None])[0]  # [L, H, N, N]
            A = every[int(layer), int(head)]
            T = vit.num_prefix_tokens
            outside_r1 = every.clone()
            outside_r1[:, :, :T, :T] = 0
            return {"image_id": int(image_id), "layer": int(layer), "head": int(head),
                    "num_prefix_tokens": vit.num_prefix_tokens, "grid": list(vit.grid),
                    "patch_size": vit.patch_size, "img_size": list(vit.img_size),
                    "layer_max": outside_r1.amax(dim=(1, 2, 3)).tolist(),
                    "attention": encode_array(A.cpu().numpy())}

        return self._cached(("attn", str(run_dir), int(image_id), int(layer), int(head)), compute)
