"""HeadScope's analysis engine: which ViT attention heads matter, why, and what they learned.

Public API (see README):
    load_vit, head_importance, attention_strength, partial_pruning, analyse_batch, MODES,
    pattern_scores, pattern_arrays, consistency, class_statistics, class_specificity
"""
from analysis.metrics.engine import BatchResult, analyse_batch, attention_strength
from analysis.errors import HeadScopeError
from analysis.metrics.importance import METRICS, head_importance, partial_pruning
from analysis.models.pruning import MODE_LABELS, MODES
from analysis.models.adapter import ViT, load_vit
from analysis.metrics.classes import class_specificity, class_statistics
from analysis.metrics.patterns import consistency, pattern_arrays, pattern_scores

__all__ = ["load_vit", "ViT", "head_importance", "attention_strength", "partial_pruning",
           "analyse_batch", "BatchResult", "METRICS", "MODES", "MODE_LABELS", "HeadScopeError",
           "pattern_scores", "pattern_arrays", "consistency", "class_statistics", "class_specificity"]
