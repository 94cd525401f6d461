"""Class level (SPEC "Class level"): per-class statistics of any per-image head metric.

These are functions on dense arrays (``values`` [n_images, ...], e.g. [n, L, H] of ``prob_drop``
or ``diagonal``) plus the images' true labels, so the engine, the build and the app share them
whatever table the values came from. Images with an unknown label (< 0) belong to no class and
are left out; NaN values are skipped, as pandas' groupby does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.errors import InputError


@dataclass
class ClassStats:
    """classes: int [C] (sorted labels present); counts: int [C] images per class;
    mean, std: float64 [C, ...] over each class's images (std population, ddof=0; NaN where a
    class has no finite value)."""
    classes: np.ndarray
    counts: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def _check(values, labels) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, np.float64)
    labels = np.asarray(labels).reshape(-1)
    if values.ndim < 1 or values.shape[0] != labels.shape[0]:
        raise InputError(f"values [n_images, ...] and labels [n_images] disagree: {values.shape} vs "
                         f"{labels.shape}. Pass one label per image, in the same order.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be integer class ids (-1 for unknown); got dtype {labels.dtype}.")
    return values, labels


def class_statistics(values, labels) -> ClassStats:
    """Mean and std of ``values`` [n_images, ...] over the images of each class (by ``labels`` [n])."""
    values, labels = _check(values, labels)
    known = labels >= 0
    values, labels = values[known], labels[known]
    classes, idx, counts = np.unique(labels, return_inverse=True, return_counts=True)
    flat = values.reshape(len(values), -1)
    finite = np.isfinite(flat)
    onehot = np.zeros((len(classes), len(values)))
    onehot[idx, np.arange(len(values))] = 1.0
    n = onehot @ finite
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (onehot @ np.where(finite, flat, 0.0)) / n
        dev = np.where(finite, flat - mean[idx], 0.0)
        std = np.sqrt((onehot @ dev ** 2) / n)
    shape = (len(classes),) + values.shape[1:]
    return ClassStats(classes, counts, mean.reshape(shape), std.reshape(shape))


def class_specificity(values, labels, min_images: int = 1) -> np.ndarray:
    """``max_c mean_c - mean`` per entry of ``values`` [n_images, ...] (SPEC): how much higher the metric
    is on its highest class than on average over the labelled images. Only classes with at least
    ``min_images`` images compete for the max. Returns float64 [...]."""
    values, labels = _check(values, labels)
    stats = class_statistics(values, labels)
    eligible = stats.counts >= min_images
    if not eligible.any():
        raise InputError(f"No class has at least {min_images} labelled images; lower min_images or "
                         "use a run with labelled images.")
    labelled = values[labels >= 0]
    finite = np.isfinite(labelled)
    with np.errstate(invalid="ignore", divide="ignore"):
        overall = np.where(finite, labelled, 0.0).sum(axis=0) / finite.sum(axis=0)
    return np.fmax.reduce(stats.mean[eligible], axis=0) - overall  # fmax: NaN only where every class is
