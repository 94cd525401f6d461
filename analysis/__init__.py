"""HeadScope's analysis engine: which ViT attention heads matter, why, and what they learned.

Public API (see README):
    load_vit, head_importance, attention_strength, partial_pruning, analyse_batch, MODES
"""
from .engine import BatchResult, analyse_batch, attention_strength
from .errors import HeadScopeError
from .importance import METRICS, head_importance, partial_pruning
from .pruning import MODE_LABELS, MODES
from .vit import ViT, load_vit

__all__ = ["load_vit", "ViT", "head_importance", "attention_strength", "partial_pruning",
           "analyse_batch", "BatchResult", "METRICS", "MODES", "MODE_LABELS", "HeadScopeError"]
