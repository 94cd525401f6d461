"""The cache build pipeline: per-image stage -> parts, run-level stages -> the run's tables.

Stages (``build`` runs them all; ``scripts/build_cache.py`` is its command line):

1. ``prepare``: load the model and the image set, then create the run directory or check that
   it holds the same model, weights, data and parameters (``CacheError`` naming what differs).
2. ``run_image_stage``: ``engine.analyse_batch`` per batch of images. Each finished batch is
   written atomically as ``parts/part_<first image id>.npz`` (+ ``thumbs/ID.png``), so an
   interrupt loses at most the batch in flight and a re-run skips finished images. With
   ``shard=(K, N)`` only the K-th of N contiguous slices of the batches runs (one process per
   GPU or machine); a worker pool can call ``run_image_stage(config, image_indices)`` directly.
3. ``merge_run``: all parts -> pattern autoencoder, t-SNE layouts, then ``tables.write_run`` (the
   one writer of the run format) writes the tables and the manifest with status "complete".

What is computed per image is the metric registry's (``analysis.metrics.registry``): every
image_head metric whose ``stage`` is None or listed in ``BuildConfig.stages``.

Image ids are positions in the image set (0-based). Results equal a single-process build
whatever the sharding or interruptions, provided every process uses the same batch size (and,
for bit-identical floats, the same --threads; the default picks the idle cores).
"""
from __future__ import annotations

import datetime as dt
import io
import json
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from analysis.errors import CacheError, InputError, ModelLoadError
from analysis.metrics import engine, registry
from analysis.runs import head_stages, layouts, tables
from analysis.runs.batches import batch_plan, load_batch, parts_dir
from analysis.paths import default_cache_dir
from analysis.runs.reader import open_run
from analysis.runs.schema import SCHEMA_VERSION, SKIPPED_COLUMNS
from analysis.runs.tables import atomic_write_bytes, remove_temporaries, write_json
from analysis.datasets import printable
from analysis.models.adapter import brings_weights, load_vit, model_reference, model_short_name
from analysis.datasets import load_image_set, validate_labels
from analysis.runs.autoencoder import input_side, train_autoencoder
from analysis.runs.circuits import AGREEMENT_IMAGES, circuits_stage
from analysis.metrics.patterns import PATTERN_METRICS, pattern_arrays
from analysis.metrics.sinks import DEFAULT_FACTOR

EMBEDDED_RUNS = {"fashion": "default", "photos": "default-backbone"}  # dataset -> its default model
# Parameters that change the results: a run directory refuses a build that differs in any.
RESULT_PARAMS = ("q", "seed", "limit", "ae_epochs", "ae_latent", "thumb_px")


@dataclass
class BuildConfig:
    """Everything a build needs; JSON-able (``to_dict`` / ``from_dict``) for worker pools.

    model: timm ViT name, HuggingFace checkpoint folder, "default" or "default-backbone"; weights:
    state-dict file (timm names); dataset: "fashion", "photos", a folder or a CSV manifest
    (dataset_kind forces the kind); limit: number of images (None = the set's default); q: top
    fraction kept by the patch binarisation;
    ae_epochs / ae_latent: pattern autoencoder training epochs and latent size; thumb_px:
    thumbnail side in px (None: the model's input size clamped to 112-224); threads: CPU threads for
    torch and t-SNE (None: the idle cores, see ``auto_threads``); labels: how class folders map to
    the model's classes (None: by name, "sorted", or a JSON/CSV mapping file; see
    ``analysis.datasets.folder_labels``); stages: optional metric stages to compute
    (``Metric.stage`` names, e.g. "taylor", "mean_ablation", plus "taylor_only" and "curves", see
    analysis.runs.head_stages), none by default; all_stages: also every stage of
    head_stages.ALL_STAGES the model and data support (the others are dropped and named in
    manifest["stages_skipped"]); curve_images: labelled images the pruning curves use (stage
    "curves"); circuit_sample: images whose EAP edges are checked against exact path patching
    (stage "circuits", analysis.runs.circuits).
    """
    out: str
    model: str = "default"
    weights: str | None = None
    pretrained: bool = False
    img_size: int | None = None
    dataset: str = "fashion"
    dataset_kind: str | None = None
    labels: str | None = None
    limit: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    seed: int = 0
    q: float = 0.01
    ae_epochs: int = 2
    ae_latent: int = 32
    thumb_px: int | None = None
    threads: int | None = None
    progress: bool = True
    stages: list[str] = field(default_factory=list)
    curve_images: int = 32  # default run: the curve areas of 32 images lie within 0.013 of 64's, at half the cost
    all_stages: bool = False
    circuit_sample: int = AGREEMENT_IMAGES

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "BuildConfig":
        """Raise InputError naming the first out-of-range setting."""
        checks = [(self.batch_size >= 1, "--batch-size must be at least 1"),
                  (0 < self.q <= 1, "--q must be a fraction in (0, 1], e.g. 0.01 for the top 1%"),
                  (self.limit is None or self.limit >= 1, "--limit must be a positive number of images"),
                  (self.ae_epochs >= 1 and self.ae_latent >= 2, "--ae-epochs must be >= 1 and --ae-latent >= 2"),
                  (self.thumb_px is None or 16 <= self.thumb_px <= 1024, "--thumb-px must be within 16-1024"),
                  (self.threads is None or self.threads >= 1, "--threads must be at least 1"),
                  (self.curve_images >= 1, "--curve-images must be at least 1"),
                  (self.circuit_sample >= 1, "--circuit-sample must be at least 1")]
        for ok, message in checks:
            if not ok:
                raise InputError(f"{message}.")
        self.stages = head_stages.check_stages(list(self.stages) + list(head_stages.ALL_STAGES
                                                                        if self.all_stages else []))
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def params(self) -> dict:
        """The manifest's "params": result parameters plus how the build ran."""
        out = {k: getattr(self, k) for k in RESULT_PARAMS + ("batch_size", "device", "threads")}
        if self.stages:  # only when set, so runs built before stages existed keep their identity
            out["stages"] = sorted(self.stages)
        if "curves" in self.stages:
            out["curve_images"] = self.curve_images
        if "circuits" in self.stages:
            out["circuit_sample"] = self.circuit_sample
        return out


@dataclass
class BuildContext:
    """A prepared build: config, the loaded ViT, the image set and the run's manifest."""
    config: BuildConfig
    vit: object
    image_set: object
    manifest: dict
    timings: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


# ---- configuration -------------------------------------------------------------------------

def default_out(model: str, dataset: str) -> Path:
    """cache/default for the embedded fashion run, cache/photos for photos, else cache/<model>-<set>."""
    if EMBEDDED_RUNS.get(dataset) == model:
        return default_cache_dir() / ("default" if dataset == "fashion" else dataset)
    stem = Path(dataset).stem if dataset not in EMBEDDED_RUNS else dataset
    model = model_short_name(model)  # the family's short name (a checkpoint folder: its name)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model}-{stem}")
    return default_cache_dir() / safe


def config_from_manifest(run_dir: str | Path, **overrides) -> BuildConfig:
    """The config a run was started with (for --resume), with execution settings overridden."""
    mf = read_manifest(Path(run_dir))
    if mf is None:
        raise CacheError(f"Nothing to resume at {run_dir}: it has no manifest.json. Start the build "
                         f"without --resume (python scripts/build_cache.py --out {run_dir} ...).")
    cfg = dict(mf.get("build_config") or {})
    if not cfg:
        raise CacheError(f"{run_dir} was not written by scripts/build_cache.py (no build_config in its "
                         "manifest) and cannot be resumed. Build a new run with another --out.")
    cfg.update({k: v for k, v in overrides.items() if v is not None}, out=str(run_dir))
    return BuildConfig.from_dict(cfg)


def read_manifest(run_dir: Path) -> dict | None:
    path = run_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"The manifest of {run_dir} cannot be read ({err}). Delete {run_dir} and "
                         "build the run again.") from None


# ---- stage 1: prepare ----------------------------------------------------------------------

def load_model(config: BuildConfig):
    """The ViT of a build (refuses a timm name without weights: it could not be reloaded)."""
    import torch


    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {config.device} was asked for but CUDA is not available here. Use --device cpu.")
    config.model = model_reference(config.model)
    if not (brings_weights(config.model) or config.weights or config.pretrained):
        raise ModelLoadError(f"Model '{config.model}' needs weights: pass --weights PATH (.safetensors/.pth) or "
                             "--pretrained, or give a HuggingFace checkpoint folder. A random initialisation "
                             "could not be reloaded by the dashboard.")
    weights = str(Path(config.weights).resolve()) if config.weights else None
    return load_vit(config.model, weights=weights, pretrained=config.pretrained, img_size=config.img_size,
                    device=config.device)


def load_images(config: BuildConfig, vit):
    """The image set, labels checked against the model's classes; names the model's classes
    after the set's when the model brings none."""
    kind = config.dataset_kind or (config.dataset if config.dataset in EMBEDDED_RUNS else None)
    image_set = load_image_set(config.dataset, kind=kind, limit=config.limit, seed=config.seed,
                               class_names=vit.class_names, labels=config.labels)
    validate_labels(image_set, vit.num_classes)
    if vit.has_head and vit.class_names is None:
        names = [str(c) for c in range(vit.num_classes)]
        if image_set.class_names and len(image_set.class_names) == vit.num_classes:
            names = list(image_set.class_names)
        for it in image_set.items:
            if it.label >= 0 and it.label_name:
                names[it.label] = it.label_name
        vit.class_names = names
    return image_set


def model_facts(config: BuildConfig, vit) -> dict:
    """manifest["model"]: enough for analysis.models.adapter.model_from_manifest to reload the model."""
    h, w = vit.img_size
    return {"name": config.model, "family": vit.family.family,
            "weights": str(Path(config.weights).resolve()) if config.weights else None,
            "pretrained": bool(config.pretrained), "img_size": h if h == w else [h, w],
            "num_classes": vit.num_classes, "class_names": vit.class_names,
            "weights_sha256": vit.weights_sha256, "depth": vit.depth, "heads": vit.num_heads,
            "prefix_tokens": vit.num_prefix_tokens, "grid": list(vit.grid), "patch_size": vit.patch_size,
            "embed_dim": vit.embed_dim, "num_tokens": vit.num_tokens}


def library_versions() -> dict:
    import openTSNE
    import pyarrow
    import sklearn
    import timm
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                "numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
                "openTSNE": openTSNE.__version__, "scikit-learn": sklearn.__version__}
    if "transformers" in sys.modules:  # imported only when a HuggingFace folder was loaded
        versions["transformers"] = sys.modules["transformers"].__version__
    return versions


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_manifest(config: BuildConfig, vit, image_set) -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "status": "building", "created": now_iso(),
        "model": model_facts(config, vit),
        "dataset": {"name": image_set.name, "kind": image_set.kind, "source": config.dataset,
                    "fingerprint": image_set.fingerprint, "n_images": len(image_set.items),
                    "class_names": image_set.class_names,
                    **({"label_mapping": image_set.label_mapping} if image_set.label_mapping else {})},
        "params": config.params(), "build_config": config.to_dict(), "versions": library_versions(),
    }


IDENTITY = [("schema_version",), ("model", "name"), ("model", "weights_sha256"), ("model", "pretrained"),
            ("model", "img_size"), ("model", "num_classes"), ("dataset", "fingerprint"), ("dataset", "n_images")]
IDENTITY += [("params", p) for p in RESULT_PARAMS + ("stages", "curve_images", "circuit_sample")]


def identity_differences(old: dict, new: dict) -> list[str]:
    """'key: run has X, this build has Y' for every result-affecting setting that differs."""
    def get(d, path):
        for k in path:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    def show(v):
        return repr(v[:12] + "...") if isinstance(v, str) and len(v) > 40 else repr(v)

    return [f"{'.'.join(p)}: run has {show(get(old, p))}, this build has {show(get(new, p))}"
            for p in IDENTITY if get(old, p) != get(new, p)]


def prepare(config: BuildConfig) -> BuildContext:
    """Load model and images; create the run directory or check it is the same run."""
    config.validate()
    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise CacheError(f"--out {run_dir} is a file, not a directory. Choose another --out.")
    existing = read_manifest(run_dir) if run_dir.is_dir() else None
    if existing is None and run_dir.is_dir() and any(run_dir.iterdir()):
        raise CacheError(f"{run_dir} exists and is not a HeadScope run (no manifest.json). Choose an empty or "
                         "new --out directory.")
    import torch

    config.threads = config.threads or auto_threads()
    torch.set_num_threads(config.threads)
    timings = {}
    t = time.perf_counter()
    vit = load_model(config)
    timings["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    image_set = load_images(config, vit)
    timings["load_images"] = time.perf_counter() - t
    if not image_set.items:
        raise InputError(f"No readable images in '{config.dataset}' ({len(image_set.skipped)} skipped). "
                         "Check the folder or manifest.")
    labels = [it.label for it in image_set.items]
    dropped = {}
    if config.all_stages:
        config.stages, dropped = head_stages.drop_unsupported(config.stages, vit, labels)
    head_stages.check_model(config.stages, vit, labels)
    manifest = new_manifest(config, vit, image_set)
    if dropped:
        manifest["stages_skipped"] = dropped
    if existing is not None:
        diffs = identity_differences(existing, manifest)
        if diffs:
            raise CacheError(f"{run_dir} holds a run built with different settings:\n  " + "\n  ".join(diffs)
                             + f"\nStart a new run with another --out (e.g. --out {run_dir}-2), or delete "
                             f"{run_dir} to rebuild it.")
        manifest = {**existing, "build_config": {**existing.get("build_config", {}), **_exec_settings(config)}}
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "manifest.json", manifest)
    remove_temporaries(run_dir)
    return BuildContext(config, vit, image_set, manifest, timings)


def auto_threads() -> int:
    """CPU cores idle right now (sampled over 0.25 s from /proc/stat; elsewhere cores minus the
    1-minute load average), at least 1. On a shared machine, torch with more threads than idle cores
    waits on descheduled threads and runs up to 2x slower than with one thread."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def cpu_times():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait (jiffies, all CPUs)

    try:
        total0, idle0 = cpu_times()
        time.sleep(0.25)
        total1, idle1 = cpu_times()
        busy = (os.cpu_count() or cores) * (1 - (idle1 - idle0) / max(total1 - total0, 1))
    except (OSError, ValueError, IndexError):
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0
    return max(1, min(cores, round(cores - busy)))


def _exec_settings(config: BuildConfig) -> dict:
    return {k: getattr(config, k) for k in ("batch_size", "device", "threads", "progress")}


# ---- stage 2: per-image analysis -> parts --------------------------------------------------

def read_part(path: Path, keys: Iterable[str] | None = None) -> dict[str, np.ndarray] | None:
    """The arrays of one part (only ``keys`` when given); None when the file is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in (keys if keys is not None else z.files) if k in z.files}
    except (OSError, ValueError, KeyError, EOFError) as err:
        print(f"warning: ignoring unreadable part {path.name} ({err}); its images will be recomputed",
              file=sys.stderr)
        return None


def finished_images(run_dir: Path) -> set[int]:
    """Ids of images whose results (or skip reason) are in a part."""
    done: set[int] = set()
    for path in sorted(parts_dir(run_dir).glob("part_*.npz")):
        part = read_part(path, ["index", "skipped_index"])
        if part is not None:
            done.update(part["index"].tolist())
            done.update(part.get("skipped_index", np.zeros(0, int)).tolist())
    return done


def write_part(run_dir: Path, ids: list[int], result, skipped: list[tuple[int, str]], seconds: float) -> Path:
    """One finished batch -> parts/part_<first id>.npz, written atomically (``result``: the
    engine's BatchResult, saved under its own keys)."""
    arrays = {"index": np.asarray(ids, np.int64), "seconds": np.float64(seconds),
              "skipped_index": np.asarray([i for i, _ in skipped], np.int64),
              "skipped_reason": np.asarray([r for _, r in skipped], dtype=str)}
    if result is not None:
        arrays.update(result)  # registry metric names + engine arrays (probs, cls_vectors, patch_bits)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = parts_dir(run_dir) / f"part_{min(ids + [i for i, _ in skipped]):06d}.npz"
    atomic_write_bytes(path, buf.getvalue())
    return path


_CONTEXT: dict[str, BuildContext] = {}


def context_for(config: BuildConfig | BuildContext | dict) -> BuildContext:
    """A prepared context for a config, its dict, or a context; the last one is kept per process,
    so a worker that runs many image batches of one run loads the model once."""
    if isinstance(config, BuildContext):
        return config
    config = config if isinstance(config, BuildConfig) else BuildConfig.from_dict(config)
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _CONTEXT:
        _CONTEXT.clear()
        _CONTEXT[key] = prepare(config)
    return _CONTEXT[key]


def pending_batches(config: BuildConfig | BuildContext | dict, image_indices: Iterable[int] | None = None,
                    shard: tuple[int, int] | None = None) -> list[list[int]]:
    """Unfinished image ids in batches: of ``image_indices`` (default all, or this shard's slice)."""
    ctx = context_for(config)
    n, size = len(ctx.image_set.items), ctx.config.batch_size
    if image_indices is None:
        plan = batch_plan(n, size, shard)
    else:
        wanted = sorted({int(i) for i in image_indices})
        bad = [i for i in wanted if not 0 <= i < n]
        if bad:
            raise InputError(f"Image ids {bad[:10]} are outside this run's images 0-{n - 1}.")
        plan = [wanted[s:s + size] for s in range(0, len(wanted), size)]
    done = finished_images(ctx.run_dir)
    return [b for b in ([i for i in batch if i not in done] for batch in plan) if b]


def run_image_stage(config: BuildConfig | BuildContext | dict, image_indices: Iterable[int] | None = None, *,
                    shard: tuple[int, int] | None = None) -> dict:
    """Analyse the unfinished images among ``image_indices`` (default: all, or this shard's
    slice) in batches, writing one part per batch. Returns {"images", "skipped", "seconds"}.

    ``config`` may be a BuildConfig, its ``to_dict()`` (e.g. from a Celery task: the model is
    loaded once per worker process, see ``context_for``) or a prepared BuildContext. Once every
    image is finished, ``merge_run(context_for(config))`` builds the tables.
    """
    import torch

    ctx = context_for(config)
    cfg, vit = ctx.config, ctx.vit
    plan = pending_batches(ctx, image_indices, shard)
    total = sum(map(len, plan))
    stats = {"images": 0, "skipped": 0, "seconds": 0.0}
    if not plan:
        return stats
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="images", unit="img", disable=not cfg.progress, dynamic_ncols=True)
    labels_of = [it.label for it in ctx.image_set.items]
    extra = head_stages.image_stage_args(ctx)  # taylor_only: metrics=; mean_ablation: the head means
    with ThreadPoolExecutor(max_workers=1) as pool:  # opens the next batch while this one computes
        pending = pool.submit(load_batch, ctx, plan[0])
        for b, ids in enumerate(plan):
            t = time.perf_counter()
            ok, x, thumbs, skipped = pending.result()
            if b + 1 < len(plan):
                pending = pool.submit(load_batch, ctx, plan[b + 1])
            result = None
            if ok:
                labels = torch.tensor([labels_of[i] for i in ok])  # -1 = unknown: no true-class metrics
                result = engine.analyse_batch(vit, x, labels if vit.has_head else None, q=cfg.q, stages=cfg.stages, **extra)
                for i, im in zip(ok, thumbs):
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    atomic_write_bytes(ctx.run_dir / "thumbs" / f"{i}.png", buf.getvalue())
            seconds = time.perf_counter() - t
            write_part(ctx.run_dir, ok, result, skipped, seconds)
            stats["images"] += len(ok)
            stats["skipped"] += len(skipped)
            stats["seconds"] += seconds
            bar.update(len(ids))
    bar.close()
    return stats


# ---- stage 3: merge -> tables --------------------------------------------------------------

def collect_parts(run_dir: Path, n_images: int) -> dict[str, np.ndarray]:
    """All parts -> arrays ordered by image id (each image once); raises CacheError naming
    the images that have no result yet."""
    chunks: dict[str, list] = {}
    keys: dict[Path, set] = {}  # the arrays of each part that holds results
    for path in sorted(parts_dir(run_dir).glob("part_*.npz")):
        part = read_part(path)
        if part is None:
            continue
        if len(part.get("index", ())):
            keys[path] = set(part)
        for k, v in part.items():
            if k != "seconds":
                chunks.setdefault(k, []).append(v)
        chunks.setdefault("seconds", []).append(float(part.get("seconds", 0.0)))
    get = lambda k: chunks.get(k, [])
    index = np.concatenate(get("index")) if get("index") else np.zeros(0, np.int64)
    skipped_index = np.concatenate(get("skipped_index")) if get("skipped_index") else np.zeros(0, np.int64)
    missing = sorted(set(range(n_images)) - set(index.tolist()) - set(skipped_index.tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise CacheError(f"{len(missing)} of {n_images} images of {run_dir.name} have no results yet (ids {shown}). "
                         "Finish the missing --shard runs, or run the build without --shard/--merge to "
                         "compute them here, then merge again.")
    every = set().union(*keys.values())
    stale = {p: sorted(every - k) for p, k in keys.items() if every - k}
    if stale:  # parts of an older HeadScope lack arrays the newer parts have: recompute their images
        shown = " ".join(str(p) for p in list(stale)[:5]) + (" ..." if len(stale) > 5 else "")
        raise CacheError(f"{len(stale)} part(s) of {run_dir.name} were written by an older HeadScope and lack "
                         f"{', '.join(next(iter(stale.values())))}. Delete them and resume (their images are computed "
                         f"again): rm {shown}; python scripts/build_cache.py --out {run_dir} --resume")
    _, first = np.unique(index, return_index=True)  # duplicates (overlapping shards): keep one
    order = first[np.argsort(index[first])]
    out = {"index": index[order], "seconds": float(np.sum(get("seconds")))}
    for k, arrs in chunks.items():
        if k not in ("index", "seconds", "skipped_index", "skipped_reason") and arrs:
            out[k] = np.concatenate(arrs)[order]
    reasons = np.concatenate(get("skipped_reason")) if get("skipped_reason") else np.zeros(0, str)
    skip_ids, skip_first = np.unique(skipped_index, return_index=True)
    out["skipped_index"], out["skipped_reason"] = skip_ids, reasons[skip_first]
    return out


def overview_metric(has_head: bool, labels: np.ndarray) -> str:
    """SPEC image overview uses prob; jsd when some labels are unknown; emb_dist for a backbone."""
    if not has_head:
        return "emb_dist"
    return "prob" if np.all(labels >= 0) else "jsd"


def prediction_columns(probs: np.ndarray | None, labels: np.ndarray) -> dict:
    """The images table's pred, prob (P(true), NaN where the label is unknown), top5_classes and
    top5_probs from the unpruned output probabilities [n, C] (None for a backbone: -1 / NaN / empty)."""
    n = len(labels)
    if probs is None:
        return {"pred": np.full(n, -1), "prob": np.full(n, np.nan),
                "top5_classes": [np.zeros(0, np.int32)] * n, "top5_probs": [np.zeros(0, np.float32)] * n}
    k = min(5, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return {"pred": top[:, 0], "prob": np.where(labels >= 0, probs[np.arange(n), np.clip(labels, 0, None)], np.nan),
            "top5_classes": list(top), "top5_probs": list(np.take_along_axis(probs, top, axis=1))}


def images_table(ctx: BuildContext, arrays: dict, overview_xy: np.ndarray) -> pd.DataFrame:
    items = [ctx.image_set.items[i] for i in arrays["index"]]
    labels = np.array([it.label for it in items], np.int64)
    return pd.DataFrame({
        "image_id": arrays["index"], "path": [printable(it.ref) for it in items], "label": labels,
        "label_name": [printable(it.label_name) for it in items], **prediction_columns(arrays.get("probs"), labels),
        "overview_x": overview_xy[:, 0], "overview_y": overview_xy[:, 1],
    })


class _Stages:
    """Times stages and shows one tqdm bar per stage."""

    def __init__(self, progress: bool):
        self.progress, self.timings = progress, {}

    def bar(self, desc: str, total: int, unit: str = "step"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, dynamic_ncols=True)

    @staticmethod
    def advance(bar, done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    def timed(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - t, 3)
        return out


def stages_dir(run_dir: Path) -> Path:
    """Checkpoints of the run-level stages (autoencoder per epoch, each layout); removed once the
    run is complete."""
    return run_dir / "stages"


def _layout(stages: _Stages, run_dir: Path, name: str, X: np.ndarray, seed: int, jobs: int) -> np.ndarray:
    """t-SNE layout of X, reused from stages/layout_<name>.npz when its inputs are the same."""
    import hashlib

    X = np.ascontiguousarray(X)
    key = hashlib.sha256(f"{X.dtype}{X.shape}{seed}".encode() + X.tobytes()).hexdigest()
    path = stages_dir(run_dir) / f"layout_{name}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["inputs_sha256"]) == key and z["xy"].shape == (len(X), 2):
                stages.timings[f"layout_{name}"] = 0.0
                return z["xy"]
    except (OSError, ValueError, KeyError, EOFError):  # none yet, or unreadable: compute it
        pass
    bar = stages.bar(f"layout {name} ({len(X)} points)", 1, unit="it")
    xy = stages.timed(f"layout_{name}", layouts.tsne_2d, X, seed=seed, n_jobs=jobs,
                      progress=lambda done, total: stages.advance(bar, done, total))
    stages.advance(bar, bar.total, bar.total)
    bar.close()
    buf = io.BytesIO()
    np.savez(buf, xy=xy, inputs_sha256=np.asarray(key))
    atomic_write_bytes(path, buf.getvalue())
    return xy


def merge_run(ctx: BuildContext) -> dict:
    """Run-level stages from all parts: autoencoder, layouts, tables; marks the run complete."""
    cfg, vit, run_dir = ctx.config, ctx.vit, ctx.run_dir
    stages = _Stages(cfg.progress)
    arrays = stages.timed("read_parts", collect_parts, run_dir, len(ctx.image_set.items))
    n, L, H = len(arrays["index"]), vit.depth, vit.num_heads
    if n == 0:
        raise CacheError(f"None of the images of {run_dir.name} could be read (see the skipped reasons in "
                         f"{run_dir / 'parts'}). Check the data set.")
    labels = np.array([ctx.image_set.items[i].label for i in arrays["index"]])
    metric = overview_metric(vit.has_head, labels)
    if metric not in arrays:  # taylor_only: no leave-one-out
        metric = "taylor_prob_drop"
    if ctx.manifest.get("status") == "complete":  # re-merge: readers wait until the tables match again
        write_json(run_dir / "manifest.json", {**ctx.manifest, "status": "building"})

    bits = arrays["patch_bits"].reshape(n * L * H, -1)
    bar = stages.bar("autoencoder", 1, unit="batch")
    ae = stages.timed("autoencoder", train_autoencoder, bits, vit.num_patches, latent_dim=cfg.ae_latent,
                      epochs=cfg.ae_epochs, seed=cfg.seed, device=cfg.device,
                      progress=lambda done, total: stages.advance(bar, done, total),
                      checkpoint=stages_dir(run_dir) / "autoencoder.pt")
    bar.close()
    jobs = cfg.threads or 1
    patch_xy = _layout(stages, run_dir, "patch", ae.latents, cfg.seed, jobs)
    cls_xy = _layout(stages, run_dir, "cls", arrays["cls_vectors"].reshape(n * L * H, -1), cfg.seed, jobs)
    overview_xy = _layout(stages, run_dir, "overview", np.nan_to_num(arrays[metric].reshape(n, L * H)), cfg.seed,
                          jobs)
    manifest = head_stages.merge_extras(ctx, arrays, ctx.manifest, stages)

    images = images_table(ctx, arrays, overview_xy)
    metric_arrays = {m.name: arrays[m.name] for m in registry.metrics("image_head") if m.name in arrays}
    skipped = [(printable(ref), printable(str(r))) for ref, r in list(ctx.image_set.skipped) + [
        (ctx.image_set.items[i].ref, r) for i, r in zip(arrays["skipped_index"], arrays["skipped_reason"])]]
    skipped = pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS))

    timings = {k: round(v, 3) for k, v in ctx.timings.items()}
    timings["images"] = round(arrays["seconds"], 3)
    timings.update(stages.timings)
    manifest["dataset"] = {**manifest["dataset"], "n_analysed": n, "n_skipped": len(skipped)}
    manifest["params"] = {**manifest["params"], "overview_metric": metric,
                          "layout": "openTSNE t-SNE (analysis.layouts.tsne_2d)",
                          **({"high_norm_factor": DEFAULT_FACTOR} if "token_norms" in arrays else {}),
                          "ae": {"latent_dim": cfg.ae_latent, "epochs": ae.epochs, "samples": int(len(bits)),
                                 "input_side": input_side(vit.num_patches)}}
    manifest.update(
        ae_loss=ae.loss_curve, ae_baseline_loss=ae.baseline_loss, timings=timings,
        throughput={"images_per_s": round(n / arrays["seconds"], 4) if arrays["seconds"] else None},
        completed=now_iso())
    manifest = tables.write_run(run_dir, manifest, images, metric_arrays, L=L, H=H,
                                layouts={"cls": cls_xy, "patch": patch_xy}, skipped=skipped, stages=cfg.stages,
                                sizes=lambda d: run_sizes(d, n, manifest["model"]),
                                inputs={"patch_bits": arrays["patch_bits"]}, patch_maps=arrays.get("patch_maps"),
                                token_norms=arrays.get("token_norms"))
    shutil.rmtree(stages_dir(run_dir), ignore_errors=True)  # the tables hold the stages' results now
    remove_temporaries(run_dir, older_than_s=0)  # the run is complete: nobody writes into it now
    ctx.manifest = manifest
    return manifest


def run_sizes(run_dir: Path, n: int, model: dict) -> dict:
    """Bytes on disk (all, tables, thumbnails, parts) and what raw float32 attention would take
    (``model``: the manifest's model facts depth, heads, num_tokens)."""
    files = [p for p in run_dir.rglob("*")  # temporaries and stage checkpoints are about to go
             if p.is_file() and not p.name.startswith(".") and p.relative_to(run_dir).parts[0] != "stages"]
    size = lambda ps: int(sum(p.stat().st_size for p in ps))
    return {"cache_bytes": size(files),
            "tables_bytes": size(p for p in files if p.suffix == ".parquet"),
            "thumbs_bytes": size(p for p in files if p.parent.name == "thumbs"),
            "parts_bytes": size(p for p in files if p.parent.name == "parts"),
            "raw_attention_bytes": int(n) * model["depth"] * model["heads"] * model["num_tokens"] ** 2 * 4}


# ---- adding the pattern labels to a run built without them ----------------------------------

def add_pattern_labels(run_dir: str | Path) -> dict:
    """Add the pattern labels (PATTERN_METRICS) to a complete run built without them, from the
    patch bits in its parts: every other column, the layouts and the thumbnails are kept as they are.
    Returns the new manifest (timings.pattern_labels: seconds)."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    t = time.perf_counter()
    ids = run.images["image_id"].to_numpy()
    bits = {}
    for path in sorted(parts_dir(run_dir).glob("part_*.npz")):
        part = read_part(path, ["index", "patch_bits"]) or {}
        if "patch_bits" in part:
            bits.update(zip(part["index"].tolist(), part["patch_bits"]))
    lacking = [int(i) for i in ids if int(i) not in bits]
    if lacking:
        raise CacheError(f"Run {run_dir.name} has no patch bits for {len(lacking)} of its {len(ids)} images (ids "
                         f"{lacking[:10]}): its parts/ folder was deleted or is incomplete, so the labels cannot be "
                         f"added. Rebuild the run: python scripts/build_cache.py --out {run_dir}-2 (with the options "
                         "it was built with).")
    patch_bits = np.stack([bits[int(i)] for i in ids])
    grid = run.model["grid"]
    arrays = {m.name: run.dense(m.name) for m in run.metrics_of(level="image_head") if m.name not in PATTERN_METRICS}
    arrays.update(pattern_arrays(patch_bits, grid))
    manifest = dict(run.manifest)
    manifest["timings"] = {**manifest.get("timings", {}), "pattern_labels": round(time.perf_counter() - t, 3)}
    layouts = {k: xy.reshape(-1, 2) for k in ("cls", "patch") if (xy := run.layout(k)) is not None}
    stages = manifest.get("params", {}).get("stages", ())
    manifest = tables.write_run(run_dir, manifest, run.images, arrays, L=run.L, H=run.H, layouts=layouts,
                                skipped=run.skipped, stages=stages, inputs={"patch_bits": patch_bits},
                                sizes=lambda d: run_sizes(d, len(ids), run.model))
    return manifest


# ---- adding the circuits to a run built without them -----------------------------------------

def add_circuits(run_dir: str | Path, **settings) -> dict:
    """Add the circuits stage (analysis.runs.circuits) to a complete classifier run built without
    it (or whose circuit tables were lost): the circuit tables and manifest["circuits"], from the saved
    batches where they are still in parts/; nothing else is recomputed. ``settings``:
    execution settings (threads, progress, device, batch_size) and circuit_sample (None: the
    run's). Returns the new manifest (timings.circuits_eap / circuits_exact: seconds)."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    config = config_from_manifest(run_dir, **settings)
    ctx = prepare(config)  # the same run (checked): its model and images
    config.stages = head_stages.check_stages(list(config.stages) + ["circuits"])
    stages = _Stages(config.progress)
    entry = circuits_stage(ctx, run.images["image_id"].to_numpy(), stages)  # refuses a backbone
    manifest = dict(ctx.manifest)
    manifest["params"] = {**manifest["params"], "stages": config.stages, "circuit_sample": config.circuit_sample}
    manifest["build_config"] = {**manifest["build_config"], "stages": config.stages,
                                "circuit_sample": config.circuit_sample}
    manifest["circuits"] = entry
    manifest["timings"] = {**manifest.get("timings", {}), **stages.timings}
    manifest["sizes"] = run_sizes(run_dir, len(run.images), run.model)
    write_json(run_dir / "manifest.json", manifest)
    return manifest


# ---- everything ------------------------------------------------------------------------------

def build(config: BuildConfig, *, shard: tuple[int, int] | None = None, merge_only: bool = False,
          context: BuildContext | None = None) -> dict:
    """Run the stages: image stage (this shard's slice) unless merge_only, then merge unless a
    shard was given. Returns the manifest (status "building" after a shard)."""
    ctx = context or prepare(config)
    if ctx.manifest.get("status") == "complete" and not merge_only:
        return ctx.manifest
    if not merge_only:
        run_image_stage(ctx, shard=shard)
    if shard is not None:
        return ctx.manifest
    return merge_run(ctx)


def summary_lines(manifest: dict, wall_seconds: float | None = None) -> list[str]:
    """Human-readable end-of-build summary."""
    t, s = manifest.get("timings", {}), manifest.get("sizes", {})
    n = manifest.get("dataset", {}).get("n_analysed", 0)
    mb = lambda b: f"{(b or 0) / 1e6:.1f} MB"
    lines = [f"Run complete: {n} images analysed, {manifest.get('dataset', {}).get('n_skipped', 0)} skipped."]
    if t.get("images"):
        lines.append(f"  image stage: {t['images']:.1f} s ({n / t['images']:.2f} images/s)")
    for k, v in t.items():
        if k != "images":
            lines.append(f"  {k}: {v:.1f} s")
    if wall_seconds is not None:
        lines.append(f"  wall time of this command: {wall_seconds:.1f} s")
    lines.append(f"  cache size: {mb(s.get('cache_bytes'))} (tables {mb(s.get('tables_bytes'))}, thumbnails "
                 f"{mb(s.get('thumbs_bytes'))}, parts {mb(s.get('parts_bytes'))}); raw attention would take "
                 f"{mb(s.get('raw_attention_bytes'))}")
    return lines + head_stages.summary_lines(manifest)
