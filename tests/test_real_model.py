"""The engine on the real path: the embedded pretrained DINOv2 ViT-S/14 and real images."""
import numpy as np
import pytest
import torch

from analysis import attention_strength, head_importance, load_vit, partial_pruning
from analysis.datasets import load_image_set, open_image
from test_importance import reference_metrics

HEADS = [(0, 0), (5, 3), (11, 5)]


@pytest.fixture(scope="module")
def fashion_batch():
    vit = load_vit("default")
    items = load_image_set("fashion", limit=20, seed=0).items[:3]
    images = vit.preprocess([open_image(it.ref) for it in items])
    labels = torch.tensor([it.label for it in items])
    return vit, images, labels


def test_default_classifier_importance_equals_leave_one_out_loop(fashion_batch):
    vit, images, labels = fashion_batch
    assert (vit.depth, vit.num_heads, vit.grid, vit.num_classes) == (12, 6, (8, 8), 10)
    df = head_importance(vit, images, labels)
    for layer, head in HEADS:
        ref = reference_metrics(vit.model, images, labels, layer, head, 1)
        got = df[(df.layer == layer) & (df["head"] == head)].sort_values("image")
        for metric, values in ref.items():
            np.testing.assert_allclose(got[metric].to_numpy(), values, atol=5e-6, rtol=1e-4, err_msg=f"{metric} {layer},{head}")
    # a trained model: pruning changes something somewhere, and the JSD stays a proper divergence
    assert df.jsd.between(0, 1).all() and df.jsd.max() > 1e-4


def test_default_partial_pruning_and_strength(fashion_batch):
    vit, images, labels = fashion_batch
    pp = partial_pruning(vit, images[0], int(labels[0]), 11, 5)
    assert len(pp) == 8 and all(len(c) == 5 for c in pp.top5_classes)
    ref = reference_metrics(vit.model, images[:1], labels[:1], 11, 5, "R2")
    assert pp.iloc[3].prob == pytest.approx(float(ref["prob"][0]), abs=5e-6)
    st = attention_strength(vit, images)
    assert len(st) == 3 * 12 * 6 and st.strength.map(len).eq(8).all()
    assert st.strength_entropy.between(0, 1).all() and (st.mean_distance_px > 0).all()


def test_default_backbone_emb_dist_on_a_photo():
    vit = load_vit("default-backbone")
    assert (vit.has_head, vit.grid, vit.img_size) == (False, (16, 16), (224, 224))
    photos = load_image_set("photos", limit=2, seed=0)
    images = vit.preprocess([open_image(it.ref) for it in photos.items[:1]])
    df = head_importance(vit, images, None)
    assert df[["prob", "prob_drop", "jsd"]].isna().all().all()
    for layer, head in HEADS[1:]:
        ref = reference_metrics(vit.model, images, None, layer, head, 1)
        got = df[(df.layer == layer) & (df["head"] == head)].iloc[0]
        for metric in ("emb_dist", "cls_dist", "patch_dist"):
            assert got[metric] == pytest.approx(float(ref[metric][0]), abs=5e-6, rel=1e-4), metric
