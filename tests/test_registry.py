"""The metric registry: toy metrics registered here reach every layer (the build's tables, the run
reader, the Explorer's B1 / C1 choices, the Heads page and Help), and every registered metric
round-trips build -> tables -> reader -> the figure that shows it."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from analysis.datasets import open_image
from analysis.metrics import registry
from analysis.metrics.engine import analyse_batch
from analysis.metrics.registry import Metric, OnAttention, OnBatch, OnRun
from analysis.runs import build, schema
from analysis.runs.reader import open_run
from analysis.models.adapter import model_from_manifest
from conftest import TINY_IMAGES as N_IMAGES

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTIN = [m.name for m in registry.metrics()]  # collected before the toy metrics exist


# ---- toy metrics: one function + one entry each ---------------------------------------------------
def max_attention(vit, layer, A, batch):
    """Largest attention weight of each head: [B, H]."""
    return A.amax(dim=(-2, -1))


def cls_output_norm(vit, images, labels, batch):
    """Norm of each head's CLS output o[l, h][0] (A @ V before W_O), one forward with a head hook."""
    out = np.zeros((images.shape[0], vit.depth, vit.num_heads))

    def keep(layer, o):
        out[:, layer] = o[:, :, 0].norm(dim=-1).cpu().numpy()
        return o

    with torch.no_grad():
        vit.blocks(vit.embed(images), head_hook=keep)
    return {"cls_output_norm": out}


def cls_self_kind(vit, layer, A, batch):
    """A category: "self" where the CLS token keeps most of its attention, else "spread"."""
    return np.where((A[:, :, 0, 0] > 0.5).cpu().numpy(), "self", "spread")


TOYS = [
    Metric("max_attention", "max attention", meaning="the largest single attention weight of the head",
           formula=r"$\max_{u,v} A[u, v]$ (toy metric)", group="pattern", compute=OnAttention(max_attention)),
    Metric("cls_output_norm", "CLS output norm", important="high", group="importance",
           meaning="size of the head's CLS output", formula=r"$\lVert (A V)[0] \rVert$ (toy metric)",
           compute=OnBatch(cls_output_norm)),
    Metric("max_attention_peak", "peak max attention", level="head", group="pattern",
           meaning="the largest max attention over the run's images", formula="max over images (toy metric)",
           compute=OnRun(lambda arrays: np.nanmax(arrays["max_attention"], axis=0))),
    Metric("cls_self_kind", "CLS self-attention kind", value="category", summary=False, group="pattern",
           meaning="whether the CLS token mostly attends to itself", formula='"self" if $A[0, 0] > 0.5$ (toy metric)',
           compute=OnAttention(cls_self_kind)),
]


@pytest.fixture(scope="module")
def toy_run(tiny):
    """A tiny build with the toy metrics registered (removed again afterwards)."""
    for m in TOYS:
        registry.register_metric(m)
    try:
        every_stage = sorted({m.stage for m in registry.metrics() if m.stage})  # optional metrics too
        build.build(tiny["config"]("toy", stages=every_stage))
        yield open_run(tiny["root"] / "toy")
    finally:
        for m in TOYS:
            registry.unregister_metric(m.name)


@pytest.fixture(scope="module")
def reference(toy_run):
    """The run's images through the model again: (vit, x, labels, A [n, L, H, N, N]) in image_id order."""
    vit = model_from_manifest(toy_run.model)
    x = vit.preprocess([open_image(p) for p in toy_run.images.path])
    labels = torch.tensor(toy_run.images.label.to_numpy())
    return vit, x, labels, vit.capture_attention(x)


@pytest.fixture
def pages(toy_run):
    """The page modules, with the app configured on the toy run (conftest resets it after each test)."""
    from app import create_app

    create_app(toy_run.path.parent, toy_run.name)
    return {name: sys.modules[f"app.pages.{name}"] for name in ("explorer", "heads", "help")}


def help_text(pages) -> str:
    return pages["help"].layout().children[0].children


def test_toy_metrics_reach_tables_reader_explorer_heads_and_help(toy_run, reference, pages):
    vit, x, _, A = reference
    n, L, H = N_IMAGES, vit.depth, vit.num_heads
    expected = A.amax(dim=(-2, -1)).numpy()                                  # [n, L, H]
    hm, hs = toy_run.head_metrics, toy_run.head_summary
    np.testing.assert_allclose(hm.max_attention.to_numpy().reshape(n, L, H), expected, rtol=1e-5)
    assert {"max_attention_mean", "max_attention_std", "cls_output_norm_mean", "max_attention_peak"} <= set(hs.columns)
    np.testing.assert_allclose(hs.max_attention_std.to_numpy(), expected.reshape(n, -1).std(0, ddof=0), rtol=1e-4)
    assert {"max_attention", "cls_output_norm", "max_attention_peak", "cls_self_kind"} <= set(toy_run.manifest["metrics"])
    kinds = np.where(A[:, :, :, 0, 0].numpy() > 0.5, "self", "spread")
    assert (hm.cls_self_kind.to_numpy().reshape(n, L, H) == kinds).all()
    assert (toy_run.dense("cls_self_kind") == kinds).all() and "cls_self_kind_mean" not in hs.columns
    # the reader: dense arrays, the run-level metric per head
    np.testing.assert_allclose(toy_run.dense("max_attention"), expected, rtol=1e-5)
    np.testing.assert_allclose(toy_run.dense("max_attention_peak"), expected.max(0), rtol=1e-5)
    with torch.no_grad():  # reference: explicit A @ V of every head from the block inputs
        norms = np.stack([torch.stack([(A[:, l, h] @ vit.attention_parts(l, x_l)[1][:, h])[:, 0].norm(dim=-1)
                                       for h in range(H)], 1).numpy() for l, x_l in enumerate(_block_inputs(vit, x))], 1)
    np.testing.assert_allclose(toy_run.dense("cls_output_norm"), norms, rtol=1e-4)
    # the Explorer: B1 offers the importance, C1 the property; both draw it
    from app.explorer import header, importance, strength

    sel = {"run": toy_run.name, "image": 2, "layer": 1, "head": 0}
    b1_options, _ = header.metric_options(None, sel)
    c1_options, _ = strength.c1_choices(sel)
    assert "cls_output_norm" in [o["value"] for o in b1_options]
    assert "max_attention" in [o["value"] for o in c1_options] and "max_attention" not in [o["value"] for o in b1_options]
    b1 = importance.view_b1(None, None, None, None, None, [], {**sel, "metric": "cls_output_norm"})
    np.testing.assert_allclose(b1["data"][3]["y"], norms[2].ravel(), rtol=1e-4)
    c1 = strength.view_c(None, None, None, "max_attention", sel)[0]
    np.testing.assert_allclose(c1["data"][0]["y"], expected[2].ravel(), rtol=1e-5)
    assert c1["layout"]["yaxis"]["title"]["text"] == "max attention"
    # the Heads page ranks all three; Help explains them
    options, _ = pages["heads"].heads_metric(sel, None)
    assert {"max_attention", "cls_output_norm", "max_attention_peak"} <= {o["value"] for o in options}
    assert "cls_self_kind" not in {o["value"] for o in options + c1_options}  # no mean to rank or plot
    c1 = strength.view_c(None, None, None, "max_attention_peak", sel)[0]  # a run-level metric reaches the Explorer too
    np.testing.assert_allclose(c1["data"][0]["y"], expected.max(0).ravel(), rtol=1e-5)
    fig, _, _ = pages["heads"].heads_view(sel, "max_attention_peak")
    np.testing.assert_allclose(np.array(fig["data"][0]["z"], float), expected.max(0), rtol=1e-5)
    text = help_text(pages)
    for m in TOYS:
        assert f"**{m.name}**" in text and m.formula in text


@torch.no_grad()
def _block_inputs(vit, x):
    xs, h = [], vit.embed(x)
    for layer in range(vit.depth):
        xs.append(h)
        h = vit.block(layer, h)
    return xs


def test_registration_refuses_bad_declarations():
    entry = dict(label="x", meaning="x", formula="x", compute=OnAttention(max_attention))
    with pytest.raises(ValueError, match="already registered"):
        registry.register_metric(Metric("prob", **entry))
    with pytest.raises(ValueError, match="fixed column"):
        registry.register_metric(Metric("cls_x", **entry))
    with pytest.raises(ValueError, match="OnRun"):
        Metric("per_head", level="head", **entry)
    with pytest.raises(ValueError, match="scalar"):
        Metric("vec_importance", value="vector", important="high", **entry)
    with pytest.raises(KeyError, match="No metric"):
        registry.get_metric("no_such_metric")


@pytest.mark.parametrize("name", BUILTIN)
def test_every_metric_round_trips_to_its_figure(name, toy_run, reference, pages):
    """build -> tables -> reader -> figure, against the engine's values for the same images."""
    vit, x, labels, _ = reference
    m = registry.get_metric(name)
    dense = toy_run.dense(name)
    if m.level == "image_head":
        engine = analyse_batch(vit, x, labels, metrics=[name], patterns=False)[name]  # [n, L, H(, K)]
        assert name in toy_run.head_metrics.columns and name in schema.head_columns()
        assert dense.shape == engine.shape
        if m.value == "category":
            assert (dense == engine).all()
        else:
            np.testing.assert_allclose(dense, engine, rtol=1e-4, atol=1e-6, equal_nan=True)
    else:  # its hook on the engine's arrays of all images (metrics and patch bits)
        assert dense.shape == (vit.depth, vit.num_heads)
        if m.stage:  # a staged run-level metric (ablation_shift): its hook on the run's own per-image arrays
            arrays = {k: toy_run.dense(k) for k in toy_run.metrics if registry.get_metric(k).level == "image_head"}
        else:        # consistency needs the engine's patch bits
            arrays = dict(analyse_batch(vit, x, labels))
        expected = np.asarray(m.compute.fn(arrays)).reshape(dense.shape)
        np.testing.assert_allclose(dense, expected, rtol=1e-4 if m.stage else 1e-6, atol=1e-7 if m.stage else 0,
                                   equal_nan=True)  # staged: recomputed from the float32 columns
    if m.value == "category":  # labels, not numbers: the Heads page shows each head's modal label
        assert f"**{name}**" in help_text(pages)
        return
    if "classifier" not in m.applies_to:  # a backbone's metric (direct_emb): the toy classifier has no value
        assert np.isnan(dense).all() and name not in toy_run.metrics and f"**{name}**" in help_text(pages)
        return
    pos, (layer, head) = 3, (2, 1)
    sel = {"run": toy_run.name, "image": int(toy_run.images.image_id[pos]), "layer": layer, "head": head}
    from app.explorer import header, importance, strength

    if m.value == "vector":
        c2 = strength.view_c(None, None, None, "strength_entropy", sel)[1]
        np.testing.assert_allclose(c2["data"][0]["y"], dense[pos, layer, head], rtol=1e-6)
        return
    if m.is_importance:
        assert name in [o["value"] for o in header.metric_options(None, sel)[0]]
        fig = importance.view_b1(None, None, None, None, None, [], {**sel, "metric": name})
        np.testing.assert_allclose(fig["data"][3]["y"], dense[pos].ravel(), rtol=1e-6)
        assert fig["layout"]["yaxis"]["title"]["text"] == m.title
    else:
        assert name in [o["value"] for o in strength.c1_choices(sel)[0]]
        c1, _, c3, _ = strength.view_c(None, None, None, name, sel)
        np.testing.assert_allclose(c1["data"][0]["y"], (dense[pos] if m.level == "image_head" else dense).ravel(),
                                   rtol=1e-6)
        if m.level == "image_head":
            assert c3["layout"]["shapes"][0]["x0"] == pytest.approx(float(dense[pos, layer, head]))
    heads_fig, _, _ = pages["heads"].heads_view(sel, name)
    expected = np.nanmean(dense, axis=0) if m.level == "image_head" else dense
    np.testing.assert_allclose(np.array(heads_fig["data"][0]["z"], float), expected, rtol=1e-5)
    assert f"**{name}**" in help_text(pages)
