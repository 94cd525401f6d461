"""What the view state selects in a run, shared by the Explorer's views: the image and head, the
set and scope of images, the metric, the pruning mode, and the online results of the selected
(image, head), which the service computes once for every view that asks."""
from __future__ import annotations

import dash
import numpy as np

from analysis.metrics import registry
from analysis.models.pruning import MODE_LABELS

from app import data
from app.views import ViewModel

# The Explorer's views answer a state change in two requests: the views read from the run's tables
# (A, B1, C1-C3, D1, the header), and the online views (B2/B3, D2-D5), whose model queries run in
# parallel; each computes only the views whose inputs changed (app/views.py ViewModel).
def run_version(values: dict) -> str | None:
    """The identity of the selected run's index (a new one when the run is replaced in place), so that
    the views draw the new run's numbers at the next state change; None when the run cannot be opened."""
    try:
        return data.get_index((values.get("sel.data") or {}).get("run")).stamp
    except Exception:  # no run, or one that cannot be read: the views say which (views.load)
        return None


cached = ViewModel("cached", version=run_version)
online = ViewModel("online", parallel=True, version=run_version)
SCOPES = {"set": "all images (or the lasso set)", "class": "the image's class", "wrong": "mispredicted images"}


def selection(index: data.RunIndex, sel: dict):
    """(image position or None, (layer, head) or None) of the selection, validated against the run."""
    pos = index.pos(sel.get("image"))
    hi = index.head_index(sel.get("layer"), sel.get("head"))
    return pos, (None if hi is None else (int(sel["layer"]), int(sel["head"])))


def set_positions(index: data.RunIndex, sel: dict) -> np.ndarray | None:
    """Positions of the selected set's images in the run (None when there is no set)."""
    ids = sel.get("set") or []
    pos = [p for p in (index.pos(i) for i in ids) if p is not None]
    return np.asarray(sorted(pos), int) if pos else None


def scope_subset(index: data.RunIndex, sel: dict) -> tuple[np.ndarray, str] | None:
    """(positions, name) of the selected image's class or of the mispredicted images when the
    state's ``scope`` asks for one and the run can answer it; else None."""
    imgs, scope = index.images, sel.get("scope")
    if scope == "class" and sel.get("image") is not None and index.pos(sel["image"]) is not None:
        label = imgs["label"].iat[index.pos(sel["image"])]
        return np.flatnonzero((imgs["label"] == label).to_numpy()), f"class {index.class_name(label)}"
    if scope == "wrong" and index.has_classifier:
        return np.flatnonzero((imgs["pred"] != imgs["label"]).to_numpy()), "mispredicted"
    return None


def scope_positions(index: data.RunIndex, sel: dict) -> tuple[np.ndarray | None, str]:
    """(positions, name) of the images B1's band, C3's second area and D1's selected head are
    restricted to: the scope's subset (``scope_subset``), else the lasso set (None: no set)."""
    return scope_subset(index, sel) or (set_positions(index, sel), "the set")


def chosen_metric(index: data.RunIndex, sel: dict) -> str | None:
    """The chosen importance metric, or the run's default (prob; emb_dist for a backbone, as view A uses)."""
    if not index.importance:
        return None
    if sel.get("metric") in index.importance:
        return sel["metric"]
    return next((m for m in ("prob", "emb_dist") if m in index.importance), index.importance[0])


def pruning_mode(sel: dict) -> int:
    """The pruning mode B3 shows (index into MODE_LABELS; 1 by default)."""
    m = sel.get("mode")
    return int(m) if m is not None and 0 <= int(m) < len(MODE_LABELS) else 1


def image_caption(index: data.RunIndex, pos: int) -> str:
    row = index.images.iloc[pos]
    return f"image {int(row.image_id)} ({index.class_name(row.label)})"


def thumb_url(run: str, image_id) -> str:
    return dash.get_relative_path(f"/thumbs/{run}/{int(image_id)}.png")


def metric_title(metric: str) -> str:
    """The registry's axis title of ``metric``."""
    return registry.get_metric(metric).title


def attention(index: data.RunIndex, pos: int, head) -> dict:
    """The head's attention on the image at ``pos`` (online, cached per (image, head))."""
    return data.attention(index.name, int(index.image_ids[pos]), *head)


def pruning_rows(index: data.RunIndex, pos: int, head) -> list[dict]:
    """Partial pruning of the head on the image at ``pos``: one row per mode, in mode order (online)."""
    res = data.partial_pruning(index.name, int(index.image_ids[pos]), *head)
    return sorted(res["rows"], key=lambda r: r["mode"])
