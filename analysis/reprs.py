"""The HTML reprs of a ViT and a run in Jupyter (``ViT._repr_html_``, ``Run._repr_html_``).

Every text is escaped (safe_text.render_html: class names, run names and paths come from data). The
objects are read duck-typed, so this module sits in the lowest layer and imports only safe_text.
"""
from __future__ import annotations

import string

from analysis.safe_text import join_markup, render_html

TABLE = string.Template("<div><b>$title</b><table>$rows</table></div>")
ROW = string.Template("<tr><th style='text-align:left;padding-right:1em'>$key</th><td style='text-align:left'>$value</td></tr>")


def html_table(title: str, rows: list[tuple[str, object]]) -> str:
    """An HTML table of (key, value) rows under ``title``; every text escaped (safe_text.render_html:
    class names, run names and paths come from data)."""
    return str(render_html(TABLE, title=title, rows=join_markup(render_html(ROW, key=k, value=v) for k, v in rows)))


def names_list(names, n: int = 6) -> str:
    if not names:
        return "none"
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def vit_html(vit) -> str:
    """The shape facts of a loaded ViT as an HTML table."""
    h, w = vit.img_size
    return html_table(f"ViT {vit.name}", [
        ("family", vit.family.family), ("layers x heads", f"{vit.depth} x {vit.num_heads} (head dim {vit.head_dim})"),
        ("prefix tokens", vit.num_prefix_tokens),
        ("patch grid", f"{vit.grid[0]} x {vit.grid[1]} of {vit.patch_size} px ({vit.num_tokens} tokens)"),
        ("input", f"{h} x {w} px, mean {vit.data_config.get('mean')}, std {vit.data_config.get('std')}"),
        ("classes", f"{vit.num_classes}: {names_list(vit.class_names)}" if vit.has_head else "none (backbone)"),
        ("weights sha256", (vit.weights_sha256 or "n/a")[:16])])


def run_html(run) -> str:
    """A run's summary: model, images, parameters and its most important heads."""
    mf, model, ds = run.manifest, run.model, run.manifest.get("dataset", {})
    params = mf.get("params", {})
    rows = [("model", f"{model.get('name')} ({model.get('family', 'timm-vit')}; {model.get('depth')} layers x "
                      f"{model.get('heads')} heads, {model.get('prefix_tokens')} prefix tokens, grid "
                      f"{model.get('grid')}, {model.get('img_size')} px)"),
            ("classes", f"{model.get('num_classes')}: {names_list(model.get('class_names'))}"
             if model.get("num_classes") else "none (backbone run: emb_dist)"),
            ("images", f"{len(run.images)} analysed of {ds.get('name')} ({ds.get('kind')}), "
                       f"{len(run.skipped)} skipped"),
            ("parameters", f"q={params.get('q')}, seed={params.get('seed')}, built {mf.get('created')}"
                           + (" from a notebook's in-memory result" if mf.get("source") == "notebook" else "")),
            ("metrics", ", ".join(run.metrics))]
    metric = main_metric(run)
    if metric:
        top = run.head_summary.sort_values(f"{metric}_mean", ascending=False).head(5)
        rows.append((f"top heads by mean {metric}", ", ".join(
            f"L{int(r.layer)}H{int(r['head'])} ({r[f'{metric}_mean']:.3g})" for _, r in top.iterrows())))
    return html_table(f"HeadScope run {run.name} ({run.path})", rows)


def main_metric(run) -> str | None:
    """prob_drop for a classifier run, emb_dist for a backbone run (the metrics SPEC leads with)."""
    return next((m for m in ("prob_drop", "jsd", "emb_dist") if m in run.metrics), None)
