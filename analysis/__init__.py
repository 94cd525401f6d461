"""HeadScope's analysis engine: which ViT attention heads matter, why, and what they learned.

Public API (see README):
    load_vit, head_importance (method="exact"|"taylor", ablation="zero"|"mean"), attention_strength,
    partial_pruning, analyse_batch, MODES; head sets: set_pruning, set_metrics, pair_interactions,
    pruning_curve(s), exact_order, taylor_order, random_order, curve_area, heads_before_drop;
    pattern labels: pattern_scores; patch attribution: patch_maps, head_saliency_alignment,
    map_agreement, deletion_curves; notebook: save_result (an in-memory result as a run), explorer;
    how heads work together: direct_effects, head_paths, sink_metrics, token_norms

The names are imported on first use (PEP 562), so that `import analysis.cli` (the `headscope`
command's --help) or `analysis.errors` do not load torch.
"""
from __future__ import annotations

import importlib

_HEAD_SETS = ("set_pruning", "set_metrics", "pair_interactions", "pruning_curve", "pruning_curves", "exact_order",
              "taylor_order", "random_order", "order_by", "default_steps", "curve_area", "heads_before_drop")
_EXPORTS = {
    "BatchResult": "analysis.metrics.engine", "analyse_batch": "analysis.metrics.engine",
    "attention_strength": "analysis.metrics.engine",
    "HeadScopeError": "analysis.errors",
    "METRICS": "analysis.metrics.importance", "head_importance": "analysis.metrics.importance",
    "partial_pruning": "analysis.metrics.importance",
    "MODE_LABELS": "analysis.models.pruning", "MODES": "analysis.models.pruning",
    "ViT": "analysis.models.adapter", "load_vit": "analysis.models.adapter",
    **{name: "analysis.metrics.head_sets" for name in _HEAD_SETS},
    "pattern_scores": "analysis.metrics.patterns", "pattern_arrays": "analysis.metrics.patterns",
    "consistency": "analysis.metrics.patterns",
    "class_statistics": "analysis.metrics.classes", "class_specificity": "analysis.metrics.classes",
    **{name: "analysis.metrics.patch_maps" for name in ("patch_maps", "head_saliency_alignment", "map_agreement",
                                                        "deletion_curves", "MAPS")},
    "save_result": "analysis.notebook", "explorer": "analysis.notebook",
    "direct_effects": "analysis.metrics.direct", "head_paths": "analysis.metrics.paths",
    "sink_metrics": "analysis.metrics.sinks", "token_norms": "analysis.metrics.sinks",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
