"""HeadScope's analysis engine: which ViT attention heads matter, why, and what they learned.

Public API (see README):
    load_vit, head_importance (method="exact"|"taylor", ablation="zero"|"mean"), attention_strength,
    partial_pruning, analyse_batch, MODES; head sets: set_pruning, set_metrics, pair_interactions,
    pruning_curve(s), exact_order, taylor_order, random_order, curve_area, heads_before_drop
"""
from analysis.metrics.engine import BatchResult, analyse_batch, attention_strength
from analysis.errors import HeadScopeError
from analysis.metrics.head_sets import (curve_area, default_steps, exact_order, heads_before_drop, order_by,
                                        pair_interactions, pruning_curve, pruning_curves, random_order,
                                        set_metrics, set_pruning, taylor_order)
from analysis.metrics.importance import METRICS, head_importance, partial_pruning
from analysis.models.pruning import MODE_LABELS, MODES
from analysis.models.adapter import ViT, load_vit

__all__ = ["load_vit", "ViT", "head_importance", "attention_strength", "partial_pruning",
           "analyse_batch", "BatchResult", "METRICS", "MODES", "MODE_LABELS", "HeadScopeError",
           "set_pruning", "set_metrics", "pair_interactions", "pruning_curve", "pruning_curves",
           "exact_order", "taylor_order", "random_order", "order_by", "default_steps", "curve_area",
           "heads_before_drop"]
