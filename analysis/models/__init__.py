"""Model families behind one adapter (ViT): timm ViTs, the embedded default, checkpoints."""
from analysis.models.adapter import ViT, load_vit

__all__ = ["ViT", "load_vit"]
