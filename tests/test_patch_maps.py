"""Patch attribution maps against plain references written with timm's own forward.

occlusion: one full timm forward per occluded image; token_drop: timm's own embedding, then one
run of timm's blocks per shortened sequence; rollout and gradient rollout: explicit matrix
products on the attention read from timm's unfused attention (a forward hook on attn_drop, whose
input is the post-softmax pattern), its gradient taken by autograd with retain_grad on that
pattern. Spearman from scipy.stats.spearmanr.
"""
import numpy as np
import pytest
import timm
import torch
from scipy.stats import spearmanr

from analysis import deletion_curves, head_saliency_alignment, load_vit, map_agreement, patch_maps
from analysis.errors import HeadScopeError
from analysis.metrics.patch_maps import MAPS
pytestmark = pytest.mark.usefixtures("one_thread")
from test_importance import make_model

VARIANTS = ["cls", "reg", "distilled", "avgpool", "backbone"]


def build(variant):
    if variant == "avgpool":  # CLS token, but the head reads the mean of the patch tokens
        torch.manual_seed(5)
        m = timm.create_model("vit_tiny_patch16_224", img_size=48, depth=2, num_classes=3, global_pool="avg")
        with torch.no_grad():
            for blk in m.blocks:
                blk.attn.qkv.weight[: 2 * blk.attn.qkv.in_features] *= 4.0
        model = m.eval()
    else:
        model = make_model(variant)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model, load_vit(model)


def image_for(vit, seed=3):
    torch.manual_seed(seed)
    return torch.randn(3, *vit.img_size)


def score(model, feats, label):
    """P(label) [S] for a classifier, pooled embedding [S, D] for a backbone (float64)."""
    with torch.no_grad():
        if model.num_classes:
            return torch.softmax(model.forward_head(feats).double(), -1)[:, label]
        return model.forward_head(feats, pre_logits=True).double()


def drop(model, s0, s):
    """SPEC's P(y|x) - P(y|x'), or the cosine distance of pooled embeddings."""
    if model.num_classes:
        return float(s0[0] - s[0])
    return float(1 - torch.nn.functional.cosine_similarity(s0, s)[0])


def timm_features(model, x):
    with torch.no_grad():
        return model.forward_features(x)


def timm_tokens(model, tokens):
    """timm's blocks and final norm on an embedded sequence."""
    with torch.no_grad():
        for blk in model.blocks:
            tokens = blk(tokens)
        return model.norm(tokens)


def timm_embed(model, x):
    with torch.no_grad():
        return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def ref_occlusion(model, vit, img, label, fill=None):
    """fill: [3, H, W] the occluded patch's pixels come from (None: 0, the normalised mean colour)."""
    p, (gh, gw) = vit.patch_size, vit.grid
    fill = torch.zeros_like(img) if fill is None else fill
    s0 = score(model, timm_features(model, img[None]), label)
    out = np.zeros((gh, gw))
    for r in range(gh):
        for c in range(gw):
            x = img.clone()
            x[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = fill[:, r * p:(r + 1) * p, c * p:(c + 1) * p]
            out[r, c] = drop(model, s0, score(model, timm_features(model, x[None]), label))
    return out


def ref_token_drop(model, vit, img, label, drop_tokens=None):
    """With drop_tokens=None: the map; else the score with those patch indices dropped."""
    T = model.num_prefix_tokens
    tokens = timm_embed(model, img[None])
    s0 = score(model, timm_tokens(model, tokens), label)
    if drop_tokens is not None:
        keep = [i for i in range(tokens.shape[1]) if i - T not in set(drop_tokens)]
        return s0, score(model, timm_tokens(model, tokens[:, keep]), label)
    out = np.zeros(vit.num_patches)
    for t in range(vit.num_patches):
        keep = [i for i in range(tokens.shape[1]) if i != T + t]
        out[t] = drop(model, s0, score(model, timm_tokens(model, tokens[:, keep]), label))
    return out.reshape(vit.grid)


def timm_attention(model, img, label=None):
    """Every block's pattern [L, H, N, N] from timm's forward and, with a label, d logit / d pattern."""
    store = []

    def grab(module, inputs, output):
        inputs[0].retain_grad()
        store.append(inputs[0])

    handles = [blk.attn.attn_drop.register_forward_hook(grab) for blk in model.blocks]
    try:
        with torch.enable_grad():
            logits = model(img[None].clone().requires_grad_(True))
            if label is not None:
                logits[0, label].backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    A = torch.cat([a.detach() for a in store]).double()
    G = None if label is None else torch.cat([a.grad for a in store]).double()
    return A.numpy(), (None if G is None else G.numpy())


def ref_rollout(model, vit, img):
    A, _ = timm_attention(model, img)
    N = A.shape[-1]
    Bs = []
    for l in range(A.shape[0]):
        B = 0.5 * A[l].mean(0) + 0.5 * np.eye(N)
        Bs.append(B / B.sum(1, keepdims=True))
    R = np.linalg.multi_dot(Bs[::-1]) if len(Bs) > 1 else Bs[0]    # B_{L-1} ... B_0
    return R[0, vit.num_prefix_tokens:].reshape(vit.grid)


def ref_grad_rollout(model, vit, img, label):
    A, G = timm_attention(model, img, label)
    N = A.shape[-1]
    factors = [np.eye(N) + np.maximum(G[l] * A[l], 0).mean(0) for l in range(A.shape[0])]
    R = np.linalg.multi_dot(factors[::-1])   # (I + Abar_{L-1}) ... (I + Abar_0)
    return R[0, vit.num_prefix_tokens:].reshape(vit.grid)


@pytest.mark.parametrize("variant", VARIANTS)
def test_maps_equal_plain_references(variant):
    model, vit = build(variant)
    img = image_for(vit)
    label = 1 if vit.has_head else None
    maps = patch_maps(vit, img, label)
    assert set(maps) == set(MAPS if vit.has_head else MAPS[:3])
    for m in maps.values():
        assert m.shape == vit.grid and m.dtype == np.float64
    np.testing.assert_allclose(maps["occlusion"], ref_occlusion(model, vit, img, label), atol=2e-6)
    np.testing.assert_allclose(maps["token_drop"], ref_token_drop(model, vit, img, label), atol=2e-6)
    np.testing.assert_allclose(maps["rollout"], ref_rollout(model, vit, img), atol=1e-6, rtol=1e-5)
    assert np.abs(maps["occlusion"]).max() > 1e-5 and np.abs(maps["token_drop"]).max() > 1e-5
    if vit.has_head:
        ref = ref_grad_rollout(model, vit, img, label)
        assert np.abs(ref).max() > 1e-5
        np.testing.assert_allclose(maps["grad_rollout"], ref, atol=1e-6, rtol=1e-4)
        assert all(p.grad is None for p in model.parameters())


def ref_blur(img, sigma: float, radius: int):
    """The image blurred by a Gaussian of ``sigma`` px: an explicit 2-D kernel, (2 radius + 1)^2 taps,
    the image reflected (without repeating the edge pixel) at its border."""
    x = np.arange(-radius, radius + 1)
    k1 = np.exp(-0.5 * (x / sigma) ** 2)
    kernel = np.outer(k1, k1) / np.outer(k1, k1).sum()
    a = np.pad(img.numpy().astype(np.float64), ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
    out = np.zeros(img.shape)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out += kernel[dy, dx] * a[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]
    return torch.from_numpy(out).float()


@pytest.mark.parametrize("variant", ["cls", "backbone"])
def test_occlusion_baselines_equal_plain_references(variant):
    """Black: each channel's (0 - mean) / std; blur: the image blurred with sigma = p / 2 px."""
    model, vit = build(variant)
    img = image_for(vit)
    label = 1 if vit.has_head else None
    mean, std = (torch.tensor(vit.data_config[k]).view(3, 1, 1) for k in ("mean", "std"))
    fills = {"black": ((torch.zeros_like(img) - mean) / std),
             "blur": ref_blur(img, vit.patch_size / 2, vit.patch_size)}
    maps = {b: patch_maps(vit, img, label, maps=["occlusion"], occlusion_baseline=b)["occlusion"] for b in fills}
    for b, fill in fills.items():
        np.testing.assert_allclose(maps[b], ref_occlusion(model, vit, img, label, fill), atol=2e-6)
    assert np.abs(maps["black"] - maps["blur"]).max() > 1e-5  # the baseline matters
    with pytest.raises(HeadScopeError, match="Unknown occlusion baseline 'grey': use 'mean', 'black', 'blur'"):
        patch_maps(vit, img, label, occlusion_baseline="grey")


def test_unlabelled_classifier_explains_top1_and_patch_subset():
    model, vit = build("cls")
    img = image_for(vit)
    with torch.no_grad():
        top1 = int(model(img[None])[0].argmax())
    np.testing.assert_allclose(patch_maps(vit, img, None, maps=["grad_rollout"])["grad_rollout"],
                               patch_maps(vit, img, top1, maps=["grad_rollout"])["grad_rollout"])
    sub = patch_maps(vit, img, 2, maps=("occlusion", "token_drop"), patches=[0, 5])
    full = patch_maps(vit, img, 2, maps=("occlusion", "token_drop"))
    for name in sub:
        flat, ref = sub[name].ravel(), full[name].ravel()
        np.testing.assert_allclose(flat[[0, 5]], ref[[0, 5]], atol=1e-7)  # float32 batch sizes differ
        assert np.isnan(np.delete(flat, [0, 5])).all()


@pytest.mark.parametrize("variant", ["cls", "reg"])
def test_head_saliency_alignment_is_spearman_of_cls_rows(variant):
    model, vit = build(variant)
    img = image_for(vit)
    occ = patch_maps(vit, img, 1, maps=["occlusion"])["occlusion"]
    A, _ = timm_attention(model, img)
    T = vit.num_prefix_tokens
    expected = np.array([[spearmanr(A[l, h, 0, T:], occ.ravel())[0] for h in range(vit.num_heads)]
                         for l in range(vit.depth)])
    got = head_saliency_alignment(vit, occ, image=img)
    assert got.shape == (vit.depth, vit.num_heads)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    np.testing.assert_allclose(head_saliency_alignment(vit, occ, attention=A), expected, atol=1e-9)


def test_map_agreement_is_pairwise_spearman():
    model, vit = build("cls")
    maps = patch_maps(vit, image_for(vit), 1)
    agree = map_agreement(maps)
    for a in maps:
        for b in maps:
            assert agree.loc[a, b] == pytest.approx(spearmanr(maps[a].ravel(), maps[b].ravel())[0], abs=1e-12)


@pytest.mark.parametrize("variant", ["cls", "avgpool", "backbone"])
def test_deletion_curve(variant):
    model, vit = build(variant)
    img = image_for(vit)
    label = 2 if vit.has_head else None
    maps = patch_maps(vit, img, label, maps=["occlusion", "rollout"])
    curves = deletion_curves(vit, img, label, maps, steps=[0, 1, 3])
    metric = "prob" if vit.has_head else "emb_dist"
    assert list(curves.columns) == ["map", "n", metric] and len(curves) == 6
    for name, values in maps.items():
        top = np.argsort(-values.ravel(), kind="stable")
        for n in (0, 1, 3):
            s0, s = ref_token_drop(model, vit, img, label, drop_tokens=top[:n].tolist())
            expected = float(s[0]) if vit.has_head else drop(model, s0, s)
            got = curves[(curves["map"] == name) & (curves["n"] == n)][metric].item()
            assert got == pytest.approx(expected, abs=2e-6)
    at0 = curves[curves["n"] == 0][metric].to_numpy()
    if vit.has_head:  # n = 0 is the unpruned P(y) of timm's own forward
        with torch.no_grad():
            p = torch.softmax(model(img[None]).double(), -1)[0, label].item()
        np.testing.assert_allclose(at0, p, atol=1e-6)
    else:
        np.testing.assert_allclose(at0, 0, atol=1e-12)
    default = deletion_curves(vit, img, label, {"rollout": maps["rollout"]})
    assert default["n"].iloc[0] == 0 and default["n"].iloc[-1] == (vit.num_patches if variant != "avgpool"
                                                                    else vit.num_patches - 1)


def test_bad_inputs():
    _, vit = build("cls")
    _, backbone = build("backbone")
    img = image_for(vit)
    with pytest.raises(HeadScopeError, match="backbone"):
        patch_maps(backbone, image_for(backbone), None, maps=["grad_rollout"])
    with pytest.raises(HeadScopeError, match="grid"):
        patch_maps(vit, torch.randn(3, 48, 48), 1)
    with pytest.raises(HeadScopeError, match="outside the 4x4 grid"):
        patch_maps(vit, img, 1, maps=["occlusion"], patches=[3, 16])
    with pytest.raises(HeadScopeError, match="Unknown patch maps"):
        patch_maps(vit, img, 1, maps=["saliency"])
    with pytest.raises(HeadScopeError, match="one preprocessed image"):
        patch_maps(vit, torch.randn(2, 3, 64, 64), 1)
    with pytest.raises(HeadScopeError, match="classes"):
        patch_maps(vit, img, 99, maps=["rollout", "occlusion"])
    with pytest.raises(HeadScopeError, match="16 patches"):
        head_saliency_alignment(vit, np.zeros(9), image=img)
    with pytest.raises(HeadScopeError, match="outside 0-16"):
        deletion_curves(vit, img, 1, {"rollout": np.zeros((4, 4))}, steps=[0, 17])
    torch.manual_seed(0)
    no_cls = load_vit(timm.create_model("vit_tiny_patch16_224", img_size=48, depth=1, num_classes=3,
                                        class_token=False, global_pool="avg"))
    with pytest.raises(HeadScopeError, match="no prefix token"):
        patch_maps(no_cls, torch.randn(3, 48, 48), 0, maps=["rollout"])
    assert set(patch_maps(no_cls, torch.randn(3, 48, 48), 0)) == {"occlusion", "token_drop"}


# ---- the build option: precomputed maps and the registry metric ---------------------------------

@pytest.fixture(scope="module")
def maps_run(tiny):
    """A tiny run built with --patch-maps, interrupted after its first batch and resumed."""
    from analysis.runs import build
    from analysis.runs.reader import open_run

    cfg = tiny["config"]("maps", stages=["patch_maps"])
    build.run_image_stage(cfg, range(5))          # an interrupted build: the first batch only
    assert build.finished_images(cfg.run_dir) == set(range(5))
    build.build(tiny["config"]("maps", stages=["patch_maps"]))   # resumes the other images, merges
    return open_run(cfg.run_dir)


def test_build_option_precomputes_maps_and_alignment(maps_run, tiny):
    from analysis.datasets import open_image
    from analysis.models.adapter import model_from_manifest
    from analysis.cli import build_parser, make_config

    assert make_config(build_parser().parse_args(["--patch-maps", "--out", str(tiny["root"] / "x")])).stages == ["patch_maps"]
    run = maps_run
    assert run.has_patch_maps and "saliency_alignment" in run.metrics
    vit = model_from_manifest(run.model)
    dense = run.dense("saliency_alignment")
    assert dense.shape == (len(run.images), vit.depth, vit.num_heads) and np.isfinite(dense).mean() > 0.9
    for pos in (0, 7):
        row = run.images.iloc[pos]
        x = vit.preprocess([open_image(row.path)])[0]
        maps = patch_maps(vit, x, int(row.label))
        stored = run.patch_maps(int(row.image_id))
        assert set(stored) == set(MAPS)
        for name in MAPS:
            np.testing.assert_allclose(stored[name], maps[name], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(dense[pos], head_saliency_alignment(vit, maps["occlusion"], image=x), atol=1e-6)
    assert run.patch_maps(10_000) is None   # an image the run does not have


def test_online_query_and_transport(maps_run, tiny):
    from analysis.datasets import open_image
    from analysis.runs import build
    from analysis.serving import transport
    from analysis.models.adapter import model_from_manifest
    from analysis.serving.service import ModelService, ResultCache

    plain_dir = tiny["root"] / "plain"
    build.build(tiny["config"]("plain"))
    service = ModelService(device="cpu", cache=ResultCache(max_items=64))
    vit = model_from_manifest(maps_run.model)
    row = maps_run.images.iloc[2]
    x = vit.preprocess([open_image(row.path)])[0]
    expected = patch_maps(vit, x, int(row.label))
    for run_dir, precomputed in ((maps_run.path, True), (plain_dir, False)):
        out = service.patch_maps(run_dir, int(row.image_id))
        assert out["precomputed"] is precomputed and out["target"] == int(row.label)
        assert service.patch_maps(run_dir, int(row.image_id)) is out            # cached per (run, image)
        for name in MAPS:
            np.testing.assert_allclose(np.array(out["maps"][name], float), expected[name], rtol=1e-5, atol=1e-7)
        assert out["agreement"]["occlusion"]["occlusion"] == pytest.approx(1.0)
        np.testing.assert_allclose(np.array(out["alignment"], float),
                                   head_saliency_alignment(vit, expected["occlusion"], image=x), atol=1e-6)
    curves = transport.deletion_curves(plain_dir, int(row.image_id))
    assert curves["metric"] == "prob" and curves["n"][0] == 0 and set(curves["curves"]) == set(MAPS)
    with torch.no_grad():
        p = torch.softmax(vit.model(x[None]).double(), -1)[0, int(row.label)].item()
    assert all(v[0] == pytest.approx(p, abs=1e-6) for v in curves["curves"].values())
    assert transport.patch_maps(plain_dir, int(row.image_id))["maps"].keys() == set(MAPS)
    with pytest.raises(transport.OnlineError, match="not in run"):
        transport.patch_maps(plain_dir, 999)
    with pytest.raises(transport.OnlineError, match="integer"):
        transport.patch_maps(plain_dir, "x")
    # another occlusion baseline: occlusion computed now (the stored maps used the mean colour), the rest kept
    blurred = service.patch_maps(maps_run.path, int(row.image_id), "blur")
    assert blurred["baseline"] == "blur" and blurred["precomputed"] and not blurred["occlusion_precomputed"]
    np.testing.assert_allclose(np.array(blurred["maps"]["occlusion"], float),
                               patch_maps(vit, x, int(row.label), maps=["occlusion"], occlusion_baseline="blur")["occlusion"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.array(blurred["maps"]["rollout"], float), expected["rollout"], rtol=1e-5, atol=1e-7)
    assert set(transport.deletion_curves(plain_dir, int(row.image_id), "black")["curves"]) == set(MAPS)
    with pytest.raises(transport.OnlineError, match="Unknown occlusion baseline 'x'"):
        transport.patch_maps(plain_dir, int(row.image_id), "x")
