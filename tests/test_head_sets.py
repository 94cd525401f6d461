"""Head sets, pair interactions and pruning curves against a plain loop: one timm forward per
set, every head of the set pruned by a hook on its block's post-softmax attention."""
import numpy as np
import pandas as pd
import pytest
import torch

from analysis import (curve_area, exact_order, head_importance, heads_before_drop, load_vit, pair_interactions,
                      pruning_curve, pruning_curves, random_order, set_metrics, set_pruning, taylor_order)
from analysis.errors import HeadScopeError
from analysis.models.pruning import keep_mask
from test_importance import cos_dist, jsd_bits, make_model


def reference_set(model, images, heads):
    """timm forward with every (layer, head, regions) of ``heads`` pruned: (logp or None, pooled)."""
    T = model.num_prefix_tokens
    by_layer = {}
    for layer, head, regions in heads:
        by_layer.setdefault(layer, []).append((head, regions))
    handles = []
    for layer, items in by_layer.items():
        def prune(module, inputs, output, items=items):
            A = output.clone()
            for head, regions in items:
                A[:, head] = A[:, head] * keep_mask(regions, A.shape[-1], T)
            return A

        model.blocks[layer].attn.fused_attn = False
        handles.append(model.blocks[layer].attn.attn_drop.register_forward_hook(prune))
    try:
        with torch.no_grad():
            feats = model.forward_features(images)
            pooled = model.forward_head(feats, pre_logits=True).double()
            logits = model.forward_head(feats) if model.num_classes else None
    finally:
        for h in handles:
            h.remove()
    return (None if logits is None else torch.log_softmax(logits.double(), -1)), pooled


SETS = [[(0, 1, 1)], [(0, 1, 1), (2, 0, "R1")], [(1, 0, "R2+R3"), (1, 2, 1), (2, 1, "R3"), (0, 0, "R2")],
        [(2, h, 1) for h in range(3)]]


@pytest.mark.parametrize("variant", ["cls", "reg", "distilled", "backbone"])
def test_set_metrics_equal_a_full_forward_with_the_set_pruned(variant):
    model = make_model(variant)
    vit = load_vit(model)
    torch.manual_seed(30)
    image = torch.randn(1, 3, *vit.img_size)
    label = 2 if vit.has_head else None
    df = set_metrics(vit, image[0], label, SETS)
    assert len(df) == len(SETS)
    logp0, pooled0 = reference_set(model, image, [])
    for i, heads in enumerate(SETS):
        logp, pooled = reference_set(model, image, heads)
        row = df.iloc[i]
        assert row.emb_dist == pytest.approx(float(cos_dist(pooled0, pooled)[0]), abs=3e-6, rel=1e-4)
        if logp is None:
            assert np.isnan(row.prob) and np.isnan(row.jsd) and row.top5_classes == []
            continue
        p0, p = logp0.exp()[0], logp.exp()[0]
        assert row.prob == pytest.approx(float(p[label]), abs=3e-6, rel=1e-4)
        assert row.prob_drop == pytest.approx(float(p0[label] - p[label]), abs=3e-6, rel=1e-4)
        assert row.jsd == pytest.approx(jsd_bits(p0, p), abs=3e-6, rel=1e-3)
        assert row.top5_classes == p.topk(5).indices.tolist()
        np.testing.assert_allclose(row.top5_probs, p.topk(5).values.numpy(), rtol=1e-4)
    single = set_pruning(vit, image[0], label, SETS[1])
    assert single["heads"] == [[0, 1, "R1+R2+R3"], [2, 0, "R1"]]
    assert single["emb_dist"] == pytest.approx(df.iloc[1].emb_dist, abs=3e-6, rel=1e-4)  # 1 - cos in float32
    assert (df.emb_dist > 1e-6).all()


@pytest.mark.parametrize("variant", ["reg", "backbone"])
def test_pair_interactions_from_the_plain_loop(variant):
    model = make_model(variant)
    vit = load_vit(model)
    torch.manual_seed(31)
    image = torch.randn(1, 3, *vit.img_size)
    label, metric = (3, "prob_drop") if vit.has_head else (None, "emb_dist")
    heads = [(0, 1), (1, 2), (2, 0), (2, 2)]
    df = pair_interactions(vit, image[0], label, heads, metric=metric)
    assert list(df.columns) == ["a_layer", "a_head", "b_layer", "b_head", "single_a", "single_b", "pair", "interaction"]
    assert len(df) == 6
    logp0, pooled0 = reference_set(model, image, [])

    def m(hs):
        logp, pooled = reference_set(model, image, [(l, h, 1) for l, h in hs])
        if metric == "emb_dist":
            return float(cos_dist(pooled0, pooled)[0])
        return float(logp0[0, label].exp() - logp[0, label].exp())

    for row in df.itertuples():
        a, b = (row.a_layer, row.a_head), (row.b_layer, row.b_head)
        assert heads.index(a) < heads.index(b)
        ma, mb, mab = m([a]), m([b]), m([a, b])
        assert row.single_a == pytest.approx(ma, abs=3e-6, rel=1e-4)
        assert row.single_b == pytest.approx(mb, abs=3e-6, rel=1e-4)
        assert row.pair == pytest.approx(mab, abs=3e-6, rel=1e-4)
        assert row.interaction == pytest.approx(mab - ma - mb, abs=1e-5)


@pytest.mark.parametrize("variant", ["cls", "backbone"])
def test_pruning_curve_against_the_plain_loop(variant):
    model = make_model(variant)
    vit = load_vit(model)
    torch.manual_seed(32)
    B, LH = 5, vit.depth * vit.num_heads
    images = torch.randn(B, 3, *vit.img_size)
    labels = torch.randint(0, vit.num_classes, (B,)) if vit.has_head else None
    order = random_order(vit.depth, vit.num_heads, seed=4)
    steps = [0, 1, 5, LH - 1, LH]
    curve = pruning_curve(vit, images, labels, order, steps=steps, batch_size=2)
    assert list(curve.k) == steps
    logp0, pooled0 = reference_set(model, images, [])
    for row in curve.itertuples():
        logp, pooled = reference_set(model, images, [(l, h, 1) for l, h in order[:row.k]])
        if vit.has_head:
            assert list(curve.columns) == ["k", "accuracy", "mean_prob"]
            assert row.accuracy == pytest.approx(float((logp.argmax(-1) == labels).double().mean()))
            assert row.mean_prob == pytest.approx(float(logp.exp()[torch.arange(B), labels].mean()), abs=3e-6, rel=1e-4)
        else:
            assert list(curve.columns) == ["k", "mean_emb_dist"]
            assert row.mean_emb_dist == pytest.approx(float(cos_dist(pooled0, pooled).mean()), abs=3e-6, rel=1e-4)
    # k = 0 is the unpruned model, k = L*H the model with every head pruned
    every = [(l, h, 1) for l in range(vit.depth) for h in range(vit.num_heads)]
    if vit.has_head:
        with torch.no_grad():
            assert curve.accuracy.iloc[0] == float((vit(images).argmax(-1) == labels).double().mean())
            all_pruned = vit(images, prune=every)
        assert curve.mean_prob.iloc[-1] == pytest.approx(
            float(torch.softmax(all_pruned.double(), -1)[torch.arange(B), labels].mean()), rel=1e-5)
    else:
        assert curve.mean_emb_dist.iloc[0] == pytest.approx(0, abs=1e-9)


def test_orders_follow_spec_and_curves_share_sets():
    vit = load_vit(make_model("cls"))
    L, H = vit.depth, vit.num_heads
    torch.manual_seed(33)
    images, labels = torch.randn(4, 3, *vit.img_size), torch.tensor([0, 1, 2, 3])
    exact = head_importance(vit, images, labels)
    taylor = head_importance(vit, images, labels, method="taylor")
    for order, df, col in [(exact_order(exact, L, H), exact, "prob_drop"), (taylor_order(taylor, L, H), taylor, "grad_score")]:
        assert sorted(order) == [(l, h) for l in range(L) for h in range(H)]
        means = df.groupby(["layer", "head"])[col].mean()
        values = [means[(l, h)] for l, h in order]
        assert values == sorted(values)  # ascending run mean: least important first
    backbone = load_vit(make_model("backbone"))
    bb = head_importance(backbone, torch.randn(2, 3, *backbone.img_size))
    means = bb.groupby(["layer", "head"]).emb_dist.mean()
    values = [means[o] for o in exact_order(bb, backbone.depth, backbone.num_heads)]
    assert values == sorted(values)
    r0, r1 = random_order(L, H, 0), random_order(L, H, 1)
    assert r0 == random_order(L, H, 0) and r0 != r1 and sorted(r0) == sorted(r1) == sorted(exact_order(exact, L, H))
    curves = pruning_curves(vit, images, labels, {"exact": exact_order(exact, L, H), "random": r0}, steps=[0, 6, L * H])
    first = curves.groupby("k").accuracy.agg(["min", "max"])
    assert first.loc[0, "min"] == first.loc[0, "max"] and first.loc[L * H, "min"] == first.loc[L * H, "max"]
    alone = pruning_curve(vit, images, labels, r0, steps=[0, 6, L * H])
    pd.testing.assert_frame_equal(curves[curves.order == "random"].drop(columns="order").reset_index(drop=True), alone)


def test_curve_area_and_heads_before_drop():
    curve = pd.DataFrame({"k": [0, 6, 12, 24], "accuracy": [0.90, 0.895, 0.88, 0.10]})
    assert curve_area(curve, "accuracy", 24) == pytest.approx(
        (0.90 + 0.895) / 2 * 0.25 + (0.895 + 0.88) / 2 * 0.25 + (0.88 + 0.10) / 2 * 0.5)
    assert heads_before_drop(curve) == 6
    assert heads_before_drop(curve, drop=0.05) == 12
    flat = pd.DataFrame({"k": [0, 12], "accuracy": [0.5, 0.5]})
    assert curve_area(flat, "accuracy", 12) == pytest.approx(0.5) and heads_before_drop(flat) == 12


def test_head_sets_refuse_bad_input():
    vit = load_vit(make_model("cls"))
    image = torch.randn(3, *vit.img_size)
    images = torch.randn(2, 3, *vit.img_size)
    cases = [
        (lambda: set_pruning(vit, image, 1, [(4, 0)]), "does not exist"),
        (lambda: set_pruning(vit, image, 1, [(0, 3)]), "does not exist"),
        (lambda: set_pruning(vit, image, 1, []), "empty"),
        (lambda: set_pruning(vit, image, 1, [(0, 0)] * 65), "at most 64"),
        (lambda: set_pruning(vit, image, 1, [(0, 0, "R4")]), "region"),
        (lambda: pair_interactions(vit, image, 1, [(0, 0)]), "at least two"),
        (lambda: pair_interactions(vit, image, 1, [(0, 0), (0, 0)]), "distinct"),
        (lambda: pair_interactions(vit, image, None, [(0, 0), (1, 0)]), "label"),
        (lambda: pair_interactions(vit, image, 1, [(0, 0), (1, 0)], metric="jsd"), "metric"),
        (lambda: pruning_curve(vit, images, None, random_order(4, 3, 0)), "labels"),
        (lambda: pruning_curve(vit, images, [0, 1], [(0, 0), (0, 0)]), "twice"),
        (lambda: pruning_curve(vit, images, [0, 1], [(0, 0)], steps=[0, 2]), "Steps"),
    ]
    for call, match in cases:
        with pytest.raises(HeadScopeError, match=match):
            call()
    backbone = load_vit(make_model("backbone"))
    with pytest.raises(HeadScopeError, match="emb_dist"):
        pair_interactions(backbone, torch.randn(3, *backbone.img_size), None, [(0, 0), (1, 0)])


def test_api_answers_head_sets_and_pair_interactions(tmp_path, monkeypatch):
    from analysis.serving import transport as online
    from analysis.serving.service import ModelService
    from app.server import create_app
    from analysis.runs.synthetic import make_run

    monkeypatch.delenv("HEADSCOPE_BROKER_URL", raising=False)
    run = make_run(tmp_path / "tiny", n_images=3, model="test_vit", img_size=32)
    client = create_app(tmp_path, "tiny").server.test_client()
    service = ModelService()
    vit = service.vit(run)
    image, label = service.image(run, 1)
    r = client.get("/api/head_set?run=tiny&image=1&heads=0:1,1:0:R2")
    assert r.status_code == 200, r.json
    direct = set_pruning(vit, image, label, [(0, 1), (1, 0, "R2")])
    assert r.json["emb_dist"] == pytest.approx(direct["emb_dist"]) and r.json["top5_classes"] == direct["top5_classes"]
    assert r.json == online.head_set(run, 1, [(0, 1), (1, 0, "R2")])
    r = client.get("/api/pair_interactions?run=tiny&image=1&heads=0:0,0:1,1:1&metric=emb_dist")
    assert r.status_code == 200 and len(r.json["rows"]) == 3
    want = pair_interactions(vit, image, label, [(0, 0), (0, 1), (1, 1)], metric="emb_dist")
    np.testing.assert_allclose([row["interaction"] for row in r.json["rows"]], want.interaction, rtol=1e-6)
    for url, text in (("/api/head_set?run=tiny&image=1&heads=", "empty"),
                      ("/api/head_set?run=tiny&image=1&heads=9:0", "does not exist"),
                      ("/api/head_set?run=tiny&image=1&heads=0-1", "Bad head"),
                      ("/api/head_set?run=tiny&heads=0:1", "Missing parameter 'image'"),
                      ("/api/pair_interactions?run=tiny&image=1&heads=0:0,0:1&metric=jsd", "metric")):
        r = client.get(url)
        assert r.status_code == 400 and text in r.json["error"], (url, r.json)
