"""HeadScope in a notebook: HTML summaries, a head's figures, and the Explorer inline.

    from analysis.notebook import open_run, head_figures, explorer
    run = open_run("cache/default"); run          # a run shows its summary (Run._repr_html_)
    figs = head_figures(run, 0, 4, image_id=12)   # Plotly figures from the app's own builders
    explorer(run)                                 # the dashboard in the output cell (Dash jupyter mode)

``ViT`` and ``Run`` objects render as HTML tables in Jupyter. The figures come from
``app.figures`` (the builders the dashboard draws with), so a notebook and the app show the same.
"""
from __future__ import annotations

import html
from pathlib import Path

from analysis.errors import InputError
from analysis.runs.store import Run, open_run

__all__ = ["open_run", "head_figures", "explorer", "vit_html", "run_html"]


def _table(title: str, rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                    f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<div><b>{html.escape(title)}</b><table>{cells}</table></div>"


def _names(names, n: int = 6) -> str:
    if not names:
        return "none"
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def vit_html(vit) -> str:
    """The shape facts of a loaded ViT as an HTML table."""
    h, w = vit.img_size
    return _table(f"ViT {vit.name}", [
        ("family", vit.family.family), ("layers x heads", f"{vit.depth} x {vit.num_heads} (head dim {vit.head_dim})"),
        ("prefix tokens", vit.num_prefix_tokens),
        ("patch grid", f"{vit.grid[0]} x {vit.grid[1]} of {vit.patch_size} px ({vit.num_tokens} tokens)"),
        ("input", f"{h} x {w} px, mean {vit.data_config.get('mean')}, std {vit.data_config.get('std')}"),
        ("classes", f"{vit.num_classes}: {_names(vit.class_names)}" if vit.has_head else "none (backbone)"),
        ("weights sha256", (vit.weights_sha256 or "n/a")[:16])])


def run_html(run: Run) -> str:
    """A run's summary: model, images, parameters and its most important heads."""
    mf, model, ds = run.manifest, run.model, run.manifest.get("dataset", {})
    params = mf.get("params", {})
    rows = [("model", f"{model.get('name')} ({model.get('family', 'timm-vit')}; {model.get('depth')} layers x "
                      f"{model.get('heads')} heads, {model.get('prefix_tokens')} prefix tokens, grid "
                      f"{model.get('grid')}, {model.get('img_size')} px)"),
            ("classes", f"{model.get('num_classes')}: {_names(model.get('class_names'))}"
             if model.get("num_classes") else "none (backbone run: emb_dist)"),
            ("images", f"{len(run.images)} analysed of {ds.get('name')} ({ds.get('kind')}), "
                       f"{len(run.skipped)} skipped"),
            ("parameters", f"q={params.get('q')}, seed={params.get('seed')}, built {mf.get('created')}"),
            ("metrics", ", ".join(run.metrics))]
    metric = _main_metric(run)
    if metric:
        top = run.head_summary.sort_values(f"{metric}_mean", ascending=False).head(5)
        rows.append((f"top heads by mean {metric}", ", ".join(
            f"L{int(r.layer)}H{int(r['head'])} ({r[f'{metric}_mean']:.3g})" for _, r in top.iterrows())))
    return _table(f"HeadScope run {run.name} ({run.path})", rows)


def _main_metric(run: Run) -> str | None:
    """prob_drop for a classifier run, emb_dist for a backbone run (the metrics SPEC leads with)."""
    return next((m for m in ("prob_drop", "jsd", "emb_dist") if m in run.metrics), None)


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
    metric = metric or _main_metric(run)
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
    from analysis import partial_pruning
    from analysis.metrics import registry
    from analysis.datasets import open_image
    from analysis.models.pruning import MODE_LABELS

    row = index.images.iloc[pos]
    x = vit.preprocess([open_image(row.path)])
    label = int(row.label) if vit.has_head and int(row.label) >= 0 else None
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


def explorer(run=None, mode: str = "inline", port: int = 8050, height: int = 1000, cache_dir=None):
    """Serve the HeadScope dashboard for ``run`` (a Run, a run directory, or a run name under
    ``cache_dir``) from this kernel, shown ``mode`` = "inline" (in the output cell), "tab" (a new
    browser tab), "external" (a link) or "jupyterlab" (Dash's jupyter modes). Returns the Dash app.
    Outside a notebook Dash serves in the foreground until Ctrl-C."""
    from app import create_app

    target = str(run.path) if isinstance(run, Run) else (str(run) if run is not None else None)
    if target is not None and Path(target).is_dir():
        _as_run(target)  # a clear CacheError now rather than an empty dashboard
    app = create_app(cache_dir=cache_dir, run=target)
    app.run(jupyter_mode=mode, jupyter_height=height, port=port)
    return app
