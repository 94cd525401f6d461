"""The exact engine against a plain reference: one full timm forward per pruned head.

The reference uses only timm's own forward (fused attention off) with a PyTorch forward hook on
``attn.attn_drop`` (whose input is the post-softmax pattern) to prune, and a hook on ``attn`` to
read z[l]. Metrics are recomputed here from their SPEC formulas, independently of the engine.
"""
import math

import numpy as np
import pytest
import timm
import torch

from analysis import MODES, head_importance, load_vit, partial_pruning
from analysis.models.pruning import keep_mask


def make_model(variant: str) -> torch.nn.Module:
    """Small random ViTs with peaky attention (q/k weights scaled up)."""
    torch.manual_seed({"cls": 0, "reg": 1, "distilled": 2, "layerscale": 3, "backbone": 4}[variant])
    if variant == "cls":
        m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=7)
    elif variant == "reg":  # CLS + 4 register tokens, no class embedding in pos_embed
        m = timm.create_model("vit_tiny_patch16_224", img_size=48, depth=3, num_classes=5, reg_tokens=4,
                              no_embed_class=True)
    elif variant == "distilled":  # CLS + distillation token, two heads averaged
        m = timm.create_model("deit_tiny_distilled_patch16_224", img_size=48, depth=3, num_classes=6)
    elif variant == "layerscale":  # DINOv2-style layer scale, patch 14
        m = timm.create_model("vit_small_patch14_dinov2", img_size=56, depth=2, num_classes=4)
    else:
        m = timm.create_model("vit_tiny_patch16_224", img_size=48, depth=3, num_classes=0)
    with torch.no_grad():
        for blk in m.blocks:
            C = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * C] *= 4.0  # q and k rows
        for name, p in m.named_parameters():
            if name.endswith("ls1.gamma") or name.endswith("ls2.gamma"):
                p.fill_(0.5)
            if name in ("cls_token", "reg_token", "dist_token"):
                p.normal_()
    return m.eval()


def reference(model, images, labels, layer, head, regions):
    """One timm forward with (layer, head, regions) pruned: (logp [B,C] or None, pooled [B,D], z_l [B,N,C])."""
    T = model.num_prefix_tokens
    store = {}

    def prune(module, inputs, output):
        A = output.clone()
        if regions is not None:
            N = A.shape[-1]
            A[:, head] = A[:, head] * keep_mask(regions, N, T)
        return A

    def grab(module, inputs, output):
        store["z"] = output.detach().clone()

    for blk in model.blocks:
        blk.attn.fused_attn = False
    handles = [model.blocks[layer].attn.attn_drop.register_forward_hook(prune),
               model.blocks[layer].attn.register_forward_hook(grab)]
    try:
        with torch.no_grad():
            feats = model.forward_features(images)
            pooled = model.forward_head(feats, pre_logits=True)
            logits = model.forward_head(feats) if model.num_classes else None
    finally:
        for h in handles:
            h.remove()
    logp = None if logits is None else torch.log_softmax(logits.double(), -1)
    return logp, pooled.double(), store["z"].double()


def cos_dist(a, b):
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def jsd_bits(p, q):
    m = (p + q) / 2
    kl = lambda a: sum(float(a[i]) * math.log2(float(a[i]) / float(m[i])) for i in range(len(a)) if a[i] > 0)
    return 0.5 * kl(p) + 0.5 * kl(q)


def reference_metrics(model, images, labels, layer, head, regions):
    T = model.num_prefix_tokens
    logp0, pooled0, z0 = reference(model, images, labels, layer, head, None)
    logp, pooled, z = reference(model, images, labels, layer, head, regions)
    out = {"cls_dist": cos_dist(z0[:, 0], z[:, 0]).numpy(),
           "patch_dist": cos_dist(z0[:, T:], z[:, T:]).mean(-1).numpy(),
           "emb_dist": cos_dist(pooled0, pooled).numpy()}
    if logp is not None:
        p0, p = logp0.exp(), logp.exp()
        idx = torch.arange(len(labels))
        out["prob"] = p[idx, labels].numpy()
        out["prob_drop"] = (p0[idx, labels] - p[idx, labels]).numpy()
        out["jsd"] = np.array([jsd_bits(p0[i], p[i]) for i in idx])
    return out


VARIANTS = ["cls", "reg", "distilled", "layerscale", "backbone"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_timm(variant):
    model = make_model(variant)
    vit = load_vit(model)
    torch.manual_seed(10)
    x = torch.randn(2, 3, *vit.img_size)
    for fused in (True, False):
        for blk in model.blocks:
            blk.attn.fused_attn = fused
        with torch.no_grad():
            expected = model(x) if vit.has_head else model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(vit(x), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_importance_equals_leave_one_out_loop(variant):
    model = make_model(variant)
    vit = load_vit(model)
    expected_T = {"cls": 1, "reg": 5, "distilled": 2, "layerscale": 1, "backbone": 1}[variant]
    assert vit.num_prefix_tokens == expected_T
    torch.manual_seed(11)
    B = 3
    images = torch.randn(B, 3, *vit.img_size)
    labels = torch.randint(0, max(vit.num_classes, 1), (B,)) if vit.has_head else None
    df = head_importance(vit, images, labels, batch_size=2)
    assert len(df) == B * vit.depth * vit.num_heads
    assert list(df.columns[:3]) == ["image", "layer", "head"]
    for layer in range(vit.depth):
        for head in range(vit.num_heads):
            ref = reference_metrics(model, images, labels, layer, head, 1)
            got = df[(df.layer == layer) & (df["head"] == head)].sort_values("image")
            for metric, values in ref.items():
                np.testing.assert_allclose(got[metric].to_numpy(), values, atol=3e-6, rtol=1e-4,
                                           err_msg=f"{variant} {metric} layer {layer} head {head}")
    if not vit.has_head:
        assert df[["prob", "prob_drop", "jsd"]].isna().all().all()
        assert (df.emb_dist > 0).any()
    else:
        assert df.jsd.between(0, 1).all() and (df.jsd > 1e-6).any()


@pytest.mark.parametrize("variant", ["cls", "reg", "backbone"])
def test_partial_pruning_all_modes(variant):
    model = make_model(variant)
    vit = load_vit(model)
    torch.manual_seed(12)
    image = torch.randn(1, 3, *vit.img_size)
    label = torch.tensor([1]) if vit.has_head else None
    layer, head = vit.depth - 2, 1
    df = partial_pruning(vit, image[0], None if label is None else 1, layer, head)
    assert list(df["mode"]) == list(range(8))
    for mode in range(8):
        ref = reference_metrics(model, image, label, layer, head, mode)
        row = df.iloc[mode]
        for metric, values in ref.items():
            assert row[metric] == pytest.approx(float(values[0]), abs=3e-6, rel=1e-4), (mode, metric)
    # mode 0 reproduces the unpruned output exactly
    zero = df.iloc[0]
    assert zero.cls_dist == pytest.approx(0, abs=1e-12) and zero.emb_dist == pytest.approx(0, abs=1e-12)
    if vit.has_head:
        assert zero.prob_drop == pytest.approx(0, abs=1e-7) and zero.jsd == pytest.approx(0, abs=1e-9)  # float32 round-off
        probs = torch.softmax(vit(image), -1)[0]
        assert zero.top5_classes == probs.topk(5).indices.tolist()
        np.testing.assert_allclose(zero.top5_probs, probs.topk(5).values.numpy(), rtol=1e-5)
        # mode 1 equals the leave-one-out row of head_importance
        loo = head_importance(vit, image, label)
        loo = loo[(loo.layer == layer) & (loo["head"] == head)].iloc[0]
        assert df.iloc[1].prob == pytest.approx(loo.prob, rel=1e-6)
    else:
        assert df.top5_classes.map(len).eq(0).all() and df.prob.isna().all()


def test_pruning_regions_zero_exactly_the_intended_entries():
    model = make_model("reg")
    vit = load_vit(model)
    T, N = vit.num_prefix_tokens, vit.num_tokens
    x = torch.randn(2, 3, *vit.img_size)
    base = vit.capture_attention(x, layers=[0])[:, 0]
    assert base.shape == (2, vit.num_heads, N, N)
    torch.testing.assert_close(base.sum(-1), torch.ones(2, vit.num_heads, N))
    region_of = torch.full((N, N), 3)
    region_of[:T, :T] = 1
    region_of[:T, T:] = 2
    region_of[T:, :T] = 2
    for mode, regions in enumerate(MODES):
        with vit.prune([(0, 1, mode), (0, 2, "R1")]):
            A = vit.capture_attention(x, layers=[0])[:, 0]
        pruned = torch.zeros(N, N, dtype=torch.bool)
        for r in regions:
            pruned |= region_of == int(r[1])
        assert (A[:, 1][:, pruned] == 0).all()
        assert torch.equal(A[:, 1][:, ~pruned], base[:, 1][:, ~pruned])  # no renormalisation
        assert (A[:, 2][:, :T, :T] == 0).all() and torch.equal(A[:, 2][:, T:], base[:, 2][:, T:])
        assert torch.equal(A[:, 0], base[:, 0])  # other heads untouched
    # mode 0 (and an empty spec) reproduce the unpruned output; the weights never change
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(vit(x, prune=[(1, 0, 0)]), vit(x))  # explicit vs fused attention: float32 round-off
    assert not torch.equal(vit(x, prune=[(1, 0, 1)]), vit(x))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_capture_selected_layers_matches_full_capture():
    vit = load_vit(make_model("cls"))
    x = torch.randn(1, 3, *vit.img_size)
    full = vit.capture_attention(x)
    assert full.shape == (1, vit.depth, vit.num_heads, vit.num_tokens, vit.num_tokens)
    torch.testing.assert_close(vit.capture_attention(x, layers=[2, 0]), full[:, [2, 0]])


def test_analyse_batch_agrees_with_the_public_functions():
    from analysis import analyse_batch, attention_strength
    from analysis.metrics.patterns import unpack_bits
    from analysis.metrics.semantic import batch_semantic_weights, semantic_concentration

    vit = load_vit(make_model("cls"))
    torch.manual_seed(13)
    images, labels = torch.randn(3, 3, *vit.img_size), torch.tensor([0, 3, 6])
    r = analyse_batch(vit, images, labels, q=0.05)
    hi = head_importance(vit, images, labels)
    st = attention_strength(vit, images)
    B, L, H = 3, vit.depth, vit.num_heads
    for m in ("prob", "jsd", "cls_dist", "patch_dist", "emb_dist"):
        np.testing.assert_allclose(r.importance[m].reshape(-1), hi[m].to_numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(r["strength_entropy"].reshape(-1), st.strength_entropy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["strength"].reshape(B * L * H, -1), np.stack(st.strength), rtol=1e-5, atol=1e-7)
    A = vit.capture_attention(images)
    T = vit.num_prefix_tokens
    assert unpack_bits(r["patch_bits"], vit.num_patches).sum((-1, -2)).max() == round(0.05 * vit.num_patches ** 2)
    np.testing.assert_allclose(r["cls_vectors"][:, 1, 2, :vit.num_tokens], A[:, 1, 2, 0].numpy(), atol=1e-3)
    w = torch.from_numpy(batch_semantic_weights(images, vit.data_config, vit.grid, vit.patch_size))
    sc, cls_sc = semantic_concentration(A[:, 2], w, T)
    np.testing.assert_allclose(r["semantic_concentration"][:, 2], sc.numpy(), rtol=1e-5)
    np.testing.assert_allclose(r["cls_semantic_concentration"][:, 2], cls_sc.numpy(), rtol=1e-5)
    np.testing.assert_allclose(r["probs"], torch.softmax(vit(images), -1).numpy(), rtol=1e-5, atol=1e-7)
