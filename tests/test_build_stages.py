"""Build stages beyond the paper on the tiny folder set: Taylor, mean ablation, pruning curves
(resumable), the Taylor agreement, taylor-only runs and refusals."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import head_importance, pruning_curves, random_order
from analysis.datasets import open_image
from analysis.errors import HeadScopeError
from analysis.metrics.taylor import taylor_agreement
from analysis.runs import build
from analysis.runs.reader import open_run
from analysis.models.adapter import model_from_manifest
from conftest import EXTRA_STAGES as STAGES, TINY_IMAGES as N_IMAGES

pytestmark = pytest.mark.usefixtures("one_thread")


def run_inputs(run):
    vit = model_from_manifest(run.model)
    images = run.images
    x = vit.preprocess([open_image(p) for p in images.path])
    return vit, x, torch.tensor(images.label.to_numpy())


def test_taylor_and_mean_ablation_columns_equal_the_api(extra_run):
    vit, x, labels = run_inputs(extra_run)
    hm = extra_run.head_metrics
    for m in ("taylor_prob_drop", "grad_score", "mean_prob", "mean_prob_drop", "mean_jsd", "mean_emb_dist",
              "ablation_shift"):
        assert m in extra_run.metrics, m
    taylor = head_importance(vit, x, labels, method="taylor")
    mean = head_importance(vit, x, labels, ablation="mean")  # means over the run's 12 readable images
    for ref, names in ((taylor, ("taylor_prob_drop", "grad_score")), (mean, ("prob", "prob_drop", "jsd", "emb_dist"))):
        for name in names:
            col = name if name in ("taylor_prob_drop", "grad_score") else f"mean_{name}"
            np.testing.assert_allclose(hm[col].to_numpy(np.float64), ref[name].to_numpy(), rtol=2e-4, atol=1e-6,
                                       err_msg=col)
    shift = (hm.mean_prob_drop - hm.prob_drop).groupby([hm.layer, hm["head"]]).mean().to_numpy()
    np.testing.assert_allclose(extra_run.head_summary.ablation_shift.to_numpy(), shift, rtol=1e-4, atol=1e-7)
    mf = extra_run.manifest
    assert mf["importance"] == {"exact": True, "taylor": True, "mean_ablation": True, "note": None}
    shape = (N_IMAGES, vit.depth, vit.num_heads)
    expected = taylor_agreement(hm.prob_drop.to_numpy(np.float64).reshape(shape),
                                hm.taylor_prob_drop.to_numpy(np.float64).reshape(shape))
    assert mf["taylor_agreement"]["taylor_prob_drop"] == pytest.approx(expected)
    assert mf["taylor_agreement"]["taylor_prob_drop"]["images"] == N_IMAGES


def test_curves_table_equals_the_api_and_resumes(extra_run, tiny):
    vit, x, labels = run_inputs(extra_run)
    curves = pd.read_parquet(extra_run.path / "pruning_curves.parquet")
    entry = extra_run.manifest["pruning_curves"]
    L, H = vit.depth, vit.num_heads
    assert entry["images"] == 6 and set(entry["orders"]) == {"exact", "taylor", "random"}
    assert entry["orders"]["random"]["seeds"] == [0, 1, 2]
    assert list(curves.columns) == ["order", "seed", "k", "accuracy", "mean_prob", "mean_emb_dist"]
    assert curves.groupby(["order", "seed"], dropna=False).size().tolist() == [len(entry["steps"])] * 5
    hm = extra_run.head_metrics
    exact_means = hm.groupby(["layer", "head"]).prob_drop.mean().to_numpy().reshape(L, H)
    from analysis import order_by

    orders = {"exact": order_by(exact_means), "random_1": random_order(L, H, 1)}
    ref = pruning_curves(vit, x[:6], labels[:6], orders, entry["steps"])
    for name, order, seed in (("exact", "exact", None), ("random_1", "random", 1)):
        got = curves[(curves.order == order) & (curves.seed.isna() if seed is None else curves.seed == seed)]
        want = ref[ref.order == name]
        np.testing.assert_allclose(got.accuracy, want.accuracy, atol=1e-12)
        np.testing.assert_allclose(got.mean_prob, want.mean_prob, rtol=1e-5)
    first = curves[curves.k == 0]
    assert first.accuracy.nunique() == 1 and first.mean_prob.nunique() == 1
    # resume: a lost batch file is recomputed, the finished one reused; the table is the same
    parts = sorted((extra_run.path / "parts").glob("curves_*.json"))
    assert len(parts) == 2  # 6 images in batches of 5
    kept = parts[0].stat().st_mtime_ns
    parts[1].unlink()
    build.build(tiny["config"]("extra", stages=STAGES, curve_images=6), merge_only=True)
    assert parts[0].stat().st_mtime_ns == kept and parts[1].is_file()
    pd.testing.assert_frame_equal(pd.read_parquet(extra_run.path / "pruning_curves.parquet"), curves)
    assert "pruning_curves" in json.loads((extra_run.path / "manifest.json").read_text())["timings"]


def test_taylor_only_run_says_so(tiny):
    manifest = build.build(tiny["config"]("taylor-only", stages=["taylor_only"], limit=5))
    run = open_run(tiny["root"] / "taylor-only")
    assert manifest["importance"]["exact"] is False and "approximate" in manifest["importance"]["note"]
    assert "taylor_prob_drop" in run.metrics and "grad_score" in run.metrics
    assert not {"prob", "prob_drop", "jsd", "emb_dist"} & set(run.metrics)
    assert run.images.prob.notna().all() and (run.images.pred >= 0).all()  # probs from the Taylor pass
    assert manifest["params"]["stages"] == ["taylor", "taylor_only"]
    lines = "\n".join(build.summary_lines(manifest))
    assert "images analysed" in lines


def test_stages_are_refused_where_they_cannot_work(tiny):
    with pytest.raises(HeadScopeError, match="Unknown build stage"):
        tiny["config"]("bad", stages=["shapley"]).validate()
    with pytest.raises(HeadScopeError, match="curve-images"):
        tiny["config"]("bad", stages=["curves"], curve_images=0).validate()
    root = tiny["root"]
    loose = root / "loose"
    loose.mkdir()
    for p in sorted((root / "images" / "a").glob("*.png"))[:2]:
        (loose / p.name).write_bytes(p.read_bytes())  # loose files: no labels
    with pytest.raises(HeadScopeError, match="labels"):
        build.prepare(tiny["config"]("unlabelled", dataset=str(loose), stages=["curves"]))


def test_taylor_stage_refuses_a_backbone():
    from analysis import load_vit
    from analysis.runs.head_stages import check_model
    from test_importance import make_model

    with pytest.raises(HeadScopeError, match="backbone"):
        check_model(["taylor"], load_vit(make_model("backbone")), [0, 1])


def test_curves_page_shows_the_run_curves(extra_run):
    import sys

    from app import create_app

    create_app(extra_run.path.parent, extra_run.name)
    page = sys.modules["app.pages.curves"]
    sel = {"run": extra_run.name}
    options, value = page.curves_metric(sel)
    assert value == "accuracy" and [o["value"] for o in options] == ["accuracy", "mean_prob"]
    fig, table, msg = page.curves_view(sel, "mean_prob")
    assert msg is None
    names = [t.get("name") for t in fig["data"]]
    assert names == ["exact (leave-one-out)", "taylor (approximate)", "random range", "random"]
    curves = pd.read_parquet(extra_run.path / "pruning_curves.parquet")
    exact = curves[curves.order == "exact"]
    np.testing.assert_allclose(fig["data"][0]["y"], exact.mean_prob, rtol=1e-9)
    rows = table[0].children[1].children
    entry = extra_run.manifest["pruning_curves"]["orders"]
    assert rows[0].children[1].children == f"{entry['exact']['area_mean_prob']['mean']:.3f}"
    assert rows[2].children[2].children.startswith(f"{entry['random']['heads_before_1pt_drop']['mean']:.0f} (")
    # a run without curves says how to get them
    fig, _, msg = page.curves_view({"run": "no-such-run"}, "accuracy")
    assert msg is not None
