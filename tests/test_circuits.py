"""Direct effects, head-to-head paths and attention sinks against plain references written here.

The references never call the engine: each block is recomputed from its own weights with an
explicit loop over heads (c[l,h] = ls1 * (o_h W_O[h])), the read-out is written out by hand with
the LayerNorms' 1/sigma frozen on the clean stream, an exact path is one full forward per edge (the
receiving head's q/k/v from norm1(x_j - c[a]) in a hand-written block j, the later blocks by the
model's own modules), EAP is autograd through that hand-written forward with one leaf per receiver,
and the sink metrics are per-head numpy loops. Models: tiny random timm ViTs (layer scale,
registers, distillation token, avg pooling + fc_norm + norm_pre without a class token, a
backbone), random HuggingFace ViT / DINOv2-with-registers / DeiT-with-teacher / DINOv2 backbone.
"""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from analysis import direct_effects, head_paths, load_vit, sink_metrics, token_norms
from analysis.datasets import load_image_set, open_image
from analysis.errors import InputError, LabelError
from analysis.metrics.direct import direct_pieces, top1_labels, trace_stream
from analysis.metrics.paths import eap_scores
from analysis.metrics.sinks import high_norm_tokens
from conftest import embedded_default_missing

TIMM = ["layerscale", "reg", "distilled", "avg", "backbone"]
HF = {"hf-vit": "ViTForImageClassification", "hf-dinov2-reg": "Dinov2WithRegistersForImageClassification",
      "hf-deit-teacher": "DeiTForImageClassificationWithTeacher", "hf-backbone": "Dinov2Model"}
SMALL = dict(img_size=32, patch_size=8, depth=3, num_heads=2, embed_dim=32)


def make_model(variant: str) -> torch.nn.Module:
    """A tiny random ViT with peaky attention (q/k weights scaled up) and random prefix tokens."""
    if variant in HF:
        from hf_models import make_hf

        return make_hf(HF[variant], num_labels=5, seed=len(variant))
    torch.manual_seed(TIMM.index(variant))
    if variant == "layerscale":
        m = timm.create_model("vit_tiny_patch16_224", **SMALL, num_classes=5, init_values=0.5)
    elif variant == "reg":
        m = timm.create_model("vit_tiny_patch16_224", **SMALL, num_classes=4, reg_tokens=3, no_embed_class=True,
                              init_values=0.7)
    elif variant == "distilled":
        m = timm.create_model("deit_tiny_distilled_patch16_224", **SMALL, num_classes=6)
    elif variant == "avg":  # no class token: mean of the patch tokens, then fc_norm; norm_pre on the input
        m = timm.create_model("vit_tiny_patch16_224", **SMALL, num_classes=3, global_pool="avg", fc_norm=True,
                              class_token=False, pre_norm=True)
    else:
        m = timm.create_model("vit_tiny_patch16_224", **SMALL, num_classes=0, init_values=0.5)
    with torch.no_grad():
        for module in m.modules():  # weights of HF's initializer_range 0.15 (timm's 0.02 writes almost nothing)
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.15)
        for blk in m.blocks:
            C = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * C] *= 3.0
        for name, p in m.named_parameters():
            if name in ("cls_token", "reg_token", "dist_token"):
                p.normal_()
            if name.endswith((".norm.weight", "fc_norm.weight", "norm1.weight")):
                p.uniform_(0.5, 1.5)  # non-trivial gammas: the frozen scale must keep them
            if name.endswith((".norm.bias", "fc_norm.bias", "norm1.bias")):
                p.normal_(0, 0.3)
    return m.eval()


def model_logits(model, images):
    """The model's own forward: logits [B, K] (timm or HF)."""
    with torch.no_grad():
        out = model(images)
    return out if isinstance(out, torch.Tensor) else out.logits


def images_for(model, n=2, seed=5):
    torch.manual_seed(seed)
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        return torch.randn(n, 3, *model.patch_embed.img_size)
    size = model.config.image_size
    return torch.randn(n, 3, size, size)


# ---- the plain reference: blocks by hand ---------------------------------------------------------
class Parts:
    """One block's weights, read from the model's modules: norm1, per-head q/k/v weights [H, d, C]
    and biases [H, d], q/k norms, scale, W_O [C, H, d], b_O, ls1 [C], and the MLP half (x' -> write)."""

    def __init__(self, model, layer):
        if isinstance(model, timm.models.vision_transformer.VisionTransformer):
            blk = model.blocks[layer]
            H, d = blk.attn.num_heads, blk.attn.head_dim
            C = blk.attn.qkv.in_features
            W = blk.attn.qkv.weight.view(3, H, d, C)
            b = blk.attn.qkv.bias.view(3, H, d)
            self.W, self.b = [W[i] for i in range(3)], [b[i] for i in range(3)]
            self.norm1, self.qn, self.kn, self.scale = blk.norm1, blk.attn.q_norm, blk.attn.k_norm, blk.attn.scale
            self.WO, self.bO = blk.attn.proj.weight.view(C, H, d), blk.attn.proj.bias
            self.ls1 = blk.ls1.gamma if hasattr(blk.ls1, "gamma") else torch.ones(C)
            ls2 = blk.ls2.gamma if hasattr(blk.ls2, "gamma") else torch.ones(C)
            self.mlp = lambda x: ls2 * blk.mlp(blk.norm2(x))
        else:
            from hf_models import layers_of

            blk = layers_of(model)[layer]
            at = blk.attention
            H, d = at.num_attention_heads, at.head_dim
            C = at.q_proj.in_features
            self.W = [lin.weight.view(H, d, C) for lin in (at.q_proj, at.k_proj, at.v_proj)]
            self.b = [lin.bias.view(H, d) for lin in (at.q_proj, at.k_proj, at.v_proj)]
            self.norm1 = blk.layernorm_before if hasattr(blk, "layernorm_before") else blk.norm1
            norm2 = blk.layernorm_after if hasattr(blk, "layernorm_after") else blk.norm2
            self.qn = self.kn = lambda t: t
            self.scale = d ** -0.5
            self.WO, self.bO = at.o_proj.weight.view(C, H, d), at.o_proj.bias
            ls1, ls2 = getattr(blk, "layer_scale1", None), getattr(blk, "layer_scale2", None)
            self.ls1 = ls1.lambda1 if ls1 is not None else torch.ones(C)
            ls2 = ls2.lambda1 if ls2 is not None else torch.ones(C)
            self.mlp = lambda x: ls2 * blk.mlp(norm2(x))
        self.H = H


def ref_block(P: Parts, x, head=None, reads=None, via="qkv"):
    """Block by hand, head by head. x [B, N, C]; head ``head``'s parts in ``via`` read ``reads``
    [B, N, C] instead of x. Returns (x_next, c [B, H, N, C], bias write [C], mlp write [B, N, C])."""
    cs = []
    for h in range(P.H):
        src = {p: (reads if (h == head and p in via) else x) for p in "qkv"}
        q, k, v = (P.norm1(src[p]) @ P.W[i][h].T + P.b[i][h] for i, p in enumerate("qkv"))
        q, k = P.qn(q), P.kn(k)
        A = torch.softmax(q @ k.transpose(-1, -2) * P.scale, dim=-1)
        cs.append(P.ls1 * ((A @ v) @ P.WO[:, h].T))
    c = torch.stack(cs, dim=1)
    bias = P.ls1 * P.bO
    mid = x + c.sum(1) + bias
    mlp = P.mlp(mid)
    return mid + mlp, c, bias, mlp


def ref_embed(model, images):
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        return model.norm_pre(model._pos_embed(model.patch_embed(images)))
    return model.base_model.embeddings(images)


def depth_of(model):
    from hf_models import layers_of

    return len(model.blocks) if hasattr(model, "blocks") else len(layers_of(model))


def frozen_ln(ln, clean):
    """LayerNorm with 1/sigma frozen on ``clean`` [..., C]: p -> (p - mean(p)) / sigma * gamma + beta."""
    if isinstance(ln, torch.nn.Identity):
        return lambda p: p
    sigma = torch.sqrt(clean.var(-1, unbiased=False, keepdim=True) + ln.eps)
    return lambda p: (p - p.mean(-1, keepdim=True)) / sigma * ln.weight + ln.bias


def ref_readout(model, xL):
    """(R, exact): R(p [B, N, C]) -> (pooled, logits or None) with every norm frozen on the clean
    final stream xL (affine in p); exact(x) is the model's own read-out."""
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        T = model.num_prefix_tokens
        norm = frozen_ln(model.norm, xL)
        classes = model.num_classes > 0
        if type(model).__name__ == "VisionTransformerDistilled":
            def R(p):
                s = norm(p)
                return (s[:, 0] + s[:, 1]) / 2, ((model.head(s[:, 0]) + model.head_dist(s[:, 1])) / 2 if classes else None)
        else:
            def pool(s):
                return s[:, 0] if model.global_pool == "token" else s[:, T:].mean(1)
            fc = frozen_ln(model.fc_norm, pool(model.norm(xL)))

            def R(p):
                pooled = fc(pool(norm(p)))
                return pooled, (model.head(pooled) if classes else None)

        def exact(x):
            f = model.norm(x)
            return model.forward_head(f, pre_logits=True), (model.forward_head(f) if classes else None)
        return R, exact
    base = model.base_model
    T = {"deit": 2}.get(model.config.model_type, 1) + int(getattr(model.config, "num_register_tokens", 0) or 0)
    norm = frozen_ln(base.layernorm, xL)
    name = type(model).__name__

    def read(s):
        if name.startswith("Dinov2") and name.endswith("ForImageClassification"):
            pooled = torch.cat([s[:, 0], s[:, T:].mean(1)], -1)
            return pooled, model.classifier(pooled)
        if name == "DeiTForImageClassificationWithTeacher":
            return (s[:, 0] + s[:, 1]) / 2, (model.cls_classifier(s[:, 0]) + model.distillation_classifier(s[:, 1])) / 2
        return s[:, 0], (model.classifier(s[:, 0]) if hasattr(model, "classifier") else None)

    return (lambda p: read(norm(p))), (lambda x: read(base.layernorm(x)))


class Reference:
    """The clean forward by hand: xs (L + 1 block inputs), c [L] x [B, H, N, C], bias and MLP writes."""

    def __init__(self, model, images):
        self.model, self.L = model, depth_of(model)
        self.parts = [Parts(model, l) for l in range(self.L)]
        x = ref_embed(model, images)
        self.xs, self.c, self.bias, self.mlp = [x], [], [], []
        for P in self.parts:
            x, c, b, m = ref_block(P, x)
            self.xs.append(x)
            self.c.append(c)
            self.bias.append(b)
            self.mlp.append(m)
        self.R, self.exact = ref_readout(model, self.xs[-1])

    def finish(self, layer, x, head=None, reads=None, via="qkv"):
        """Blocks layer..L-1 (block ``layer`` with head ``head`` reading ``reads``) and the exact read-out."""
        x = ref_block(self.parts[layer], x, head, reads, via)[0]
        for P in self.parts[layer + 1:]:
            x = ref_block(P, x)[0]
        return self.exact(x)


def models(variants):
    return pytest.mark.parametrize("variant", variants)


# ---- direct effects ------------------------------------------------------------------------------
@models(TIMM + list(HF))
def test_direct_effects_equal_the_frozen_readout_of_each_head(variant):
    model = make_model(variant)
    vit = load_vit(model)
    images = images_for(model)
    with torch.no_grad():
        ref = Reference(model, images)
        pooled, logits = ref.exact(ref.xs[-1])
        own = model_logits(model, images) if vit.has_head else None
    if own is not None:  # the hand-written forward is the model's forward
        torch.testing.assert_close(logits, own, atol=2e-5, rtol=1e-4)
    df = direct_effects(vit, images)
    B, L, H = images.shape[0], vit.depth, vit.num_heads
    assert len(df) == B * L * H and df.image.tolist() == sorted(df.image.tolist())
    with torch.no_grad():
        zero = ref.R(torch.zeros_like(ref.xs[-1]))
        if vit.has_head:
            y = logits.argmax(-1)
            idx = torch.arange(B)
            value = lambda p: (ref.R(p)[1] - zero[1])[idx, y]                 # F(p)[y]
            target, const = logits[idx, y], zero[1][idx, y]
        else:
            e = pooled - zero[0]
            value = lambda p: ((ref.R(p)[0] - zero[0]) * e).sum(-1) / (e * e).sum(-1)
            target, const = torch.ones(B), torch.zeros(B)
        direct = torch.stack([torch.stack([value(ref.c[l][:, h]) for h in range(H)], 1) for l in range(L)], 1)
        # the sum-of-pieces identity: every piece's direct term + the read-out's constant = logit_y (or 1)
        pieces = (value(ref.xs[0]) + direct.sum((1, 2)) + sum(value(ref.bias[l].expand_as(ref.xs[0])) for l in range(L))
                  + sum(value(ref.mlp[l]) for l in range(L)) + const)
    torch.testing.assert_close(pieces, target, atol=2e-5, rtol=1e-5)
    column = "direct_logit" if vit.has_head else "direct_emb"
    got = df[column].to_numpy().reshape(B, L, H)
    np.testing.assert_allclose(got, direct.double().numpy(), atol=2e-6, rtol=1e-4)
    assert np.abs(got).max() > 1e-3  # the heads do write something the read-out sees
    # the engine's own pieces obey the identity too
    with torch.no_grad():
        trace = trace_stream(vit, images)
        p = direct_pieces(vit, trace, top1_labels(vit, trace, None))
        mlp = torch.stack([value(m) for m in ref.mlp], 1).double().numpy()
    total = p["heads"].sum((1, 2)) + p["bias"].sum(1) + p["mlp"].sum(1) + p["embed"] + p["constant"]
    np.testing.assert_allclose(total.numpy(), target.double().numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(p["mlp"].numpy(), mlp, atol=2e-5, rtol=1e-4)


def pruned_logits(model, images, layer, head):
    """The model's own forward (timm) or HF's (tests/hf_models.py) with head (layer, head) pruned."""
    if not isinstance(model, timm.models.vision_transformer.VisionTransformer):
        from hf_models import hf_reference

        return hf_reference(model, images, layer, head, torch.zeros(1))[0]

    def prune(module, inputs, output):
        A = output.clone()
        A[:, head] = 0
        return A

    for blk in model.blocks:
        blk.attn.fused_attn = False
    handle = model.blocks[layer].attn.attn_drop.register_forward_hook(prune)
    try:
        with torch.no_grad():
            return model(images)
    finally:
        handle.remove()
        for blk in model.blocks:
            blk.attn.fused_attn = True


@models(["layerscale", "distilled", "hf-dinov2-reg"])
def test_logit_drop_is_the_pruned_forward_and_indirect_the_rest(variant):
    model = make_model(variant)
    vit = load_vit(model)
    images = images_for(model, n=3)
    labels = torch.tensor([0, 2, 1])
    df = direct_effects(vit, images, labels)
    clean = model_logits(model, images)
    idx = torch.arange(3)
    for layer, head in [(0, 0), (1, 1), (2, 0)]:
        drop = (clean[idx, labels] - pruned_logits(model, images, layer, head)[idx, labels]).double().numpy()
        got = df[(df.layer == layer) & (df["head"] == head)].sort_values("image")
        np.testing.assert_allclose(got.logit_drop.to_numpy(), drop, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(got.indirect_logit, got.logit_drop - got.direct_logit, atol=1e-12)
    assert set(df.columns) == {"image", "layer", "head", "direct_logit", "logit_drop", "indirect_logit"}


def test_direct_effects_take_labels_and_refuse_bad_ones():
    model = make_model("layerscale")
    vit = load_vit(model)
    images = images_for(model, n=2)
    top1 = direct_effects(vit, images)
    y = model_logits(model, images).argmax(-1)
    given = direct_effects(vit, images, y)
    np.testing.assert_allclose(given.direct_logit, top1.direct_logit, atol=1e-9)
    other = direct_effects(vit, images, (y + 1) % 5)
    assert not np.allclose(other.direct_logit, top1.direct_logit)
    with pytest.raises(LabelError):
        direct_effects(vit, images, [0, 9])


# ---- head-to-head paths --------------------------------------------------------------------------
def ref_path(ref: Reference, a, b, via, label):
    """path_logit (label) or path_emb of edge a -> b: one full forward in which b's ``via`` reads x_j - c[a]."""
    (i, ha), (j, hb) = a, b
    x = ref.xs[j]
    pooled, logits = ref.finish(j, x, hb, x - ref.c[i][:, ha], via)
    clean_pooled, clean_logits = ref.exact(ref.xs[-1])
    if label is not None:
        return float(clean_logits[0, label] - logits[0, label])
    return float(1 - F.cosine_similarity(clean_pooled.double(), pooled.double(), dim=-1)[0])


@models(["layerscale", "reg", "distilled", "avg", "backbone", "hf-vit", "hf-dinov2-reg", "hf-backbone"])
def test_exact_paths_equal_one_full_forward_per_edge(variant):
    model = make_model(variant)
    vit = load_vit(model)
    image = images_for(model, n=1)[0]
    vias = ["qkv", "q", "k", "v"] if variant in ("layerscale", "reg", "hf-dinov2-reg") else ["qkv"]
    with torch.no_grad():
        ref = Reference(model, image[None])
        label = int(ref.exact(ref.xs[-1])[1].argmax()) if vit.has_head else None
    for via in vias:
        df = head_paths(vit, image, via=via)
        L, H = vit.depth, vit.num_heads
        assert len(df) == H * H * L * (L - 1) // 2 and (df.a_layer < df.b_layer).all()
        column = "path_logit" if vit.has_head else "path_emb"
        assert list(df.columns) == ["a_layer", "a_head", "b_layer", "b_head", column]
        with torch.no_grad():
            want = [ref_path(ref, (r.a_layer, r.a_head), (r.b_layer, r.b_head), via, label) for r in df.itertuples()]
        np.testing.assert_allclose(df[column], want, atol=3e-6 if vit.has_head else 1e-7, rtol=1e-3, err_msg=via)
        assert np.abs(want).max() > (1e-4 if vit.has_head else 1e-6)  # paths that matter


def test_paths_of_chosen_senders_receivers_and_edges():
    model = make_model("layerscale")
    vit = load_vit(model)
    image = images_for(model, n=1)[0]
    everything = head_paths(vit, image, label=2)
    some = head_paths(vit, image, label=2, senders=[(0, 1), (1, 0)], receivers=[(1, 1), (2, 0), (0, 0)])
    assert list(zip(some.a_layer, some.a_head, some.b_layer, some.b_head)) == [
        (0, 1, 1, 1), (0, 1, 2, 0), (1, 0, 2, 0)]
    merged = some.merge(everything, on=["a_layer", "a_head", "b_layer", "b_head"])
    np.testing.assert_allclose(merged.path_logit_x, merged.path_logit_y, atol=1e-6)
    edges = head_paths(vit, image, label=2, edges=[((1, 0), (2, 0)), ((0, 1), (1, 1))])
    assert edges.path_logit.tolist() == pytest.approx(
        [float(merged.path_logit_x[2]), float(merged.path_logit_x[0])], abs=1e-6)
    with pytest.raises(InputError):
        head_paths(vit, image, edges=[((2, 0), (1, 0))])
    with pytest.raises(InputError):
        head_paths(vit, image, senders=[(3, 0)])
    with pytest.raises(InputError):
        head_paths(vit, image, via="o")


def ref_eap(ref: Reference, b, part, label):
    """g_b for one receiver and part by autograd through the hand-written forward: [N, C]."""
    j, hb = b
    x = ref.xs[j].detach()
    leaf = x.clone().requires_grad_()
    with torch.enable_grad():
        _, logits = ref.finish(j, x, hb, leaf, part)
        (g,) = torch.autograd.grad(logits[0, label], leaf)
    return g


@models(["layerscale", "reg", "distilled", "avg", "hf-dinov2-reg", "hf-deit-teacher"])
def test_eap_is_the_autograd_first_order_term(variant):
    model = make_model(variant)
    vit = load_vit(model)
    image = images_for(model, n=1)[0]
    with torch.no_grad():
        ref = Reference(model, image[None])
        label = int(ref.exact(ref.xs[-1])[1].argmin())  # any class: the bottom one
    L, H = vit.depth, vit.num_heads
    table = {}
    for b in [(l, h) for l in range(1, L) for h in range(H)]:
        for part in "qkv":
            g = ref_eap(ref, b, part, label)
            for a in [(l, h) for l in range(b[0]) for h in range(H)]:
                table[(a, b, part)] = float((g * ref.c[a[0]][:, a[1]]).sum())
    for via in ("q", "k", "v", "qkv"):
        df = head_paths(vit, image, label, via=via, method="eap")
        assert list(df.columns) == ["a_layer", "a_head", "b_layer", "b_head", "path_logit_eap"]
        want = [sum(table[((r.a_layer, r.a_head), (r.b_layer, r.b_head), p)] for p in via) for r in df.itertuples()]
        np.testing.assert_allclose(df.path_logit_eap, want, atol=2e-6, rtol=1e-3, err_msg=via)
    # EAP is the first-order term of path_logit in the sender's write (sign included): the exact
    # path with eps * c[a] removed, by central differences in float64, is eps * path_logit_eap
    model.double()
    with torch.no_grad():
        ref = Reference(model, image[None].double())
        eps = 1e-4
        for a, b, part in [((0, 1), (1, 0), "q"), ((0, 0), (L - 1, 1), "v"), ((1, 1), (L - 1, 0), "k")]:
            x, c = ref.xs[b[0]], ref.c[a[0]][:, a[1]]
            minus = ref.finish(b[0], x, b[1], x - eps * c, part)[1][0, label]
            plus = ref.finish(b[0], x, b[1], x + eps * c, part)[1][0, label]
            assert float(plus - minus) / (2 * eps) == pytest.approx(table[(a, b, part)], rel=1e-3, abs=1e-7)


def test_eap_batches_images_and_refuses_backbones():
    model = make_model("reg")
    vit = load_vit(model)
    images = images_for(model, n=2)
    scores, y = eap_scores(vit, images)
    for i in range(2):
        one = head_paths(vit, images[i], int(y[i]), method="eap")
        want = [scores[i, :, r.b_layer, r.b_head, r.a_layer, r.a_head].sum() for r in one.itertuples()]
        np.testing.assert_allclose(one.path_logit_eap, want, atol=1e-9)
    assert (scores[:, :, 0] == 0).all()  # nothing feeds block 0
    backbone = load_vit(make_model("backbone"))
    with pytest.raises(InputError, match="exact"):
        head_paths(backbone, images_for(backbone.model, n=1)[0], method="eap")


# ---- attention sinks -----------------------------------------------------------------------------
def ref_sinks(model, images, T, factor):
    """Per-head numpy loops: prefix_share, high_norm_share [B, L, H], high_norm_count [B, L], norms [B, L+1, N]."""
    with torch.no_grad():
        ref = Reference(model, images)
        norms = np.stack([x.norm(dim=-1).numpy() for x in ref.xs], 1)
        B, L, H = images.shape[0], ref.L, ref.parts[0].H
        prefix, share, count = np.zeros((B, L, H)), np.zeros((B, L, H)), np.zeros((B, L), dtype=int)
        for l, P in enumerate(ref.parts):
            xn = P.norm1(ref.xs[l])
            for b in range(B):
                patch_norms = norms[b, l, T:]
                high = np.flatnonzero(patch_norms > factor * np.median(patch_norms)) + T
                count[b, l] = len(high)
                for h in range(H):
                    q = P.qn(xn[b] @ P.W[0][h].T + P.b[0][h])
                    k = P.kn(xn[b] @ P.W[1][h].T + P.b[1][h])
                    A = torch.softmax(q @ k.T * P.scale, -1).double().numpy()
                    prefix[b, l, h] = np.mean([A[u, :T].sum() for u in range(T, A.shape[0])])
                    share[b, l, h] = np.mean([A[u, high].sum() for u in range(T, A.shape[0])])
    return prefix, share, count, norms


@models(["reg", "distilled", "avg", "hf-dinov2-reg"])
def test_sink_metrics_and_token_norms_equal_per_head_loops(variant):
    model = make_model(variant)
    vit = load_vit(model)
    images = images_for(model, n=2)
    T = vit.num_prefix_tokens
    with torch.no_grad():  # give block 0's input a few high-norm patch tokens (and an even patch count's median)
        norms0 = Reference(model, images).xs[0].norm(dim=-1)
    factor = float((norms0[:, T:].max() / norms0[:, T:].median()).item()) * 0.9
    df = sink_metrics(vit, images, factor=factor)
    prefix, share, count, norms = ref_sinks(model, images, T, factor)
    B, L, H = prefix.shape
    assert list(df.columns) == ["image", "layer", "head", "prefix_share", "high_norm_share", "high_norm_count"]
    np.testing.assert_allclose(df.prefix_share.to_numpy().reshape(B, L, H), prefix, atol=1e-6)
    np.testing.assert_allclose(df.high_norm_share.to_numpy().reshape(B, L, H), share, atol=1e-6)
    assert df.high_norm_count.dtype.kind == "i"
    np.testing.assert_array_equal(df.high_norm_count.to_numpy().reshape(B, L, H), np.repeat(count[:, :, None], H, 2))
    assert count[:, 0].sum() >= 1 and share.max() > 0
    if T == 0:
        assert (prefix == 0).all()
    else:
        assert prefix.min() > 0
    got = token_norms(vit, images)
    assert tuple(got.shape) == (B, L + 1, vit.num_tokens)
    np.testing.assert_allclose(np.asarray(got), norms, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError):
        sink_metrics(vit, images, factor=0)


def test_high_norm_rule_uses_numpys_median_on_an_even_patch_count():
    norms = torch.tensor([[9.0, 1.0, 2.0, 4.0, 7.0]])  # one prefix token; patches 1, 2, 4, 7: median 3
    assert high_norm_tokens(norms, 1, factor=2.0).tolist() == [[False, False, False, True]]   # 7 > 6
    assert high_norm_tokens(norms, 1, factor=1.3).tolist() == [[False, False, True, True]]    # 4 > 3.9


# ---- the embedded default ------------------------------------------------------------------------
def test_default_model_direct_paths_and_sinks():
    if missing := embedded_default_missing():
        pytest.skip(missing)
    vit = load_vit("default")
    items = load_image_set("fashion", limit=20, seed=0).items[:2]
    images = vit.preprocess([open_image(it.ref) for it in items])
    model = vit.model
    df = direct_effects(vit, images)
    with torch.no_grad():
        ref = Reference(model, images)
        pooled, logits = ref.exact(ref.xs[-1])
        torch.testing.assert_close(logits, model(images), atol=1e-4, rtol=1e-4)
        y = logits.argmax(-1)
        zero = ref.R(torch.zeros_like(ref.xs[-1]))[1][torch.arange(2), y]
        direct = np.array([[[float((ref.R(ref.c[l][:, h])[1][b, y[b]] - zero[b])) for h in range(6)]
                            for l in range(12)] for b in range(2)])
    np.testing.assert_allclose(df.direct_logit.to_numpy().reshape(2, 12, 6), direct, atol=5e-5, rtol=1e-4)
    # a few edges into the last blocks: exact against one full forward each, EAP against autograd
    edges = [((9, 1), (11, 4)), ((10, 3), (11, 4)), ((5, 0), (8, 2))]
    exact = head_paths(vit, images[0], edges=edges)
    with torch.no_grad():
        want = [ref_path(Reference(model, images[:1]), a, b, "qkv", int(y[0])) for a, b in edges]
    np.testing.assert_allclose(exact.path_logit, want, atol=5e-5, rtol=1e-3)
    eap = head_paths(vit, images[0], edges=edges, method="eap")
    one = Reference(model, images[:1])
    for (a, b), got in zip(edges, eap.path_logit_eap):
        g = sum(ref_eap(one, b, p, int(y[0])) for p in "qkv")
        assert got == pytest.approx(float((g * one.c[a[0]][:, a[1]].detach()).sum()), abs=5e-5, rel=1e-3)
    sinks = sink_metrics(vit, images)
    assert sinks.prefix_share.between(0, 1).all() and sinks.high_norm_share.between(0, 1).all()
