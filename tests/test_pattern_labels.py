"""Pattern labels, consistency and class statistics on hand-built inputs (SPEC "Attention pattern
labels", "Class level")."""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import class_specificity, class_statistics, consistency, pattern_arrays, pattern_scores
from analysis.errors import InputError
from analysis.metrics.patterns import OFFSETS, binarize_topq, image_pairs, pack_bits

GRID = (4, 5)  # not square, so rows and columns cannot be swapped unnoticed; P = 20, ceil(0.1 P) = 2
GH, GW = GRID
P = GH * GW


def matrix(entries, grid=GRID):
    """Bool [P, P] from ((r_u, c_u), (r_v, c_v)) entries u -> v."""
    gh, gw = grid
    E = np.zeros((gh * gw, gh * gw), bool)
    for (ru, cu), (rv, cv) in entries:
        E[ru * gw + cu, rv * gw + cv] = True
    return E


def cells(grid=GRID):
    return list(itertools.product(range(grid[0]), range(grid[1])))


def expect(E, **values):
    scores = pattern_scores(E, GRID)
    assert set(scores) == {"diagonal", "diagonal_offset", "horizontal", "vertical", "block", "pattern"}
    for k, v in values.items():
        assert scores[k] == (pytest.approx(v, abs=1e-12) if isinstance(v, float) else v), k


def test_self():
    E = matrix([(u, u) for u in cells()])
    expect(E, diagonal=1.0, diagonal_offset="self", horizontal=0.0, vertical=2 / 20, block=0.0,
           pattern="diagonal:self")


@pytest.mark.parametrize("name", [o for o in OFFSETS if o != "self"])
def test_each_offset(name):
    dr, dc = OFFSETS[name]
    entries = [((r, c), (r + dr, c + dc)) for r, c in cells() if 0 <= r + dr < GH and 0 <= c + dc < GW]
    n = (GH - abs(dr)) * (GW - abs(dc))
    assert len(entries) == n
    expect(matrix(entries), diagonal=1.0, diagonal_offset=name, horizontal=0.0, vertical=2 / n, block=0.0,
           pattern=f"diagonal:{name}")


def test_offset_direction_names():
    # (1, 2) -> (0, 1): one row up, one column left on the grid
    assert pattern_scores(matrix([((1, 2), (0, 1))]), GRID)["diagonal_offset"] == "above-left"
    assert pattern_scores(matrix([((1, 2), (2, 2))]), GRID)["diagonal_offset"] == "below"


def test_horizontal():
    # every patch attends 2 and 3 columns to its right: 3 + 2 entries per row
    entries = [((r, c), (r, c + d)) for r, c in cells() for d in (2, 3) if c + d < GW]
    assert len(entries) == 20
    # targets (r, 3) and (r, 4) get 2 entries each: the 2 most attended hold 4 of 20
    expect(matrix(entries), diagonal=0.0, diagonal_offset="self", horizontal=1.0, vertical=0.2, block=0.0,
           pattern="horizontal")


def test_vertical():
    t1, t2 = (1, 1), (2, 3)  # interior targets: every offset reaches each from exactly one source
    E = matrix([(u, t) for u in cells() for t in (t1, t2)])
    # 40 entries; self, and each offset, 2 of them; row-mates 2+ columns away: 2 per target;
    # the mutual pair t1 <-> t2
    expect(E, diagonal=2 / 40, diagonal_offset="self", horizontal=4 / 40, vertical=1.0, block=2 / 40,
           pattern="vertical")


def test_block():
    blocks = [[(0, 0), (0, 1), (1, 0), (1, 1)], [(2, 3), (2, 4), (3, 3), (3, 4)]]
    E = matrix([(u, v) for b in blocks for u in b for v in b if u != v])
    # 24 entries: per block right, left, below, above 2 each, diagonals 1 each; every target 3
    expect(E, diagonal=4 / 24, diagonal_offset="right", horizontal=0.0, vertical=6 / 24, block=1.0,
           pattern="block")


MIXED = [((0, 0), (0, 0)), ((3, 4), (3, 4)),      # self
         ((1, 0), (1, 3)), ((2, 4), (2, 1)),      # horizontal
         ((0, 4), (3, 0)), ((3, 1), (0, 2)),      # far, one-way
         ((0, 1), (3, 3)), ((3, 3), (0, 1))]      # far, mutual


def test_mixed():
    expect(matrix(MIXED), diagonal=0.25, diagonal_offset="self", horizontal=0.25, vertical=0.25, block=0.25,
           pattern="mixed")


def test_threshold_is_inclusive():
    half_self = MIXED[:4] + [((1, 1), (1, 1)), ((2, 2), (2, 2))] + MIXED[6:]
    expect(matrix(half_self), diagonal=0.5, diagonal_offset="self", pattern="diagonal:self")


def test_bad_input():
    with pytest.raises(InputError, match="grid"):
        pattern_scores(np.eye(20, dtype=bool), (4, 4))
    with pytest.raises(InputError, match="no entries"):
        pattern_scores(np.zeros((20, 20), bool), GRID)
    with pytest.raises(InputError, match="square"):
        pattern_scores(np.zeros((20, 19), bool), GRID)
    with pytest.raises(InputError, match="bytes"):
        pattern_arrays(np.zeros((3, 7), np.uint8), GRID)


@pytest.mark.parametrize("grid", [GRID, (5, 5), (8, 8)])
def test_batch_equals_single(grid):
    gh, gw = grid
    torch.manual_seed(0)
    A = torch.rand(2, 3, 4, gh * gw, gh * gw) ** 8  # peaky, so top-q entries cluster
    bits = binarize_topq(A, q=0.05).numpy()
    bits[0, 0, 0] = np.eye(gh * gw, dtype=bool)     # one self-attending head
    if grid == GRID:
        bits[1, 2, 3] = matrix(MIXED)
        bits[1, 2, 2] = matrix([(u, (1, 1)) for u in cells()])
    batch = pattern_arrays(pack_bits(bits), grid, chunk=5)
    assert batch["diagonal"].shape == (2, 3, 4)
    labels = set()
    for idx in np.ndindex(2, 3, 4):
        single = pattern_scores(bits[idx], grid)
        labels.add(single["pattern"])
        for k, v in single.items():
            if isinstance(v, str):
                assert batch[k][idx] == v, (idx, k)
            else:
                assert batch[k][idx] == pytest.approx(v, rel=1e-6), (idx, k)
    assert "diagonal:self" in labels


# ---- consistency --------------------------------------------------------------------------

def packed_set(sets, P_=4):
    """[n_images, heads] lists of entry sets (flat indices into P_ x P_) -> packed [n, 1, heads, bytes]."""
    bits = np.zeros((len(sets), 1, len(sets[0]), P_, P_), bool)
    for i, heads in enumerate(sets):
        for h, entries in enumerate(heads):
            bits[i, 0, h].reshape(-1)[list(entries)] = True
    return pack_bits(bits)


@pytest.mark.parametrize("P_", [4, 8])  # 2 bytes per matrix (byte path) and 8 bytes (64-bit word path)
def test_consistency_hand_built(P_):
    a, b, c, d = 0, 5, 6, 15
    sets = [[{a, b}, {a, b}, {a}], [{a, b}, {b, c}, {b}], [{a, b}, {a, b, c, d}, {c}]]
    got = consistency(packed_set(sets, P_))
    assert got.shape == (1, 3)
    # head 0 identical: 1; head 1: J12 = 1/3, J13 = 2/4, J23 = 2/4; head 2 disjoint: 0
    np.testing.assert_allclose(got, [[1.0, (1 / 3 + 0.5 + 0.5) / 3, 0.0]], atol=1e-15)


def test_consistency_single_image_is_nan():
    assert np.isnan(consistency(packed_set([[{0}, {1}]]))).all()


def test_image_pairs_all_and_sampled():
    np.testing.assert_array_equal(image_pairs(5), np.stack(np.triu_indices(5, 1), axis=1))
    n = 60
    total = n * (n - 1) // 2
    for max_pairs in (500, total - 1):
        pairs = image_pairs(n, seed=3, max_pairs=max_pairs)
        assert len(pairs) == max_pairs
        assert (pairs[:, 0] < pairs[:, 1]).all() and (pairs[:, 1] < n).all() and (pairs >= 0).all()
        assert len({tuple(p) for p in pairs}) == max_pairs
    np.testing.assert_array_equal(image_pairs(n, seed=3, max_pairs=500), image_pairs(n, seed=3, max_pairs=500))


def test_consistency_sampled_pairs_match_loop():
    rng = np.random.default_rng(1)
    bits = rng.random((40, 2, 3, 6, 6)) < 0.2
    assert bits.any(axis=(-2, -1)).all()
    got = consistency(pack_bits(bits), seed=7, max_pairs=500)
    pairs = image_pairs(40, seed=7, max_pairs=500)
    want = np.zeros((2, 3))
    for l, h in np.ndindex(2, 3):
        js = [np.sum(bits[i, l, h] & bits[j, l, h]) / np.sum(bits[i, l, h] | bits[j, l, h]) for i, j in pairs]
        want[l, h] = np.mean(js)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ---- class statistics ---------------------------------------------------------------------

def long_frame(values, labels):
    n, L, H = values.shape
    img, lay, hd = np.meshgrid(np.arange(n), np.arange(L), np.arange(H), indexing="ij")
    return pd.DataFrame({"label": labels[img.ravel()], "layer": lay.ravel(), "head": hd.ravel(),
                         "value": values.ravel()})


def test_class_statistics_match_pandas_groupby():
    rng = np.random.default_rng(0)
    n, L, H = 31, 2, 3
    values = rng.normal(size=(n, L, H))
    values[rng.random(values.shape) < 0.1] = np.nan
    labels = rng.choice([-1, 0, 2, 5], size=n)
    labels[0] = 7  # a class of one image
    stats = class_statistics(values, labels)
    df = long_frame(values, labels)
    known = df[df.label >= 0]
    g = known.groupby(["label", "layer", "head"]).value
    assert stats.classes.tolist() == [0, 2, 5, 7]
    assert stats.counts.tolist() == [int((labels == c).sum()) for c in stats.classes]
    np.testing.assert_allclose(stats.mean.reshape(-1), g.mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats.std.reshape(-1), g.std(ddof=0).to_numpy(), rtol=1e-12, atol=1e-15)
    class_means = g.mean().unstack("label")
    want = class_means.max(axis=1) - known.groupby(["layer", "head"]).value.mean()
    np.testing.assert_allclose(class_specificity(values, labels).reshape(-1), want.to_numpy(), rtol=1e-12)
    at_least_2 = class_means.drop(columns=7).max(axis=1) - known.groupby(["layer", "head"]).value.mean()
    np.testing.assert_allclose(class_specificity(values, labels, min_images=2).reshape(-1), at_least_2.to_numpy(),
                               rtol=1e-12)


def test_class_statistics_bad_input():
    with pytest.raises(InputError, match="disagree"):
        class_statistics(np.zeros((3, 2, 2)), np.zeros(4, int))
    with pytest.raises(InputError, match="integer"):
        class_statistics(np.zeros((3, 2, 2)), np.zeros(3))
    with pytest.raises(InputError, match="min_images"):
        class_specificity(np.zeros((3, 2, 2)), np.array([0, 1, 2]), min_images=2)


# ---- the build: columns, consistency, and adding the labels to a run built without them -------

pytestmark = pytest.mark.usefixtures("one_thread")


def test_build_writes_labels_and_add_pattern_labels_restores_them(tiny, capsys):
    from analysis.errors import CacheError
    from analysis.metrics.patterns import PATTERN_METRICS, unpack_bits
    from analysis.runs import build, tables
    from analysis.runs.reader import open_run

    run_dir = tiny["root"] / "labels"
    build.build(tiny["config"]("labels"))
    run = open_run(run_dir)
    grid = tuple(run.model["grid"])
    bits = build.collect_parts(run_dir, run.manifest["dataset"]["n_images"])["patch_bits"]  # image_id order
    n, L, H = len(bits), run.L, run.H
    assert set(PATTERN_METRICS) <= set(run.manifest["metrics"])
    assert set(PATTERN_METRICS[:-1]) <= set(run.head_metrics.columns) and "consistency" in run.head_summary.columns
    for idx in [(0, 0, 0), (n - 1, L - 1, H - 1), (3, 5, 1)]:  # against the single-matrix reference
        single = pattern_scores(unpack_bits(bits[idx], grid[0] * grid[1]), grid)
        for k, v in single.items():
            got = run.dense(k)[idx]
            assert got == v if isinstance(v, str) else got == pytest.approx(v, rel=1e-6), k
    np.testing.assert_allclose(run.dense("consistency"), consistency(bits), rtol=1e-12)

    # the same run as if built before the labels existed: the reader says how to add them
    old = {m: run.dense(m) for m in run.manifest["metrics"]
           if m not in PATTERN_METRICS and m in run.head_metrics.columns}
    layouts = {k: run.layout(k).reshape(-1, 2) for k in ("cls", "patch")}
    tables.write_run(run_dir, {k: v for k, v in run.manifest.items() if k != "metrics"}, run.images, old,
                     L=L, H=H, layouts=layouts, skipped=run.skipped)
    before = open_run(run_dir)
    assert "pattern" not in before.head_metrics.columns and not set(PATTERN_METRICS) & set(before.metrics)
    with pytest.raises(CacheError, match="--add-pattern-labels"):
        before.dense("pattern")
    assert f"--out {run_dir} --add-pattern-labels" in before.lacks("consistency")

    from analysis.cli import build_main as build_cache

    assert build_cache(["--out", str(run_dir), "--add-pattern-labels"]) == 0
    assert "Added the pattern labels" in capsys.readouterr().out
    after = open_run(run_dir)
    assert after.lacks("pattern") is None
    for m in PATTERN_METRICS:
        a, b = after.dense(m), run.dense(m)
        assert (a == b).all() if a.dtype == object else np.allclose(a, b, equal_nan=True), m
    for m in old:  # nothing else changed
        np.testing.assert_array_equal(after.dense(m), old[m])
    np.testing.assert_array_equal(after.layout("patch"), run.layout("patch"))


def test_modal_labels():
    from analysis.metrics.patterns import modal_labels

    labels = np.array([[["vertical", "block"]], [["vertical", "mixed"]], [["mixed", None]], [["", ""]]],
                      dtype=object)  # [4, 1, 2]; None and "" are missing
    modal, share = modal_labels(labels)
    assert modal.tolist() == [["vertical", "block"]]  # head 1: block vs mixed tie -> alphabetically first
    np.testing.assert_allclose(share, [[2 / 3, 1 / 2]])
