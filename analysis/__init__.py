"""HeadScope's analysis engine: which ViT attention heads matter, why, and what they learned.

Public API (see README):
    load_vit, head_importance, attention_strength, partial_pruning, analyse_batch, MODES,
    patch_maps, head_saliency_alignment, map_agreement, deletion_curves
"""
from analysis.metrics.engine import BatchResult, analyse_batch, attention_strength
from analysis.errors import HeadScopeError
from analysis.metrics.importance import METRICS, head_importance, partial_pruning
from analysis.metrics.patch_maps import MAPS, deletion_curves, head_saliency_alignment, map_agreement, patch_maps
from analysis.models.pruning import MODE_LABELS, MODES
from analysis.models.adapter import ViT, load_vit

__all__ = ["load_vit", "ViT", "head_importance", "attention_strength", "partial_pruning",
           "analyse_batch", "BatchResult", "METRICS", "MODES", "MODE_LABELS", "HeadScopeError",
           "patch_maps", "head_saliency_alignment", "map_agreement", "deletion_curves", "MAPS"]
