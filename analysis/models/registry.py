"""Registry of model families (timm-style private plumbing behind ``load_vit``).

Each family registers how to recognise a built module, a model name or a checkpoint folder, and
how to load one. ``load_vit`` asks the families in priority order (lowest first). A new family
is one new file in ``analysis/models/`` that calls ``register_family`` at import time; the package
(``analysis/models/__init__.py``) imports every module of its folder once, so no list names it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

@dataclass(frozen=True)
class FamilyEntry:
    """name; family: the ModelFamily subclass (built from a module); accepts_module(module) and
    accepts_name(str) say whether a built module / a name or path is this family's; load(name,
    weights, pretrained, img_size, num_classes) -> (ModelFamily, weights sha256 or None, class names
    or None);
    priority: lower is asked first; brings_weights(name): does this name load trained weights by
    itself (a checkpoint folder, an embedded default: a build needs no --weights); reference(name):
    the name as a run records it (a checkpoint folder: its absolute path); short_name(name): the
    model's part of a default run folder name (a checkpoint folder: the folder's own name)."""
    name: str
    family: type
    accepts_module: Callable[[nn.Module], bool]
    accepts_name: Callable[[str], bool]
    load: Callable
    priority: int = 100
    brings_weights: Callable[[str], bool] | None = None
    reference: Callable[[str], str] | None = None
    short_name: Callable[[str], str] | None = None


_FAMILIES: dict[str, FamilyEntry] = {}


def register_family(name: str, **kwargs) -> FamilyEntry:
    entry = FamilyEntry(name=name, **kwargs)
    _FAMILIES[name] = entry
    return entry


def unregister_family(name: str) -> None:
    """Remove a family (tests that register toy families undo them with this)."""
    _FAMILIES.pop(name, None)


def families() -> list[FamilyEntry]:
    """Every registered family, in the order load_vit asks them."""
    return sorted(_FAMILIES.values(), key=lambda e: e.priority)


def family_for_module(module: nn.Module) -> FamilyEntry | None:
    return next((e for e in families() if e.accepts_module(module)), None)


def family_for_name(name: str) -> FamilyEntry | None:
    return next((e for e in families() if e.accepts_name(name)), None)
