"""Pruning regions and modes (SPEC "Pruning").

An attention matrix ``A [N, N]`` with ``T`` prefix tokens has three regions:
R1 prefix->prefix, R2 prefix->patches and patches->prefix, R3 patches->patches.
A pruning mode is a subset of {R1, R2, R3}; pruned entries are set to 0 after the softmax,
without renormalisation.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import Tensor

from analysis.errors import InputError

REGIONS = ("R1", "R2", "R3")

# The 8 subsets. 0..5 are the paper's Fig. 4 modes; 6 and 7 complete the set.
MODES: tuple[frozenset, ...] = (
    frozenset(),                    # 0 original head
    frozenset({"R1", "R2", "R3"}),  # 1 whole head removed
    frozenset({"R1"}),              # 2 CLS self-attention only
    frozenset({"R2"}),              # 3 CLS<->patch interaction only
    frozenset({"R3"}),              # 4 patch<->patch attention only
    frozenset({"R1", "R2"}),        # 5 everything CLS-related
    frozenset({"R1", "R3"}),        # 6 CLS self-attention and patch<->patch
    frozenset({"R2", "R3"}),        # 7 everything but CLS self-attention
)
MODE_LABELS = tuple("+".join(sorted(m)) or "none" for m in MODES)

Regions = Union[int, str, Iterable[str]]


def parse_regions(regions: Regions) -> frozenset:
    """A mode number (0-7), a string such as "R1+R3" / "all" / "none", or an iterable of names."""
    if isinstance(regions, (int,)) and not isinstance(regions, bool):
        if not 0 <= regions < len(MODES):
            raise InputError(f"Pruning mode {regions} does not exist: use 0-7 or region names R1/R2/R3.")
        return MODES[regions]
    if isinstance(regions, str):
        text = regions.strip().upper()
        if text in ("ALL", "HEAD"):
            return MODES[1]
        if text in ("NONE", ""):
            return MODES[0]
        regions = [r.strip() for r in text.replace(",", "+").split("+")]
    names = frozenset(regions)
    unknown = names - set(REGIONS)
    if unknown:
        raise InputError(f"Unknown pruning region(s) {sorted(unknown)}: use any of R1, R2, R3.")
    return names


def mode_index(regions: Regions) -> int:
    """The mode number (0-7) of a set of regions."""
    return MODES.index(parse_regions(regions))


def keep_mask(regions: Regions, num_tokens: int, num_prefix: int, n_query: int | None = None,
              device=None, dtype=torch.float32) -> Tensor:
    """Multiplicative mask [Nq, N]: 0 on the pruned regions, 1 elsewhere."""
    names = parse_regions(regions)
    n_query = num_tokens if n_query is None else n_query
    T = num_prefix
    mask = torch.ones(n_query, num_tokens, device=device, dtype=dtype)
    if "R1" in names:
        mask[:T, :T] = 0
    if "R2" in names:
        mask[:T, T:] = 0
        mask[T:, :T] = 0
    if "R3" in names:
        mask[T:, T:] = 0
    return mask


def prune_hook(spec: Iterable[tuple[int, int, Regions]], num_heads: int, depth: int,
               num_prefix: int):
    """Attention hook that applies a pruning spec [(layer, head, regions), ...] at once."""
    by_layer: dict[int, list[tuple[int, frozenset]]] = {}
    for layer, head, regions in spec:
        if not (0 <= layer < depth and 0 <= head < num_heads):
            raise InputError(f"Head ({layer}, {head}) does not exist: layers 0-{depth - 1}, heads 0-{num_heads - 1}.")
        by_layer.setdefault(layer, []).append((head, parse_regions(regions)))

    def hook(layer: int, A: Tensor) -> Tensor | None:
        if layer not in by_layer:
            return None
        nq, n = A.shape[-2:]
        mask = torch.ones(A.shape[1], nq, n, device=A.device, dtype=A.dtype)
        for head, names in by_layer[layer]:
            mask[head] *= keep_mask(names, n, num_prefix, nq, A.device, A.dtype)
        return A * mask

    return hook
