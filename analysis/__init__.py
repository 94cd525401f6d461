"""HeadScope's analysis engine: which ViT attention heads matter, why, and what they learned.

Public API (see README):
    load_vit, head_importance (method="exact"|"taylor", ablation="zero"|"mean"), attention_strength,
    partial_pruning, analyse_batch, MODES; head sets: set_pruning, set_metrics, pair_interactions,
    pruning_curve(s), exact_order, taylor_order, random_order, curve_area, heads_before_drop;
    pattern labels: pattern_scores; patch attribution: patch_maps, head_saliency_alignment,
    map_agreement, deletion_curves; how heads work together: direct_effects, head_paths,
    sink_metrics, token_norms. The notebook helpers (save_result, explorer, open_run, head_figures)
    are in ``analysis.notebook``, a composition root over the dashboard.

The names are re-exported from the modules that define them (plain imports: the engine layers
below, see ARCHITECTURE.md), so ``import analysis`` loads torch.
"""
from analysis.errors import HeadScopeError
from analysis.metrics.classes import class_specificity, class_statistics
from analysis.metrics.direct import direct_effects
from analysis.metrics.engine import BatchResult, analyse_batch, attention_strength
from analysis.metrics.head_sets import (curve_area, default_steps, exact_order, heads_before_drop, order_by,
                                        pair_interactions, pruning_curve, pruning_curves, random_order, set_metrics,
                                        set_pruning, taylor_order)
from analysis.metrics.importance import METRICS, partial_pruning
from analysis.metrics.importance_methods import head_importance
from analysis.metrics.patch_maps import MAPS, deletion_curves, head_saliency_alignment, map_agreement, patch_maps
from analysis.metrics.paths import head_paths
from analysis.metrics.patterns import consistency, pattern_arrays, pattern_scores
from analysis.metrics.sinks import sink_metrics, token_norms
from analysis.models.adapter import ViT, load_vit
from analysis.models.pruning import MODE_LABELS, MODES

__all__ = [
    "BatchResult", "analyse_batch", "attention_strength", "HeadScopeError", "METRICS", "head_importance",
    "partial_pruning", "MODE_LABELS", "MODES", "ViT", "load_vit",
    "set_pruning", "set_metrics", "pair_interactions", "pruning_curve", "pruning_curves", "exact_order",
    "taylor_order", "random_order", "order_by", "default_steps", "curve_area", "heads_before_drop",
    "pattern_scores", "pattern_arrays", "consistency", "class_statistics", "class_specificity",
    "patch_maps", "head_saliency_alignment", "map_agreement", "deletion_curves", "MAPS",
    "direct_effects", "head_paths", "sink_metrics", "token_norms",
]
