"""Registry of model families (timm-style private plumbing behind ``load_vit``).

Each family registers how to recognise a built module, a model name or a checkpoint folder, and
how to load one. ``load_vit`` asks the families in priority order (lowest first). A new family
is one new file in ``analysis/models/`` that calls ``register_family`` at import time and is
listed in ``FAMILY_MODULES``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from torch import nn

# Modules that register a family when imported (a new family: add its module here).
FAMILY_MODULES = ("analysis.models.timm_vit", "analysis.models.hf_vit")


@dataclass(frozen=True)
class FamilyEntry:
    """name; family: the ModelFamily subclass (built from a module); accepts_module(module) and
    accepts_name(str) say whether a built module / a name or path is this family's; load(name,
    weights, pretrained, img_size, num_classes) -> (ModelFamily, weights sha256 or None, class names
    or None);
    priority: lower is asked first."""
    name: str
    family: type
    accepts_module: Callable[[nn.Module], bool]
    accepts_name: Callable[[str], bool]
    load: Callable
    priority: int = 100


_FAMILIES: dict[str, FamilyEntry] = {}


def register_family(name: str, **kwargs) -> FamilyEntry:
    entry = FamilyEntry(name=name, **kwargs)
    _FAMILIES[name] = entry
    return entry


def families() -> list[FamilyEntry]:
    """Every registered family, in the order load_vit asks them."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return sorted(_FAMILIES.values(), key=lambda e: e.priority)


def family_for_module(module: nn.Module) -> FamilyEntry | None:
    return next((e for e in families() if e.accepts_module(module)), None)


def family_for_name(name: str) -> FamilyEntry | None:
    return next((e for e in families() if e.accepts_name(name)), None)
