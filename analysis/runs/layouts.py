"""2-D layouts of feature vectors (SPEC "Attention patterns": t-SNE of CLS vectors, patch
latents and per-image importance vectors).

``tsne_2d`` runs openTSNE on at most ``PCA_DIMS`` principal components with PCA
initialisation and a fixed seed: Barnes-Hut gradients (one thread, fastest for small sets) up to
``FFT_N`` points, FFT-accelerated gradients (O(n) per iteration) above. Above ``LARGE_N``
points it uses fewer neighbours and fewer iterations, so 144k points lay out in about a
minute on one CPU core (45 s measured by ``scripts/bench_build.py``). Tiny sets (too few
points for t-SNE) fall back to their first two principal components.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

PCA_DIMS = 50          # t-SNE input dimensions (principal components of the features)
FFT_N = 10_000         # above this many points: FFT gradients instead of Barnes-Hut
LARGE_N = 50_000       # above this many points: sparser affinities, fewer iterations
MIN_TSNE_POINTS = 8    # below this, the layout is plain PCA


def pca_reduce(X: np.ndarray, dims: int, seed: int = 0) -> np.ndarray:
    """Project X [n, d] onto its first ``dims`` principal components -> [n, min(dims, d)] float32."""
    X = X - X.mean(axis=0, keepdims=True)
    if X.shape[1] <= dims or X.shape[0] < 2:
        return X.astype(np.float32)
    from sklearn.decomposition import PCA

    k = min(dims, X.shape[0])
    solver = "randomized" if X.shape[0] > 5 * dims else "full"
    return PCA(n_components=k, svd_solver=solver, random_state=seed).fit_transform(X).astype(np.float32)


def tsne_settings(n: int) -> dict:
    """openTSNE settings for n points: affinity, neighbours, Annoy trees, iterations."""
    if n > LARGE_N:
        # Sparse uniform affinities over 15 neighbours (as openTSNE advises for large data),
        # a cheaper Annoy index and 375 iterations in all (bench_build.py: 144k points in minutes).
        return dict(affinity="uniform", k_neighbors=15, n_trees=15, early_iter=125, n_iter=250)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))  # reduced for tiny sets
    if n > FFT_N:
        # Perplexity 30; the late iterations dominate the cost (the embedding has spread out), and
        # with openTSNE's learning rate n/12 500 iterations in all are converged at this size.
        return dict(affinity="perplexity", perplexity=perplexity, n_trees=15, early_iter=125, n_iter=375)
    # Standard t-SNE: perplexity 30, 250 early-exaggeration + 500 iterations.
    return dict(affinity="perplexity", perplexity=perplexity, n_trees=50, early_iter=250, n_iter=500)


def tsne_2d(X: np.ndarray, seed: int = 0, n_jobs: int = 2,
            progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """t-SNE of X [n, d] -> [n, 2] float32, seeded (n_jobs threads for FFT gradients).
    NaNs count as 0; constant data maps to 0. ``progress(done, total)`` gets the iterations."""
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    if n == 0:
        return np.zeros((0, 2), np.float32)
    X = np.nan_to_num(X.reshape(n, -1))
    Xr = pca_reduce(X, PCA_DIMS, seed)
    if n < MIN_TSNE_POINTS or not np.any(Xr.std(axis=0) > 1e-12):
        return pca_layout(Xr)
    from openTSNE import TSNEEmbedding, affinity, initialization

    s = tsne_settings(n)
    # The Annoy neighbour search is faster single-threaded (joblib overhead per query).
    knn = dict(method="annoy", n_jobs=1, random_state=seed, knn_kwargs={"n_trees": s["n_trees"]})
    if s["affinity"] == "uniform":
        aff = affinity.Uniform(Xr, k_neighbors=s["k_neighbors"], **knn)
    else:
        aff = affinity.PerplexityBasedNN(Xr, perplexity=s["perplexity"], **knn)
    init = initialization.pca(Xr, random_state=seed)
    method, jobs = ("fft", n_jobs) if n > FFT_N else ("bh", 1)
    emb = TSNEEmbedding(init, aff, negative_gradient_method=method, n_jobs=jobs, random_state=seed)
    total = s["early_iter"] + s["n_iter"]

    def callbacks(offset: int) -> dict:
        if progress is None:
            return {}

        def report(iteration, error, embedding):
            progress(offset + iteration, total)
            return False  # keep optimising
        return {"callbacks": report, "callbacks_every_iters": 25}

    emb = emb.optimize(s["early_iter"], exaggeration=12, momentum=0.5, **callbacks(0))
    emb = emb.optimize(s["n_iter"], momentum=0.8, **callbacks(s["early_iter"]))
    return np.asarray(emb, dtype=np.float32)


def pca_layout(X: np.ndarray) -> np.ndarray:
    """First two principal components [n, 2] float32 (zero-padded when d < 2)."""
    X = X - X.mean(axis=0, keepdims=True)
    out = np.zeros((X.shape[0], 2), np.float32)
    if X.shape[0] < 2 or not np.any(X):
        return out
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    proj = X @ vt[:2].T
    out[:, :proj.shape[1]] = proj
    return out
