"""k-hop strength, entropy, mean distance and pattern inputs on hand-built attention."""
import math

import numpy as np
import pytest
import torch

from analysis.metrics.patterns import binarize_topq, cls_vector, pack_bits, topq_count, unpack_bits
from analysis.metrics.strength import (hop_counts, hop_distance, khop_strength, mean_attention_distance,
                               strength_entropy)


def brute_force_strength(A, gh, gw):
    """SPEC's definition written as loops."""
    P, K = gh * gw, max(gh, gw)
    coords = [(u // gw, u % gw) for u in range(P)]
    s = []
    for k in range(K):
        per_source = []
        for u in range(P):
            targets = [v for v in range(P)
                       if max(abs(coords[u][0] - coords[v][0]), abs(coords[u][1] - coords[v][1])) == k]
            if targets:
                per_source.append(sum(A[u, v] for v in targets) / len(targets))
        s.append(sum(per_source) / len(per_source))
    return np.array(s)


def test_spec_worked_example_5x5():
    counts = hop_counts(5, 5)
    assert counts.shape == (25, 5)
    assert counts[0].tolist() == [1, 3, 5, 7, 9]           # source (0, 0)
    assert counts[2 * 5 + 2].tolist() == [1, 8, 16, 0, 0]   # source (2, 2)
    assert hop_distance(5, 5)[0, 24] == 4


@pytest.mark.parametrize("grid", [(5, 5), (3, 5), (4, 2)])
def test_khop_matches_definition(grid):
    gh, gw = grid
    P = gh * gw
    torch.manual_seed(0)
    A = torch.rand(2, P, P).double()
    A = A / A.sum(-1, keepdim=True) * 0.8      # rows do not sum to 1 over patches: raw values used
    s = khop_strength(A, grid)
    assert s.shape == (2, max(gh, gw))
    for b in range(2):
        np.testing.assert_allclose(s[b].numpy(), brute_force_strength(A[b].numpy(), gh, gw), rtol=1e-12)


def test_entropy_extremes_and_uniform():
    P, grid = 25, (5, 5)
    self_attention = torch.eye(P)
    s = khop_strength(self_attention, grid)
    assert s.tolist() == [1, 0, 0, 0, 0]
    assert strength_entropy(s).item() == pytest.approx(0.0, abs=1e-7)
    uniform = torch.full((P, P), 1 / P)
    s = khop_strength(uniform, grid)
    torch.testing.assert_close(s, torch.full((5,), 1 / P))
    assert strength_entropy(s).item() == pytest.approx(1.0, abs=1e-6)
    even = torch.ones(7)
    assert strength_entropy(even).item() == pytest.approx(1.0)
    half = torch.tensor([1.0, 1.0, 0, 0])
    assert strength_entropy(half).item() == pytest.approx(math.log(2) / math.log(4))


def test_mean_attention_distance_pixels():
    grid, patch = (3, 4), 16
    assert mean_attention_distance(torch.eye(12), grid, patch).item() == 0.0
    right = torch.zeros(12, 12)
    for u in range(12):   # each patch attends to its right neighbour (last column: left neighbour)
        r, c = divmod(u, 4)
        right[u, r * 4 + (c + 1 if c < 3 else c - 1)] = 0.5   # unnormalised: renormalised over patches
    assert mean_attention_distance(right, grid, patch).item() == pytest.approx(16.0)
    diag = torch.zeros(12, 12)
    diag[:, 5] = 1.0   # everyone attends to patch (1, 1)
    expected = np.mean([math.hypot(r - 1, c - 1) * 16 for r in range(3) for c in range(4)])
    assert mean_attention_distance(diag, grid, patch).item() == pytest.approx(expected, rel=1e-6)


def test_pattern_inputs():
    T, P = 2, 16
    N = T + P
    A = torch.softmax(torch.randn(3, N, N), -1)
    v = cls_vector(A, T)
    assert v.shape == (3, N + P)
    torch.testing.assert_close(v[:, :N], A[:, 0, :])
    torch.testing.assert_close(v[:, N:], A[:, T:, 0])
    bits = binarize_topq(A[:, T:, T:], q=0.05)
    k = topq_count(P * P, 0.05)
    assert k == 13 and bits.sum((-1, -2)).tolist() == [k] * 3
    for b in range(3):   # the kept entries are the k largest
        kept = A[b, T:, T:][bits[b]]
        dropped = A[b, T:, T:][~bits[b]]
        assert kept.min() >= dropped.max()
    packed = pack_bits(bits)
    assert packed.shape == (3, P * P // 8) and packed.dtype == np.uint8
    assert (unpack_bits(packed, P) == bits.numpy()).all()
    odd = torch.rand(5, 5) > 0.5     # P*P not a multiple of 8
    assert (unpack_bits(pack_bits(odd), 5) == odd.numpy()).all()


def test_semantic_concentration():
    from analysis.metrics.semantic import semantic_concentration, semantic_weights

    T, P = 1, 4
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    A = torch.zeros(1, 3, T + P, T + P)
    A[0, 0, :, 1] = 1.0                      # head 0: everyone attends to patch 0 (w = 0.5)
    A[0, 1, :, T:] = 0.25                    # head 1: uniform over patches
    A[0, 2, :, 0] = 0.5                      # head 2: half to CLS, rest to patch 3 (w = 0)
    A[0, 2, :, 4] = 0.5
    patch_sc, cls_sc = semantic_concentration(A, w, T)
    torch.testing.assert_close(patch_sc, torch.tensor([[2.0, 1.0, 0.0]]))   # P * 0.5, uniform = 1
    torch.testing.assert_close(cls_sc, torch.tensor([[2.0, 1.0, 0.0]]))
    square = np.zeros((28, 28))
    square[8:20, 8:20] = 1.0                 # corners of a bright square inside patch grid 2x2
    wts = semantic_weights(square, (2, 2), 14)
    assert wts.shape == (4,) and wts.sum() == pytest.approx(1.0)
    assert np.isnan(semantic_weights(np.zeros((28, 28)), (2, 2), 14)).all()
