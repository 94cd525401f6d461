"""HeadScope in a notebook: HTML summaries, a head's figures, and the Explorer inline.

    from analysis.notebook import open_run, head_figures, explorer
    run = open_run("cache/default"); run          # a run shows its summary (Run._repr_html_)
    figs = head_figures(run, 0, 4, image_id=12)   # Plotly figures from the app's own builders
    explorer(run)                                 # the dashboard in the output cell (Dash jupyter mode)

    df = head_importance(vit, images, labels)     # an in-memory result ...
    explorer(df, vit=vit, images=images, labels=labels)  # ... written as a run (save_result), then served

``ViT`` and ``Run`` objects render as HTML tables in Jupyter. The figures come from
``app.figures`` (the builders the dashboard draws with), so a notebook and the app show the same.
An in-memory result becomes a run through the build's one writer (``analysis.runs.tables.write_run``)
and is served like any built run; its online views use the kernel's model and image tensors.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.errors import InputError, LabelError
from analysis.runs.reader import Run, open_run
from analysis.reprs import main_metric, run_html, vit_html  # noqa: F401  (public here: see __all__)

__all__ = ["open_run", "save_result", "head_figures", "explorer", "vit_html", "run_html"]


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else open_run(run)


def head_figures(run, layer: int, head: int, image_id: int | None = None, metric: str | None = None,
                 vit=None) -> dict:
    """One head's figures (plotly ``go.Figure``s), drawn by the dashboard's own builders.

    Always: "importance" (B1: ``metric`` over all heads, mean +/- std, the image's curve when
    given) and "entropy" (C3: the head's strength entropy over all images). With ``image_id``:
    "strength_overview" (C1) and "strength" (C2: the head's k-hop strength). With ``vit`` (the
    run's model, e.g. ``model_from_manifest(run.model)``) and ``image_id`` also the online views:
    "pruning" (B2: the metric under the 8 pruning modes), "top5" (B3, pruned head) and
    "attention" (D: the head's attention matrix, top-q entries highlighted).
    """
    import plotly.graph_objects as go

    from analysis.metrics import registry
    from app import data, figures as F

    run = _as_run(run)
    index = data.build_index(run)
    metric = metric or main_metric(run)
    if metric not in index.importance:
        raise InputError(f"Run {run.name} has no metric {metric!r}; it has {', '.join(index.importance)}.")
    if not (0 <= layer < index.L and 0 <= head < index.H):
        raise InputError(f"Head ({layer}, {head}) does not exist: layers 0-{index.L - 1}, heads 0-{index.H - 1}.")
    pos = None if image_id is None else index.pos(image_id)
    if image_id is not None and pos is None:
        raise InputError(f"Image {image_id} is not in run {run.name} (ids {index.image_ids.min()}-"
                         f"{index.image_ids.max()}).")
    title = lambda name: registry.get_metric(name).title
    mean, std = index.summary(metric)
    values = index.values(metric).reshape(index.n, -1)
    figs = {"importance": F.head_importance(index.L, index.H, title(metric), mean, std,
                                            image_values=None if pos is None else values[pos],
                                            selected=(layer, head),
                                            image_label=None if pos is None else f"image {image_id}")}
    if index.has("strength_entropy"):
        entropy = index.values("strength_entropy").reshape(index.n, -1)
        hi = layer * index.H + head
        figs["entropy"] = F.distribution(entropy[:, hi], None if pos is None else entropy[pos, hi],
                                         title=f"{F.head_name(layer, head)} over all images")
        if pos is not None:
            figs["strength_overview"] = F.property_overview(entropy[pos], index.L, index.H, (layer, head),
                                                            f"image {image_id}")
    if index.has("strength") and pos is not None:
        strength = index.values("strength")
        figs["strength"] = F.strength_bars(strength[pos, layer * index.H + head], f"{F.head_name(layer, head)}, image {image_id}")
    if vit is not None and pos is not None:
        figs.update(_online_figures(run, index, vit, image_id, pos, layer, head, metric))
    return {k: go.Figure(v) for k, v in figs.items()}


def _online_figures(run, index, vit, image_id, pos, layer, head, metric) -> dict:
    from app import data, figures as F
    from analysis.metrics.importance import partial_pruning
    from analysis.metrics import registry
    from analysis.models.pruning import MODE_LABELS
    from analysis.serving import transport

    image, label = transport.local_service().image(run.path, image_id, run, vit)  # an attached run's own tensor
    label = label if vit.has_head else None
    x = image[None]
    pp = partial_pruning(vit, x[0], label, layer, head)
    metric = metric if metric in pp.columns and pp[metric].notna().any() else "emb_dist"
    out = {"pruning": F.pruning_modes(MODE_LABELS, pp[metric].tolist(), registry.get_metric(metric).title,
                                      reference=float(pp.prob[0]) if metric == "prob" else None)}
    if vit.has_head:
        pruned = pp.iloc[1]
        out["top5"] = F.top5([index.class_name(c) for c in pruned.top5_classes], pruned.top5_probs,
                             index.class_name(label) if label is not None else None,
                             f"{F.head_name(layer, head)} pruned")
    A = vit.capture_attention(x, layers=[layer])[0, 0, head].numpy()
    q = float(run.manifest.get("params", {}).get("q", 0.01))
    out["attention"] = F.attention_heatmap(A, vit.num_prefix_tokens, data.threshold_for(A[vit.num_prefix_tokens:,
                                                                                          vit.num_prefix_tokens:], q))
    return out


def explorer(run=None, mode: str = "inline", port: int = 8050, height: int = 1000, cache_dir=None, *,
             vit=None, images=None, labels=None, out=None):
    """Serve the HeadScope dashboard for ``run`` from this kernel, shown ``mode`` = "inline" (in the
    output cell), "tab" (a new browser tab), "external" (a link) or "jupyterlab" (Dash's jupyter
    modes). ``run``: a Run, a run directory, a run name under ``cache_dir``, or an in-memory result
    (what ``save_result`` takes, with ``vit``, ``images`` and ``labels``; written to ``out``, default
    a temporary folder). Returns the Dash app. Outside a notebook Dash serves in the foreground
    until Ctrl-C."""
    from app import create_app

    if _is_result(run):
        if vit is None or images is None:
            raise InputError("An in-memory result needs its model and images: explorer(result, vit=vit, "
                             "images=images, labels=labels).")
        run = save_result(run, vit, images, labels, out=out)
    target = str(run.path) if isinstance(run, Run) else (str(run) if run is not None else None)
    if target is not None and Path(target).is_dir():
        _as_run(target)  # a clear CacheError now rather than an empty dashboard
    app = create_app(cache_dir=cache_dir, run=target)
    _close_jupyter_server(port)
    app.run(jupyter_mode=mode, jupyter_height=height, port=port)
    return app


def _close_jupyter_server(port: int) -> None:
    """Stop *and close* the server an earlier call left on ``port``: Dash's jupyter mode only
    shuts it down, and its socket stays bound until garbage collection, so serving again on the
    same port (re-running the cell) failed with "Address already in use" now and then."""
    try:
        from dash._jupyter import jupyter_dash
    except ImportError:  # another Dash layout: nothing of ours to close
        return
    servers = getattr(jupyter_dash, "_servers", {})
    for key in [k for k in servers if k[1] == port]:
        old = servers.pop(key)
        old.shutdown()
        old.server_close()


# ---- an in-memory result as a run ----------------------------------------------------------------
KEYS = ("image", "layer", "head")  # the long format of head_importance / attention_strength


def _is_result(obj) -> bool:
    return isinstance(obj, (pd.DataFrame, Mapping)) or (
        isinstance(obj, (list, tuple)) and bool(obj) and all(isinstance(o, (pd.DataFrame, Mapping)) for o in obj))


def save_result(result, vit, images, labels=None, *, out=None, q: float = 0.01) -> Run:
    """Write an in-memory result as a HeadScope run and open it.

    result: a DataFrame in the long format of ``head_importance`` / ``attention_strength`` (columns
    image, layer, head and registered image_head metrics; "image" = row of ``images``), a dict of
    arrays {metric: [n, L, H(, K)]} such as ``analyse_batch``'s (its "probs", "patch_bits" and
    "patch_maps" are used too), or a list of these. Columns take the registry's meaning: rename the
    columns of ``head_importance(..., ablation="mean")`` to mean_prob, mean_prob_drop, ...
    vit: the model; images: the preprocessed float tensor [n, 3, H, W] the result was computed on;
    labels: [n] class indices (-1 = unknown) or None. out: the run folder (a new temporary one by
    default; an earlier notebook run there is replaced, any other content refused); q: the top
    fraction the pattern metrics used, if given.

    The tables and manifest are written by ``analysis.runs.tables.write_run`` (the build's writer);
    the manifest says ``source: "notebook"`` and ``model.in_memory``. What the build would add and
    the result lacks is simply not in the run (the views say so); the images table's prediction
    comes from one unpruned forward (or the result's "probs"), the image overview from the build's
    layout of the overview metric, the images and thumbnails from the de-normalised tensors. The
    model and the tensors are attached to this process's online service, so the online views use
    exactly them; served anywhere else, the online views say they need the model.
    """
    import torch

    from analysis.metrics import registry
    from analysis.metrics.engine import ENGINE_ARRAYS
    from analysis.runs import build
    from analysis.runs.tables import write_run
    from analysis.serving import transport

    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise InputError(f"images must be the preprocessed float tensor [n, 3, H, W] the result was computed on "
                         f"(vit.preprocess(pil_images)); got {getattr(images, 'shape', type(images).__name__)}.")
    images = vit.check_images(images).cpu()
    n, L, H = len(images), vit.depth, vit.num_heads
    arrays, engine = _result_arrays(result, n, L, H, set(ENGINE_ARRAYS))
    labels = _labels(vit, labels, n)
    probs = engine.get("probs")
    if probs is None and vit.has_head:
        with torch.inference_mode():
            probs = torch.cat([vit(images[s:s + 64]).double().softmax(-1).float().cpu()
                               for s in range(0, n, 64)]).numpy()
    metric, overview = _overview(vit, labels, arrays)
    run_dir = _notebook_folder(out)  # written from here on: every check above has passed
    frame = _images_frame(vit, images, labels, probs, overview, run_dir)
    stages = sorted({m.stage for m in registry.metrics("image_head", names=arrays) if m.stage})
    manifest = {"created": build.now_iso(), "source": "notebook",
                "model": {**build.model_facts(build.BuildConfig(out=str(run_dir), model=vit.name), vit),
                          "in_memory": True},
                "dataset": {"name": "notebook", "kind": "in-memory", "n_images": n, "n_analysed": n, "n_skipped": 0,
                            "class_names": vit.class_names},
                "params": {"q": q, "seed": 0, "overview_metric": metric, **({"stages": stages} if stages else {})},
                "versions": build.library_versions(), "timings": {}}
    write_run(run_dir, manifest, frame, arrays, L=L, H=H, stages=stages,
                    inputs={k: engine[k] for k in ("patch_bits",) if k in engine}, patch_maps=engine.get("patch_maps"))
    transport.attach(run_dir, vit, images)
    return open_run(run_dir)


def _result_arrays(result, n: int, L: int, H: int, engine_names: set) -> tuple[dict, dict]:
    """The result as ({metric: dense [n, L, H(, K)]}, {engine array: value}); InputError for
    unknown columns, a metric given twice, or rows outside the images and heads."""
    from analysis.metrics import registry

    known = {m.name: m for m in registry.metrics("image_head")}
    arrays, engine = {}, {}
    for part in (result if isinstance(result, (list, tuple)) else [result]):
        if isinstance(part, pd.DataFrame):
            given = _frame_arrays(part, n, L, H, known)
        elif isinstance(part, Mapping):
            given = {}
            for name, a in part.items():
                if name in engine_names:
                    engine[name] = np.asarray(a)
                elif name in known:
                    given[name] = np.asarray(a)
                    if given[name].shape[:3] != (n, L, H):
                        raise InputError(f"Result array {name!r} has shape {given[name].shape}; it must be [n={n}, "
                                         f"L={L}, H={H}, ...] for these images and this model.")
                else:
                    raise InputError(f"Result array {name!r} is not a registered image_head metric (they are "
                                     f"{', '.join(known)}) nor an engine array ({', '.join(sorted(engine_names))}).")
        else:
            raise InputError(f"A result is a DataFrame (head_importance, attention_strength) or a dict of arrays "
                             f"(analyse_batch), not {type(part).__name__}.")
        twice = sorted(set(given) & set(arrays))
        if twice:
            raise InputError(f"The result gives {', '.join(twice)} twice; pass each metric once.")
        arrays.update(given)
    if not arrays:
        raise InputError("The result has no metric to show; give head_importance's DataFrame or analyse_batch's arrays.")
    return arrays, engine


def _frame_arrays(df: pd.DataFrame, n: int, L: int, H: int, known: dict) -> dict:
    """A long DataFrame (image, layer, head, metrics...) -> {metric: [n, L, H(, K)]} (NaN / "" where a row is missing)."""
    missing = [k for k in KEYS if k not in df.columns]
    if missing:
        raise InputError(f"The result DataFrame lacks the columns {', '.join(missing)} (the long format of "
                         "head_importance: image, layer, head, metrics...).")
    unknown = [c for c in df.columns if c not in KEYS and c not in known]
    if unknown:
        raise InputError(f"The result DataFrame has columns that are not registered image_head metrics: "
                         f"{', '.join(map(str, unknown))} (registered: {', '.join(known)}). Drop or rename them.")
    idx = [df[k].to_numpy(np.int64) for k in KEYS]
    for (k, limit), i in zip(zip(KEYS, (n, L, H)), idx):
        if len(i) and (i.min() < 0 or i.max() >= limit):
            raise InputError(f"The result DataFrame's {k} column runs {i.min()}-{i.max()}; these images and this "
                             f"model have {k}s 0-{limit - 1}.")
    if pd.Index(zip(*idx)).has_duplicates:
        raise InputError("The result DataFrame has more than one row for some (image, layer, head); pass one frame "
                         "per method.")
    out = {}
    for name in (c for c in df.columns if c not in KEYS):
        m = known[name]
        if m.value == "vector":
            rows = [np.asarray(v, np.float32) for v in df[name]]
            a = np.full((n, L, H, max((len(r) for r in rows), default=0)), np.nan, np.float32)
            if rows:
                a[tuple(idx)] = np.stack(rows)
        elif m.value == "category":
            a = np.full((n, L, H), "", object)
            a[tuple(idx)] = [v if isinstance(v, str) else "" for v in df[name]]
        else:
            a = np.full((n, L, H), np.nan)
            a[tuple(idx)] = pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64)
        out[name] = a
    return out


def _notebook_folder(out) -> Path:
    """The run folder to write: a new temporary one, or ``out`` when empty or an earlier notebook run."""
    import json

    from analysis.runs.reader import run_name_problem

    if out is None:
        return Path(tempfile.mkdtemp(prefix="headscope-")) / "notebook"
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} is a file; give a new or empty folder for the run.")
    if problem := run_name_problem(out.name):
        raise InputError(f"{problem} (the run folder's name is the run's name in the dashboard)")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / "manifest.json").read_text()).get("source") == "notebook"
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier:
            raise InputError(f"{out} is not empty and holds no notebook result; give a new or empty folder.")
        for sub in ("images", "thumbs"):  # the earlier result's files (its tables are rewritten)
            shutil.rmtree(out / sub, ignore_errors=True)
    return out


def _labels(vit, labels, n: int) -> np.ndarray:
    """[n] int64 class indices, -1 = unknown. Class names are taken by the model's class names;
    InputError for anything else that is not a whole number (floats such as 0.5, booleans, NaN),
    LabelError outside the model's classes."""
    if labels is None:
        return np.full(n, -1, np.int64)
    given = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).reshape(-1)
    if len(given) != n:
        raise InputError(f"labels: got {len(given)} labels for {n} images; pass one class index per image "
                         "(-1 = unknown) or None.")
    if given.dtype.kind in "USO":
        return _labels_by_name(vit, given)
    if given.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(given) | (given != np.round(given)))
        if len(bad):
            raise InputError(f"labels must be whole class indices (-1 = unknown); rows {bad[:10].tolist()} hold "
                             f"{given[bad[:10]].tolist()}. Pass integers, e.g. labels.astype(int) if they are whole.")
    elif given.dtype.kind not in "iu":
        raise InputError(f"labels must be class indices (integers, -1 = unknown) or class names, not "
                         f"{given.dtype} values such as {given[:3].tolist()}.")
    out = given.astype(np.int64)
    bad = np.flatnonzero((out < -1) | ((out >= vit.num_classes) if vit.has_head else False))
    if len(bad):
        raise LabelError(f"Labels outside the model's {vit.num_classes} classes (-1 = unknown) at rows "
                         f"{bad[:10].tolist()}: {out[bad[:10]].tolist()}.")
    return out


def _labels_by_name(vit, names: np.ndarray) -> np.ndarray:
    """Class names -> their indices in ``vit.class_names``; InputError naming the names it lacks."""
    classes = list(vit.class_names or [])
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(v) for v in names if str(v) not in index})
    if not classes or unknown:
        have = f"its class names are {', '.join(map(repr, classes[:8]))}{', ...' if len(classes) > 8 else ''}" \
            if classes else "it has no class names"
        raise InputError(f"labels: {', '.join(map(repr, unknown[:5])) or 'names'} are not class names of the model "
                         f"({have}). Pass class indices (integers, -1 = unknown), or names from vit.class_names.")
    return np.array([index[str(v)] for v in names], np.int64)


def _overview(vit, labels: np.ndarray, arrays: dict) -> tuple[str | None, np.ndarray]:
    """The image overview as the build lays it out (t-SNE of the overview metric over heads), or NaN
    [n, 2] when the result has no importance metric."""
    from analysis.runs.build import overview_metric
    from analysis.runs.layouts import tsne_2d

    from analysis.metrics import registry

    first = overview_metric(vit.has_head, labels)
    candidates = [first] + [m.name for m in registry.metrics("image_head", importance=True)]
    metric = next((m for m in candidates if m in arrays and np.isfinite(arrays[m]).any()), None)
    if metric is None:
        return None, np.full((len(labels), 2), np.nan, np.float32)
    return metric, tsne_2d(np.nan_to_num(arrays[metric].reshape(len(labels), -1)), seed=0, n_jobs=1)


def _images_frame(vit, images, labels: np.ndarray, probs, overview: np.ndarray, run_dir: Path) -> pd.DataFrame:
    """IMAGE_COLUMNS rows; writes images/ID.png (the de-normalised input) and thumbs/ID.png."""
    from PIL import Image

    from analysis.runs.batches import thumb_side
    from analysis.runs.build import prediction_columns

    mean = np.asarray(vit.data_config.get("mean", (0, 0, 0)), np.float32).reshape(3, 1, 1)
    std = np.asarray(vit.data_config.get("std", (1, 1, 1)), np.float32).reshape(3, 1, 1)
    side = thumb_side(vit)
    paths = []
    for sub in ("images", "thumbs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images.numpy()):
        rgb = (np.clip(x * std + mean, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        im = Image.fromarray(rgb)
        im.save(run_dir / "images" / f"{i}.png")
        im.resize((side, round(side * im.height / im.width)), Image.BICUBIC).save(run_dir / "thumbs" / f"{i}.png")
        paths.append(str(run_dir / "images" / f"{i}.png"))
    names = vit.class_names or []
    return pd.DataFrame({
        "image_id": np.arange(len(images)), "path": paths, "label": labels,
        "label_name": [names[c] if 0 <= c < len(names) else "" for c in labels],
        **prediction_columns(None if probs is None else np.asarray(probs, np.float32), labels),
        "overview_x": overview[:, 0], "overview_y": overview[:, 1]})
