"""Taylor (gradient) head importance and mean ablation against plain references.

References use only timm's own forward with a PyTorch pre-hook on ``attn.norm`` (an Identity in
these models) whose input is the concatenation of the head outputs ``A V`` [B, N, H*d] before W_O:
the hook gates or replaces head slices there, independently of HeadScope's adapter.
"""
import numpy as np
import pytest
import torch

from analysis import head_importance, load_vit
from analysis.errors import HeadScopeError
from analysis.metrics.taylor import gate_hook
from test_importance import cos_dist, jsd_bits, make_model


def head_slice_forward(model, images, edit):
    """timm forward with ``edit(layer, o [B, N, H, d]) -> o'`` applied to every block's head
    outputs; returns (logits or None, pooled)."""
    handles = []
    for layer, blk in enumerate(model.blocks):
        H = blk.attn.num_heads

        def pre(module, inputs, layer=layer, H=H):
            (x,) = inputs
            B, N, C = x.shape
            return (edit(layer, x.reshape(B, N, H, C // H)).reshape(B, N, C),)

        handles.append(blk.attn.norm.register_forward_pre_hook(pre))
    try:
        feats = model.forward_features(images)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats) if model.num_classes else None
    finally:
        for h in handles:
            h.remove()
    return logits, pooled


def plain_gradients(model, images, labels):
    """Autograd in float64 on the plain timm forward with gates g [B, L, H] on the head outputs:
    (dP(y)/dg, d log P(y)/dg), each [B, L, H]."""
    model = model.double()
    images = images.double()
    L, H = len(model.blocks), model.blocks[0].attn.num_heads
    g = torch.ones(images.shape[0], L, H, dtype=torch.float64, requires_grad=True)
    logits, _ = head_slice_forward(model, images, lambda l, o: o * g[:, l, None, :, None])
    logp = torch.log_softmax(logits, -1)[torch.arange(len(labels)), labels]
    (dlogp,) = torch.autograd.grad(logp.sum(), g)
    model.float()
    return logp.detach().exp()[:, None, None] * dlogp, dlogp


@pytest.mark.parametrize("variant", ["cls", "reg", "distilled"])
def test_taylor_equals_autograd_on_a_plain_forward(variant):
    model = make_model(variant)
    vit = load_vit(model)
    torch.manual_seed(20)
    B = 3
    images = torch.randn(B, 3, *vit.img_size)
    labels = torch.randint(0, vit.num_classes, (B,))
    df = head_importance(vit, images, labels, method="taylor", batch_size=2)
    assert list(df.columns) == ["image", "layer", "head", "taylor_prob_drop", "grad_score"]
    assert len(df) == B * vit.depth * vit.num_heads
    dp, dlogp = plain_gradients(model, images, labels)
    np.testing.assert_allclose(df.taylor_prob_drop.to_numpy(), dp.numpy().ravel(), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(df.grad_score.to_numpy(), dlogp.abs().numpy().ravel(), rtol=1e-3, atol=1e-6)
    assert (df.grad_score > 1e-5).mean() > 0.5  # the test model's gradients are not all vanishing


def test_taylor_equals_finite_differences_of_the_gate():
    model = make_model("reg")
    vit = load_vit(model)
    torch.manual_seed(21)
    images, labels = torch.randn(2, 3, *vit.img_size), torch.tensor([1, 3])
    df = head_importance(vit, images, labels, method="taylor").set_index(["image", "layer", "head"])
    eps = 1e-2

    def prob(layer, head, g_value):
        g = torch.ones(2, vit.depth, vit.num_heads)
        g[:, layer, head] = g_value
        with torch.no_grad():
            logits = vit.forward(images, head_hook=gate_hook(g))
        return torch.softmax(logits.double(), -1)[torch.arange(2), labels].numpy()

    for layer, head in [(0, 1), (1, 2), (2, 0)]:
        fd = (prob(layer, head, 1 + eps) - prob(layer, head, 1 - eps)) / (2 * eps)
        got = df.xs((layer, head), level=("layer", "head")).taylor_prob_drop.to_numpy()
        np.testing.assert_allclose(got, fd, rtol=2e-2, atol=2e-6)


@pytest.mark.parametrize("variant", ["cls", "reg"])
def test_gate_zero_is_exactly_mode_1(variant):
    vit = load_vit(make_model(variant))
    torch.manual_seed(22)
    images, labels = torch.randn(2, 3, *vit.img_size), torch.tensor([0, 2])
    exact = head_importance(vit, images, labels).set_index(["image", "layer", "head"])
    for layer, head in [(0, 0), (vit.depth - 1, 2)]:
        g = torch.ones(2, vit.depth, vit.num_heads)
        g[:, layer, head] = 0
        with torch.no_grad():
            gated = vit.forward(images, head_hook=gate_hook(g))
        assert torch.equal(gated, vit(images, prune=[(layer, head, 1)]))
        p = torch.softmax(gated.double(), -1)[torch.arange(2), labels].numpy()
        np.testing.assert_allclose(exact.xs((layer, head), level=("layer", "head")).prob.to_numpy(), p, rtol=1e-5)


@pytest.mark.parametrize("variant", ["cls", "reg", "backbone"])
def test_mean_ablation_equals_a_plain_loop(variant):
    model = make_model(variant)
    vit = load_vit(model)
    torch.manual_seed(23)
    B = 3
    images = torch.randn(B, 3, *vit.img_size)
    labels = torch.randint(0, vit.num_classes, (B,)) if vit.has_head else None
    df = head_importance(vit, images, labels, ablation="mean", batch_size=2)  # means over all 3 images
    assert list(df.columns) == ["image", "layer", "head", "prob", "prob_drop", "jsd", "emb_dist"]
    with torch.no_grad():
        outs = {}
        logits0, pooled0 = head_slice_forward(model, images, lambda l, o: outs.setdefault(l, o.clone()))
        means = {l: o.mean(0) for l, o in outs.items()}                      # [N, H, d]
        for layer in range(vit.depth):
            for head in range(vit.num_heads):
                def replace(l, o, layer=layer, head=head):
                    if l == layer:
                        o = o.clone()
                        o[:, :, head] = means[l][:, head]
                    return o

                logits, pooled = head_slice_forward(model, images, replace)
                got = df[(df.layer == layer) & (df["head"] == head)].sort_values("image")
                np.testing.assert_allclose(got.emb_dist, cos_dist(pooled0.double(), pooled.double()).numpy(),
                                           atol=3e-6, rtol=1e-4)
                if logits is None:
                    assert got[["prob", "prob_drop", "jsd"]].isna().all().all()
                    continue
                p0, p = torch.softmax(logits0.double(), -1), torch.softmax(logits.double(), -1)
                idx = torch.arange(B)
                np.testing.assert_allclose(got.prob, p[idx, labels].numpy(), atol=3e-6, rtol=1e-4)
                np.testing.assert_allclose(got.prob_drop, (p0 - p)[idx, labels].numpy(), atol=3e-6, rtol=1e-4)
                np.testing.assert_allclose(got.jsd, [jsd_bits(p0[i], p[i]) for i in idx], atol=3e-6, rtol=1e-3)
    assert (df.emb_dist > 1e-6).any()


def test_taylor_and_ablation_refuse_bad_input():
    backbone = load_vit(make_model("backbone"))
    images = torch.randn(2, 3, *backbone.img_size)
    with pytest.raises(HeadScopeError, match="backbone"):
        head_importance(backbone, images, None, method="taylor")
    vit = load_vit(make_model("cls"))
    images = torch.randn(2, 3, *vit.img_size)
    with pytest.raises(HeadScopeError, match="labels"):
        head_importance(vit, images, None, method="taylor")
    with pytest.raises(HeadScopeError, match="method"):
        head_importance(vit, images, [0, 1], method="shapley")
    with pytest.raises(HeadScopeError, match="ablation"):
        head_importance(vit, images, [0, 1], ablation="noise")
    with pytest.raises(HeadScopeError, match="zero ablation"):
        head_importance(vit, images, [0, 1], method="taylor", ablation="mean")


def test_taylor_works_inside_inference_mode():
    vit = load_vit(make_model("cls"))
    images, labels = torch.randn(2, 3, *vit.img_size), [1, 2]
    outside = head_importance(vit, images, labels, method="taylor")
    with torch.inference_mode():
        inside = head_importance(vit, torch.randn(2, 3, *vit.img_size) * 0 + images, labels, method="taylor")
    np.testing.assert_allclose(inside.grad_score, outside.grad_score, rtol=1e-6)
