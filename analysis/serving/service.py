"""Online computations for a built run: one image's partial pruning and attention.

One code path for the computation, used in-process by the app (local run, no Redis) and by the
Celery worker (``worker/``). Models are loaded lazily once per model; results are plain JSON-able
dicts so any transport can carry them.

One result cache per process (``ResultCache``): the worker's ModelService owns one; in the app's
process the transport (analysis/serving/transport.py) owns it and its ModelService computes only.
Every key holds the run's identity (``run_fingerprint``: a hash of its manifest), so a run
replaced or rebuilt in place never gets the old run's results. Each model has its own lock, held
while it computes; cache hits and other models never wait behind it.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from analysis.errors import CacheError, ImageReadError, InputError
from analysis.metrics.strength import peak_attention
from analysis.runs.reader import Run, open_run, run_fingerprint
from analysis.models.adapter import ViT, model_from_manifest
from analysis.metrics.patch_maps import (check_baseline, check_image, head_saliency_alignment, map_agreement,
    map_unit, patch_maps, target_class)
from analysis.datasets import open_image
from analysis.metrics import importance  # (importance.partial_pruning: tests patch it there)
from analysis.metrics.head_sets import set_pruning
from analysis.metrics.head_sets import pair_interactions
from analysis.metrics.patch_maps import deletion_curves
from analysis.metrics.direct import direct_arrays
from analysis.metrics.paths import VIAS, eap_scores, head_paths
from analysis.metrics.sinks import DEFAULT_FACTOR, check_factor, sink_arrays

log = logging.getLogger(__name__)

MAX_EXACT_EDGES = 64  # edges one "exact values" query computes (one partial forward each)


def encode_array(a: np.ndarray) -> dict:
    """float16 array -> {"shape", "dtype", "b64"} (compact for JSON transports)."""
    a = np.ascontiguousarray(a, dtype=np.float16)
    return {"shape": list(a.shape), "dtype": "float16", "b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=d["dtype"]).reshape(d["shape"])


def json_floats(a) -> list:
    """An array as nested lists of floats, NaN -> None (JSON-safe on every transport)."""
    a = np.asarray(a, dtype=np.float64)
    out = a.astype(object)
    out[np.isnan(a)] = None
    return out.tolist()


def patch_maps_payload(vit: ViT, image: torch.Tensor, label: int | None, stored: dict | None = None,
                       baseline: str = "mean") -> dict:
    """The online patch-maps answer for one image [3, H, W]: ``stored`` maps (a run's precomputed
    ones, made with the mean-colour occlusion baseline) or every map the model supports computed now,
    with units, pairwise agreement (Spearman) and the heads' alignment with the occlusion map [L, H]
    (None without a prefix token). Another ``baseline`` recomputes occlusion only."""
    label = label if vit.has_head else None
    if check_baseline(baseline) != "mean" and stored:
        stored = {**stored, **patch_maps(vit, image, label, maps=["occlusion"], occlusion_baseline=baseline)}
    maps = stored if stored else patch_maps(vit, image, label, occlusion_baseline=baseline)
    agreement = map_agreement(maps)
    alignment = (head_saliency_alignment(vit, maps["occlusion"], image=image)
                 if vit.num_prefix_tokens > 0 else None)
    return {"label": label, "target": target_class(vit, check_image(vit, image), label),
            "precomputed": bool(stored), "occlusion_precomputed": bool(stored) and baseline == "mean",
            "baseline": baseline, "grid": list(vit.grid), "patch_size": vit.patch_size,
            "img_size": list(vit.img_size), "num_prefix_tokens": vit.num_prefix_tokens,
            "maps": {k: json_floats(v) for k, v in maps.items()},
            "units": {k: map_unit(k, vit.has_head) for k in maps},
            "agreement": {k: dict(zip(agreement.columns, json_floats(agreement.loc[k]))) for k in maps},
            "alignment": None if alignment is None else json_floats(alignment)}


def run_factor(run: Run) -> float:
    """The high-norm factor f the run's build recorded (its sink metrics use it), else the default 3."""
    return float((run.manifest.get("params") or {}).get("high_norm_factor") or DEFAULT_FACTOR)


class ResultCache:
    """A thread-safe LRU of query results with single flight: the first caller of a key computes
    it, concurrent callers of the same key wait for that answer (or its error), callers of other
    keys and cache hits never wait. Failures are not kept."""

    def __init__(self, max_items: int = 512):
        self.max_items = max_items
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._flights: dict[tuple, dict] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple, compute):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            flight = self._flights.get(key)
            owner = flight is None
            if owner:
                flight = self._flights[key] = {"done": threading.Event(), "value": None, "error": None}
        if not owner:
            flight["done"].wait()
            if flight["error"] is not None:
                raise flight["error"]
            return flight["value"]
        try:
            flight["value"] = value = compute()
        except BaseException as err:
            flight["error"] = err
            raise
        finally:
            with self._lock:
                if flight["error"] is None:
                    self._items[key] = flight["value"]
                    while len(self._items) > self.max_items:
                        self._items.popitem(last=False)
                del self._flights[key]
            flight["done"].set()
        return value


class ModelService:
    """Serves online queries for any run; thread-safe; the last ``max_models`` models kept in memory.

    ``cache``: the process's ResultCache (None: compute every call, for a caller that caches)."""

    def __init__(self, device: str | None = None, max_models: int = 2, cache: ResultCache | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_models = max_models
        self.cache = cache
        self._models: OrderedDict[str, ViT] = OrderedDict()
        self._model_locks: dict[str, threading.Lock] = {}  # model key -> held while it loads or computes
        self._runs: dict[Path, tuple[str, Run]] = {}        # path -> (fingerprint, opened run)
        self._attached: dict[Path, tuple] = {}              # path -> (fingerprint, in-memory model, images)
        self._lock = threading.Lock()                       # the dicts above only: never held long

    def run(self, run_dir: str | Path, fingerprint: str | None = None) -> Run:
        """The opened run, re-opened when its identity changes (rebuilt or replaced in place).
        ``fingerprint``: the identity the caller (the app) sees; CacheError when this process
        sees another run at that path."""
        return self._open(run_dir, fingerprint)[1]

    def _open(self, run_dir, fingerprint: str | None = None) -> tuple[str, Run]:
        path = Path(run_dir).absolute()
        found = run_fingerprint(path)
        if fingerprint is not None and found is not None and found != fingerprint:
            raise CacheError(f"Run {path.name} at {path} is not the run the app shows (it was replaced or rebuilt "
                             "meanwhile, or the app and the worker use different cache directories). Reload the "
                             "page; if it persists, give the app and the worker the same HEADSCOPE_CACHE.")
        with self._lock:
            cached = self._runs.get(path)
        if cached is None or found is None or cached[0] != found:
            run = open_run(path)  # raises the CacheError that says what to do
            cached = (found, run)
            with self._lock:
                self._runs[path] = cached
        return cached

    def attach(self, run_dir: str | Path, vit: ViT, images: torch.Tensor) -> None:
        """Answer the queries of the run now in ``run_dir`` with this loaded model and these preprocessed
        images [n, 3, H, W] (rows in the order of the run's images) instead of re-loading them from
        the manifest and the image files: a notebook's in-memory result (analysis.notebook.save_result).
        Bound to the run's identity: a run replaced at that path is served from its own manifest again."""
        path = Path(run_dir).absolute()
        with self._lock:
            self._attached[path] = (run_fingerprint(path), vit, images)

    def _attachment(self, run_dir: str | Path) -> tuple[ViT, torch.Tensor] | None:
        path = Path(run_dir).absolute()
        found = self._attached.get(path)
        return found[1:] if found is not None and found[0] == run_fingerprint(path) else None

    def attached(self, run_dir: str | Path) -> bool:
        return self._attachment(run_dir) is not None

    def _model(self, run: Run) -> tuple[ViT, threading.Lock]:
        """The run's model (its attached one, else loaded once per model, even across runs) and its compute lock."""
        attached = self._attachment(run.path)
        if attached is not None:
            with self._lock:
                return attached[0], self._model_locks.setdefault(str(run.path.absolute()), threading.Lock())
        key = json.dumps(run.model, sort_keys=True, default=str)
        with self._lock:
            lock = self._model_locks.setdefault(key, threading.Lock())
            vit = self._models.get(key)
            if vit is not None:
                self._models.move_to_end(key)
                return vit, lock
        with lock:  # one load per model; other models and cache hits go on meanwhile
            with self._lock:
                vit = self._models.get(key)
            if vit is None:
                vit = model_from_manifest(run.model, self.device)
                with self._lock:
                    self._models[key] = vit
                    while len(self._models) > self.max_models:
                        self._models.popitem(last=False)
        return vit, lock

    def vit(self, run_dir: str | Path) -> ViT:
        return self._model(self.run(run_dir))[0]

    def image(self, run_dir, image_id: int, run: Run | None = None, vit: ViT | None = None
              ) -> tuple[torch.Tensor, int | None]:
        """Preprocessed image [3, H, W] (an attached run's own tensor) and its label (None when unknown)."""
        run = run or self.run(run_dir)
        images = run.images
        pos = run.image_row(image_id)
        if pos is None:
            raise InputError(f"Image {image_id} is not in run {run.name} "
                             f"(ids {images.image_id.min()}-{images.image_id.max()}).")
        row = images.iloc[pos]
        label = int(row.label) if row.label is not None and int(row.label) >= 0 else None
        attached = self._attachment(run.path)
        if attached is not None:
            return attached[1][pos], label
        try:
            pil = open_image(row.path)
        except ImageReadError as err:
            # one message whatever the cause (missing, unreadable, not an image, a link anywhere), and no
            # path: it reaches web clients and must not tell which files exist. The log keeps the detail.
            log.warning("image %s of run %s cannot be loaded: %s", int(image_id), run.name, err)
            raise ImageReadError(f"Image {int(image_id)} of run {run.name} cannot be loaded from where the build "
                                 "read it (the file is gone, moved or unreadable). Restore the run's image files "
                                 "at their original paths, or rebuild the run.") from None
        return (vit or self._model(run)[0]).preprocess([pil])[0], label

    def _check_head(self, vit: ViT, layer: int, head: int) -> None:
        if not (0 <= int(layer) < vit.depth and 0 <= int(head) < vit.num_heads):
            raise InputError(f"Head ({layer}, {head}) does not exist: layers 0-{vit.depth - 1}, "
                             f"heads 0-{vit.num_heads - 1}.")

    def _query(self, kind: str, run_dir, image_id: int, params: tuple, fingerprint, compute,
               head: tuple[int, int] | None = None) -> dict:
        """compute(vit, image [3,H,W], label) under the model's lock, through the cache; ``params``
        (hashable) complete the key; ``head`` (layer, head) is checked against the model first."""
        image_id = int(image_id)
        found, run = self._open(run_dir, fingerprint)

        def work():
            vit, lock = self._model(run)
            if head is not None:
                self._check_head(vit, *head)
            image, label = self.image(run_dir, image_id, run, vit)
            with lock:
                return compute(vit, image, label)

        if self.cache is None:
            return work()
        return self.cache.get((kind, str(run.path.absolute()), found, image_id, *params), work)

    def partial_pruning(self, run_dir, image_id: int, layer: int, head: int, fingerprint: str | None = None) -> dict:
        """All 8 pruning modes of one head: {"rows": [ {mode, regions, metrics..., top5_*} ]}."""
        def compute(vit, image, label):
            df = importance.partial_pruning(vit, image, label if vit.has_head else None, int(layer), int(head))
            df = df.astype(object).where(df.notna(), None)
            return {"image_id": int(image_id), "layer": int(layer), "head": int(head),
                    "label": label, "rows": df.to_dict(orient="records")}

        return self._query("prune", run_dir, image_id, (int(layer), int(head)), fingerprint, compute,
                           head=(int(layer), int(head)))

    def head_set(self, run_dir, image_id: int, heads: list, fingerprint: str | None = None) -> dict:
        """One image with a head set pruned at once (heads: [[layer, head(, regions)], ...]):
        {"heads", prob, prob_drop, jsd, emb_dist, top5_classes, top5_probs, "label", ...}."""
        def compute(vit, image, label):
            out = set_pruning(vit, image, label if vit.has_head else None, heads)
            out = {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}
            return {"image_id": int(image_id), "label": label, **out}

        return self._query("set", run_dir, image_id, (json.dumps(heads, default=str),), fingerprint, compute)

    def pair_interactions(self, run_dir, image_id: int, heads: list, metric: str = "prob_drop",
                          fingerprint: str | None = None) -> dict:
        """SPEC pair interactions of 2-16 heads on one image: {"rows": [{a_layer, a_head, b_layer,
        b_head, single_a, single_b, pair, interaction}], "metric", "label", ...}."""
        def compute(vit, image, label):
            df = pair_interactions(vit, image, label if vit.has_head else None, heads, metric=metric)
            return {"image_id": int(image_id), "label": label, "metric": metric,
                    "rows": df.astype(object).to_dict(orient="records")}

        return self._query("pairs", run_dir, image_id, (json.dumps(heads, default=str), metric), fingerprint,
                           compute)

    def attention(self, run_dir, image_id: int, layer: int, head: int, fingerprint: str | None = None) -> dict:
        """One head's post-softmax attention [N, N] (float16) with the token facts, and, per layer
        of this image, the largest attention value over all its heads outside the prefix->prefix
        block R1 (``layer_max`` [L]: the shared colour scale that lets the Explorer compare heads;
        CLS self-attention, often near 1, would wash it out)."""

        def compute(vit, image, label):
            every = vit.capture_attention(image[None])[0]  # [L, H, N, N]
            A = every[int(layer), int(head)]
            return {"image_id": int(image_id), "layer": int(layer), "head": int(head),
                    "num_prefix_tokens": vit.num_prefix_tokens, "grid": list(vit.grid),
                    "patch_size": vit.patch_size, "img_size": list(vit.img_size),
                    "layer_max": peak_attention(every, vit.num_prefix_tokens).amax(dim=1).tolist(),
                    "attention": encode_array(A.cpu().numpy())}

        return self._query("attn", run_dir, image_id, (int(layer), int(head)), fingerprint, compute,
                           head=(int(layer), int(head)))

    # ---- patch attribution (SPEC "Patch attribution") ----------------------------------------
    def patch_maps(self, run_dir, image_id: int, baseline: str = "mean", fingerprint: str | None = None) -> dict:
        """The four patch maps of one image (precomputed when the run has them, else computed now;
        occlusion with another ``baseline`` than the mean colour is always computed now), their
        pairwise Spearman agreement and each head's alignment with the occlusion map:
        {"maps": {name: [[gh x gw floats]]}, "units", "agreement": {name: {name: rho}},
        "alignment": [[L x H]], "target", "label", "precomputed", "occlusion_precomputed", "baseline",
        grid/patch facts}. NaN -> None."""
        run = self.run(run_dir, fingerprint)

        def compute(vit, image, label):
            stored = run.patch_maps(int(image_id))
            return {"image_id": int(image_id), **patch_maps_payload(vit, image, label, stored, baseline)}

        return self._query("patch_maps", run_dir, image_id, (baseline,), fingerprint, compute)

    def deletion_curves(self, run_dir, image_id: int, baseline: str = "mean", fingerprint: str | None = None) -> dict:
        """Deletion curves of the image's maps (top-n patch tokens dropped, n on the default grid;
        the occlusion map made with ``baseline``): {"metric": "prob" | "emb_dist", "n": [...],
        "curves": {map: [values]}}."""
        maps = self.patch_maps(run_dir, image_id, baseline, fingerprint)["maps"]

        def compute(vit, image, label):
            arrays = {k: np.asarray(v, np.float64) for k, v in maps.items()}
            df = deletion_curves(vit, image, label, arrays)
            metric = df.columns[-1]
            return {"image_id": int(image_id), "metric": metric, "n": sorted(set(df["n"].tolist())),
                    "curves": {name: g.sort_values("n")[metric].tolist() for name, g in df.groupby("map", sort=False)}}

        return self._query("deletion", run_dir, image_id, (baseline,), fingerprint, compute)

    # ---- circuits and attention sinks (SPEC "Beyond the paper (v3)") -------------------------
    def _stored(self, run: Run, image_id: int, name: str) -> np.ndarray | None:
        """The run's values of image_head metric ``name`` for one image [L, H], None when it lacks them."""
        pos = run.image_row(image_id) if name in run.metrics else None
        return None if pos is None else run.dense(name)[pos]

    def circuit(self, run_dir, image_id: int, fingerprint: str | None = None) -> dict:
        """One image's circuit pieces: every head's direct effect [L, H] (direct_logit of the class
        y, or direct_emb for a backbone; the run's stored values when it has them, else computed now)
        and, for a classifier, the APPROXIMATE path value of every edge by edge attribution patching,
        one [L, H (receiver b), L, H (sender a)] array per via "q", "k", "v" (the qkv value is their
        sum; 0 where the sender is not before the receiver): {"direct_name", "direct",
        "direct_stored", "eap": {via: [[...]]} | None, "label" (y), "classifier", ...}. NaN -> None."""
        run = self.run(run_dir, fingerprint)

        def compute(vit, image, label):
            label = label if vit.has_head else None
            name = "direct_logit" if vit.has_head else "direct_emb"
            direct = self._stored(run, image_id, name)
            stored = direct is not None
            if not stored:
                direct = direct_arrays(vit, image[None], None if label is None else [label], total=False)[name][0]
            eap, y = None, label
            if vit.has_head:
                scores, used = eap_scores(vit, image[None], None if label is None else [label])
                eap, y = {via: json_floats(scores[0, i]) for i, via in enumerate("qkv")}, int(used[0])
            return {"image_id": int(image_id), "classifier": bool(vit.has_head), "label": y,
                    "direct_name": name, "direct": json_floats(direct), "direct_stored": stored, "eap": eap}

        return self._query("circuit", run_dir, image_id, (), fingerprint, compute)

    def circuit_exact(self, run_dir, image_id: int, edges: list, via: str = "qkv",
                      fingerprint: str | None = None) -> dict:
        """Exact path values (path patching) of up to MAX_EXACT_EDGES edges [[a_layer, a_head, b_layer,
        b_head], ...] of one image: {"name": "path_logit" | "path_emb", "via", "rows": [[a_layer,
        a_head, b_layer, b_head, value], ...]} (path_emb for a backbone, cosine distance)."""
        if not 0 < len(edges) <= MAX_EXACT_EDGES:
            raise InputError(f"Exact path values are computed for 1-{MAX_EXACT_EDGES} edges at a time (one "
                             f"partial forward each); {len(edges)} were asked. Show fewer edges.")
        if via not in VIAS:
            raise InputError(f"Unknown via {via!r}: use one of {', '.join(VIAS)}.")
        pairs = [((int(e[0]), int(e[1])), (int(e[2]), int(e[3]))) for e in edges]

        def compute(vit, image, label):
            df = head_paths(vit, image, label if vit.has_head else None, via=via, method="exact", edges=pairs)
            name = df.columns[-1]
            return {"image_id": int(image_id), "name": name, "via": via,
                    "rows": [[int(r.a_layer), int(r.a_head), int(r.b_layer), int(r.b_head), float(getattr(r, name))]
                             for r in df.itertuples()]}

        return self._query("circuit_exact", run_dir, image_id, (json.dumps(pairs), via), fingerprint, compute)

    def sinks(self, run_dir, image_id: int, factor: float | None = None, fingerprint: str | None = None) -> dict:
        """One image's token norms [L + 1, N] (l = 0 block 0's input ... L after the last block, prefix
        tokens first) with prefix_share and high_norm_share [L, H] and high_norm_count [L] for the
        high-norm factor ``factor`` (None: the run's recorded f, else 3), computed in one forward:
        {"norms", "prefix_share", "high_norm_share", "high_norm_count", "factor", "num_prefix_tokens",
        "grid", ...}."""
        run = self.run(run_dir, fingerprint)
        factor = check_factor(factor if factor is not None else run_factor(run))
        stored = self._stored_sinks(run, image_id) if factor == run_factor(run) else None
        if stored is not None:
            return {**stored, "factor": factor}

        def compute(vit, image, label):
            out = sink_arrays(vit, image[None], factor)
            return {"image_id": int(image_id), "factor": factor, "num_prefix_tokens": vit.num_prefix_tokens,
                    "grid": list(vit.grid), "norms": json_floats(out["token_norms"][0]),
                    "prefix_share": json_floats(out["prefix_share"][0]),
                    "high_norm_share": json_floats(out["high_norm_share"][0]),
                    "high_norm_count": out["high_norm_count"][0].tolist(), "stored": False}

        return self._query("sinks", run_dir, image_id, (factor,), fingerprint, compute)

    def _stored_sinks(self, run: Run, image_id: int) -> dict | None:
        """The sinks answer from the run's tables (its token norms and sink metrics, made with the run's
        f), None when the run lacks them or the image."""
        names = ("prefix_share", "high_norm_share", "high_norm_count")
        if not (run.has_token_norms and all(n in run.metrics for n in names)):
            return None
        norms = run.token_norms(int(image_id))
        shares = {n: self._stored(run, image_id, n) for n in names}
        if norms is None or any(v is None for v in shares.values()):
            return None
        return {"image_id": int(image_id), "num_prefix_tokens": int(run.model.get("prefix_tokens", 0)),
                "grid": [int(g) for g in run.model["grid"]], "norms": json_floats(norms),
                "prefix_share": json_floats(shares["prefix_share"]),
                "high_norm_share": json_floats(shares["high_norm_share"]),
                "high_norm_count": [int(v) for v in shares["high_norm_count"][:, 0]], "stored": True}
