"""Compare page helpers on runs written by the run writer, against plain pandas references."""
import json

import numpy as np
import pandas as pd
import pytest


from analysis.runs.synthetic import make_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for name, seed in (("a", 0), ("b", 1)):
        make_run(root / name, n_images=12, layers=3, heads=4, grid=4, n_classes=3, seed=seed)
    from app import create_app

    create_app(root, "a")
    return root


@pytest.fixture
def indexes(runs):
    """(root, index a, index b) with the app configured on the runs (conftest resets it after each test)."""
    from app import config, data

    config.configure(runs, "a")
    return runs, data.get_index("a"), data.get_index("b")


def test_layer_profile_matches_pandas(indexes):
    from app.pages.compare import layer_profile

    root, a, _ = indexes
    hs = pd.read_parquet(root / "a" / "head_summary.parquet")
    g = hs.groupby("layer")["strength_entropy_mean"]
    mu, sd = layer_profile(a, "strength_entropy")
    np.testing.assert_allclose(mu, g.mean().to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(sd, g.std(ddof=0).to_numpy(), rtol=1e-6)


def test_head_ranks():
    from app.pages.compare import head_ranks

    v = np.array([0.2, np.nan, 0.9, 0.5])
    assert head_ranks(v, low_is_high=False).tolist() == [3, 4, 1, 2]
    assert head_ranks(v, low_is_high=True).tolist() == [1, 4, 3, 2]


def test_matched_images_by_path_then_fingerprint(indexes):
    from app import data
    from app.pages.compare import matched_images

    root, a, b = indexes
    assert matched_images(a, b) is None  # other image files, no fingerprint
    for name in ("a", "b"):
        mf = json.loads((root / name / "manifest.json").read_text())
        mf["dataset"]["fingerprint"] = "same"
        (root / name / "manifest.json").write_text(json.dumps(mf))
    ia, ib, how = matched_images(data.get_index("a"), data.get_index("b"))
    assert "fingerprint" in how and ia.tolist() == ib.tolist() == list(range(12))


def test_heads_page_pattern_table_and_class_view(indexes):
    import sys as _sys

    from analysis.metrics.classes import class_specificity
    from analysis.metrics.patterns import modal_labels
    from app.pages import heads  # noqa: F401  (registered by create_app)

    root, a, _ = indexes
    page = _sys.modules["app.pages.heads"]
    table = page.heads_patterns({"run": "a"})[1]
    modal, share = modal_labels(a.run.dense("pattern"))
    assert [r["label"] for r in table.data] == modal.ravel().tolist()
    np.testing.assert_allclose([r["share"] for r in table.data], share.ravel(), atol=1e-4)
    assert table.sort_action == "native"
    fig, spec_table, _ = page.heads_class_view({"run": "a"}, "prob_drop", "all")
    hm = pd.read_parquet(root / "a" / "head_metrics.parquet").merge(a.images[["image_id", "label"]], on="image_id")
    want = hm.groupby(["label", "layer", "head"]).prob_drop.mean().unstack(["layer", "head"]).to_numpy()
    np.testing.assert_allclose(np.array(fig["data"][0]["z"], float), want, rtol=1e-5)
    spec = class_specificity(a.run.dense("prob_drop"), a.images.label.to_numpy())
    first = spec_table[1].children[1].children[0].children  # rank 1 row: rank, layer, head, class, value
    assert (first[1].children, first[2].children) == np.unravel_index(np.nanargmax(spec), spec.shape)
