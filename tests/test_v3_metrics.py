"""SPEC v3 metrics in the build's image stage: direct_logit, logit_drop, indirect_logit (direct_emb
for a backbone), prefix_share, high_norm_share, high_norm_count and the token norms, as stored by a
real build and read back, against plain references written in tests/test_circuits.py (blocks by
hand head by head, the read-out with its LayerNorms' 1/sigma frozen by hand, one full forward of the
model with its own pruning per head, per-head numpy loops for the sinks); the real default model;
synthetic runs; what an old run says about them."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from analysis.datasets import load_image_set, open_image
from analysis.errors import CacheError
from analysis.metrics.engine import analyse_batch
from analysis.metrics.sinks import DEFAULT_FACTOR
from analysis.models.adapter import load_vit, model_from_manifest
from analysis.runs import build
from analysis.runs.reader import open_run
from analysis.runs.synthetic import make_run
from analysis.runs.tables import write_run
from conftest import embedded_default_missing
from test_circuits import Reference, pruned_logits, ref_sinks

pytestmark = pytest.mark.usefixtures("one_thread")
LOGIT_METRICS = ("direct_logit", "logit_drop", "indirect_logit")
SINK_METRICS = ("prefix_share", "high_norm_share", "high_norm_count")


def save_model(path, num_classes: int, seed: int = 0):
    """A vit_tiny_patch16_224 at 64 px (4 x 4 patches, 12 layers x 3 heads) with weights that make its
    heads write something the read-out sees (timm's 0.02 initialisation writes almost nothing)."""
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=num_classes)
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.1)
        for blk in m.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.in_features] *= 3.0
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def image_folder(root, seed: int = 0):
    """Classes a, b, c with two images each, plus one loose (unlabelled) image: grey pictures with one
    or two squares of strong noise, whose patch tokens have high norms at block 0."""
    rng = np.random.default_rng(seed)
    paths = [root / c / f"{i}.png" for c in "abc" for i in range(2)] + [root / "loose.png"]
    for k, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        im = np.full((64, 64, 3), 128, np.uint8)
        for _ in range(1 + k % 2):
            r, c = rng.integers(0, 3, 2) * 16 + 8
            im[r:r + 16, c:c + 16] = rng.integers(0, 255, (16, 16, 3))
        Image.fromarray(im).save(path)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A classifier run (7 images, one unlabelled, two batches) and a backbone run, built for real."""
    root = tmp_path_factory.mktemp("v3")
    folder = image_folder(root / "images")
    out = {}
    for kind, classes in (("classifier", 3), ("backbone", 0)):
        weights = save_model(root / f"{kind}.safetensors", classes)
        config = build.BuildConfig(out=str(root / kind), model="vit_tiny_patch16_224", weights=str(weights),
                                   img_size=64, dataset=str(folder), dataset_kind="folder", batch_size=4, threads=1,
                                   progress=False, ae_epochs=1)
        assert build.build(config)["status"] == "complete"
        out[kind] = open_run(root / kind)
    return out


def run_inputs(run):
    """The run's model (reloaded from its manifest) and its images, preprocessed as the build did."""
    vit = model_from_manifest(run.model)
    x = vit.preprocess([open_image(p) for p in run.images.path])
    return vit, x


def reference_direct(model, x, labels=None):
    """direct_logit [B, L, H] (or direct_emb without labels): each head's write c[l,h] through the
    hand-written read-out with the norms frozen, minus the read-out's constant."""
    with torch.no_grad():
        ref = Reference(model, x)
        pooled, _ = ref.exact(ref.xs[-1])
        zero = ref.R(torch.zeros_like(ref.xs[-1]))
        B = x.shape[0]
        if labels is not None:
            idx, y = torch.arange(B), torch.as_tensor(labels).clamp_min(0)
            value = lambda p: (ref.R(p)[1] - zero[1])[idx, y]
        else:
            e = pooled - zero[0]
            value = lambda p: ((ref.R(p)[0] - zero[0]) * e).sum(-1) / (e * e).sum(-1)
        return np.stack([np.stack([value(c[:, h]).double().numpy() for h in range(c.shape[1])], 1)
                         for c in ref.c], 1)


def reference_drop(model, x, labels, L, H):
    """logit_y - logit_y with head (l, h) pruned: one full forward of the model's own per head."""
    idx, y = torch.arange(x.shape[0]), torch.as_tensor(labels).clamp_min(0)
    with torch.no_grad():
        clean = model(x)[idx, y].double()
        return np.stack([np.stack([(clean - pruned_logits(model, x, l, h)[idx, y].double()).numpy()
                                   for h in range(H)], 1) for l in range(L)], 1)


def test_classifier_build_stores_direct_effects_sinks_and_token_norms(runs):
    run = runs["classifier"]
    vit, x = run_inputs(run)
    L, H, T = run.L, run.H, vit.num_prefix_tokens
    labels = run.images.label.to_numpy().copy()
    known = labels >= 0
    assert known.sum() == 6 and (~known).sum() == 1  # the loose image has no label
    assert set(LOGIT_METRICS + SINK_METRICS) <= set(run.metrics) and "direct_emb" not in run.metrics
    direct = reference_direct(vit.model, x, labels)
    drop = reference_drop(vit.model, x, labels, L, H)
    want = {"direct_logit": direct, "logit_drop": drop, "indirect_logit": drop - direct}
    for name, values in want.items():
        got = run.dense(name)
        assert np.isnan(got[~known]).all(), name  # no true label: no value (like prob)
        np.testing.assert_allclose(got[known], values[known], rtol=1e-4, atol=1e-4, err_msg=name)  # float32 round-off
        assert np.abs(values[known]).max() > 1e-2, name  # heads that matter
        mean = np.nanmean(got.astype(np.float64), axis=0)
        np.testing.assert_allclose(run.summary(f"{name}_mean"), mean, rtol=1e-6, atol=1e-9, err_msg=name)
    alone = analyse_batch(vit, x, torch.as_tensor(labels), metrics=["indirect_logit"])["indirect_logit"]
    np.testing.assert_allclose(alone[known], want["indirect_logit"][known], rtol=1e-4, atol=1e-4)  # asked for alone
    prefix, share, count, norms = ref_sinks(vit.model, x, T, DEFAULT_FACTOR)
    np.testing.assert_allclose(run.dense("prefix_share"), prefix, atol=5e-5)  # float32 round-off through 12 blocks
    np.testing.assert_allclose(run.dense("high_norm_share"), share, atol=5e-5)
    np.testing.assert_array_equal(run.dense("high_norm_count"), np.repeat(count[:, :, None], H, 2))
    assert count[:, 0].max() >= 1 and share.max() > 0.01  # noisy squares make high-norm tokens, which heads attend to
    assert run.manifest["params"]["high_norm_factor"] == DEFAULT_FACTOR
    for k, image_id in enumerate(run.images.image_id):
        got = run.token_norms(image_id)
        assert got.dtype == np.float32 and got.shape == (L + 1, vit.num_tokens)
        np.testing.assert_allclose(got, norms[k], rtol=1e-5, atol=1e-5)
    assert run.token_norms(10_000) is None
    assert run.lacks("token_norms") is None and run.lacks("direct_logit") is None
    assert "direct_emb is defined for backbone models" in run.lacks("direct_emb")


def test_backbone_build_stores_direct_emb_and_no_logits(runs):
    run = runs["backbone"]
    vit, x = run_inputs(run)
    assert not vit.has_head
    assert "direct_emb" in run.metrics and not set(LOGIT_METRICS) & set(run.metrics)
    assert set(SINK_METRICS) <= set(run.metrics)
    np.testing.assert_allclose(run.dense("direct_emb"), reference_direct(vit.model, x), rtol=1e-4, atol=1e-6)
    assert "classifier" in run.lacks("logit_drop")
    assert run.token_norms(int(run.images.image_id[0])).shape == (run.L + 1, vit.num_tokens)


def test_an_old_run_says_how_to_add_them(runs, tmp_path):
    """A run written without the v3 arrays (as before they existed) names the command that adds them."""
    new = runs["classifier"]
    old_dir = tmp_path / "old"
    arrays = {m.name: new.dense(m.name) for m in new.metrics_of(level="image_head") if m.group not in ("direct", "sinks")}
    write_run(old_dir, new.manifest, new.images, arrays, L=new.L, H=new.H)
    old = open_run(old_dir)
    assert "prob_drop" in old.metrics and "direct_logit" not in old.metrics
    command = f"python scripts/build_cache.py --out {old_dir}-new --model vit_tiny_patch16_224 --weights"
    for name in LOGIT_METRICS + SINK_METRICS + ("token_norms",):
        assert command in old.lacks(name), name
        assert "--images" in old.lacks(name) and "--img-size 64" in old.lacks(name)
    with pytest.raises(CacheError, match="build_cache.py --out"):
        old.token_norms(0)
    with pytest.raises(CacheError, match="build_cache.py --out"):
        old.dense("direct_logit")


def test_resume_refuses_parts_of_an_older_headscope(tmp_path):
    """A build interrupted before the v3 metrics and resumed after: the old parts lack their arrays,
    and the merge names them and how to recompute them instead of misaligning the images."""
    n = 3
    new = {"prob": np.zeros((2, 1, 1)), "direct_logit": np.zeros((2, 1, 1))}
    build.write_part(tmp_path, [0], {"prob": np.zeros((1, 1, 1))}, [], 0.1)
    build.write_part(tmp_path, [1, 2], new, [], 0.1)
    with pytest.raises(CacheError, match=r"older HeadScope and lack direct_logit.*rm .*part_000000\.npz.*--resume"):
        build.collect_parts(tmp_path, n)


def test_synthetic_runs_have_plausible_v3_values(tmp_path):
    run = open_run(make_run(tmp_path / "syn", n_images=12, layers=4, heads=3, grid=4))
    L, H, N = 4, 3, 17
    direct, drop, indirect = (run.dense(m).astype(np.float64) for m in LOGIT_METRICS)
    np.testing.assert_allclose(indirect, drop - direct, atol=1e-5)
    assert drop.max() > 1 and "direct_emb" not in run.metrics  # a synthetic model is a classifier
    for name in ("prefix_share", "high_norm_share"):
        assert 0 <= run.dense(name).min() and run.dense(name).max() <= 1
    norms = np.stack([run.token_norms(i) for i in run.images.image_id])
    assert norms.shape == (12, L + 1, N) and norms.dtype == np.float32
    patches = norms[:, :L, 1:]
    count = (patches > DEFAULT_FACTOR * np.median(patches, -1, keepdims=True)).sum(-1)
    np.testing.assert_array_equal(run.dense("high_norm_count"), np.repeat(count[:, :, None], H, 2))
    assert count.max() >= 1 and (run.dense("high_norm_share")[count[:, :, None].repeat(H, 2) == 0] == 0).all()


def test_default_model_image_stage():
    """The real default model: the image stage's v3 arrays for two images against the references."""
    if missing := embedded_default_missing():
        pytest.skip(missing)
    vit = load_vit("default")
    items = load_image_set("fashion", limit=20, seed=0).items[:2]
    x = vit.preprocess([open_image(it.ref) for it in items])
    labels = np.array([it.label for it in items])
    r = analyse_batch(vit, x, torch.as_tensor(labels), semantic=False)
    L, H = vit.depth, vit.num_heads
    direct = reference_direct(vit.model, x, labels)
    drop = reference_drop(vit.model, x, labels, L, H)
    np.testing.assert_allclose(r["direct_logit"], direct, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(r["logit_drop"], drop, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(r["indirect_logit"], drop - direct, rtol=1e-4, atol=1e-4)
    prefix, share, count, norms = ref_sinks(vit.model, x, vit.num_prefix_tokens, DEFAULT_FACTOR)
    np.testing.assert_allclose(r["prefix_share"], prefix, atol=1e-5)
    np.testing.assert_allclose(r["high_norm_share"], share, atol=1e-5)
    np.testing.assert_array_equal(r["high_norm_count"], np.repeat(count[:, :, None], H, 2))
    np.testing.assert_allclose(r["token_norms"], norms, rtol=1e-4, atol=1e-4)
