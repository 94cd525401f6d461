"""Model families behind one adapter (ViT): timm ViTs, HuggingFace checkpoints, the embedded defaults.

Each family module registers itself (``registry.register_family`` at import time); the package
imports every module of this folder once, so a new family is one new file and no list names it.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from analysis.models.adapter import ViT, load_vit

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ViT", "load_vit"]
