"""The HuggingFace family against HF's own forward: checkpoint folders written by save_pretrained
(random weights, no hub), attention, outputs, pruning, preprocessing, clear refusals, a build."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import load_vit
from analysis.errors import ModelLoadError
from analysis.models.pruning import keep_mask

from hf_models import ARCHS, hf_reference, make_hf, prefix_tokens, pruned, save_hf, transformers

HEADED = {"ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher",
          "Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"}
EXPECTED_T = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": 5}


def eager(folder, arch):
    """The same checkpoint loaded by transformers itself (eager attention, so it returns the patterns)."""
    return getattr(transformers, arch).from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_attention_and_outputs_equal_hf(arch, tmp_path):
    folder = save_hf(make_hf(arch), tmp_path / arch)
    vit = load_vit(folder)
    ref = eager(folder, arch)
    assert vit.family.family == "hf" and vit.name == folder and len(vit.weights_sha256) == 64
    assert vit.num_prefix_tokens == EXPECTED_T[ARCHS[arch]] == prefix_tokens(ref)
    assert (vit.depth, vit.num_heads, vit.head_dim, vit.embed_dim) == (3, 2, 16, 32)
    assert vit.num_classes == (5 if arch in HEADED else 0) and vit.has_head == (arch in HEADED)
    assert vit.pool_reads_prefix_only == ("Dinov2" not in arch or arch not in HEADED)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *vit.img_size)
    with torch.no_grad():
        out = ref(x, output_attentions=True)
    expected_A = torch.stack(out.attentions, 1)
    A = vit.capture_attention(x)
    assert A.shape == expected_A.shape == (2, 3, 2, vit.num_tokens, vit.num_tokens)
    torch.testing.assert_close(A, expected_A, atol=1e-6, rtol=1e-5)
    logits, pooled, _ = hf_reference(ref, x, layer=0)
    torch.testing.assert_close(vit(x), logits if vit.has_head else pooled, atol=2e-5, rtol=1e-5)
    if vit.has_head:
        torch.testing.assert_close(vit(x), out.logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(vit.outputs(vit.blocks(vit.embed(x)))[0], pooled, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
                                  "Dinov2WithRegistersForImageClassification", "Dinov2Model"])
def test_pruning_a_head_equals_hf_with_that_head_zeroed(arch, tmp_path):
    """Mode 1 against HF's forward with the head's slice of the concatenated head outputs zeroed
    (a forward pre-hook on o_proj: A = 0 for that head), and modes 2-7 against HF's forward with
    the pruned entries zeroed in the attention function."""
    folder = save_hf(make_hf(arch, seed=3), tmp_path / arch)
    vit, ref = load_vit(folder), eager(folder, arch)
    torch.manual_seed(2)
    x = torch.randn(2, 3, *vit.img_size)
    layer, head, d = 1, 1, vit.head_dim

    def zero_head(module, inputs):
        o = inputs[0].clone()
        o[..., head * d:(head + 1) * d] = 0
        return (o,)

    base = ref.base_model
    layers = base.layers if hasattr(base, "layers") else base.encoder.layer
    handle = layers[layer].attention.o_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            out = ref(x)
    finally:
        handle.remove()
    expected = out.logits if vit.has_head else out.last_hidden_state[:, 0]
    got = vit(x, prune=[(layer, head, 1)])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert (got - vit(x)).abs().max() > 1e-4  # the head mattered
    for mode in range(2, 8):
        keep = keep_mask(mode, vit.num_tokens, vit.num_prefix_tokens)
        logits, pooled, _ = hf_reference(ref, x, layer, head, keep)
        torch.testing.assert_close(vit(x, prune=[(layer, head, mode)]), logits if vit.has_head else pooled,
                                   atol=2e-5, rtol=1e-5, msg=lambda m: f"mode {mode}: {m}")
    with pruned(ref, layer, head, keep_mask(3, vit.num_tokens, vit.num_prefix_tokens)), torch.no_grad():
        A_ref = torch.stack(ref(x, output_attentions=True).attentions, 1)
    with vit.prune([(layer, head, 3)]):
        torch.testing.assert_close(vit.capture_attention(x), A_ref, atol=1e-6, rtol=1e-5)


def test_dinov2_runs_at_its_preprocessing_size_with_hf_interpolation(tmp_path):
    """Like the hub's DINOv2 (config 518 px, crop 224): position embeddings interpolated by HF."""
    arch = "Dinov2WithRegistersForImageClassification"
    pre = {"do_resize": True, "size": {"shortest_edge": 48}, "resample": 3, "do_center_crop": True,
           "crop_size": {"height": 42, "width": 42}, "do_normalize": True,
           "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    folder = save_hf(make_hf(arch), tmp_path / "d", preprocessor=pre)
    vit, ref = load_vit(folder), eager(folder, arch)
    assert vit.img_size == (42, 42) and vit.grid == (3, 3) and vit.num_tokens == 5 + 9
    assert ref.config.image_size == 56  # the checkpoint's own grid is 4x4
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        out = ref(x, output_attentions=True)
    torch.testing.assert_close(vit(x), out.logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(vit.capture_attention(x), torch.stack(out.attentions, 1), atol=1e-6, rtol=1e-5)


def test_vit_at_another_size_interpolates_like_hf(tmp_path):
    folder = save_hf(make_hf("ViTForImageClassification"), tmp_path / "v")
    vit, ref = load_vit(folder, img_size=48), eager(folder, "ViTForImageClassification")
    assert vit.img_size == (48, 48) and vit.grid == (6, 6) and vit.data_config["input_size"] == (3, 48, 48)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected = ref(x, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(vit(x), expected, atol=2e-5, rtol=1e-5)


def test_preprocessing_and_labels_come_from_the_folder(tmp_path):
    """preprocessor_config.json (resize, crop, mean/std) as HF's own image processor applies it;
    class names from id2label."""
    pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 40, "width": 40},
           "resample": 2, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.4, 0.3],
           "image_std": [0.2, 0.25, 0.3]}
    model = make_hf("DeiTForImageClassification", num_labels=3)
    model.config.id2label = {0: "cat", 1: "dog", 2: "owl"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    folder = save_hf(model, tmp_path / "deit", preprocessor=pre)
    vit = load_vit(folder)
    assert vit.class_names == ["cat", "dog", "owl"]
    assert vit.data_config["mean"] == (0.5, 0.4, 0.3) and vit.data_config["std"] == (0.2, 0.25, 0.3)
    assert vit.data_config["input_size"] == (3, 32, 32) and vit.data_config["interpolation"] == "bilinear"
    yy, xx = np.mgrid[0:60, 0:50]
    image = Image.fromarray(np.stack([xx * 5, yy * 4, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8))
    got = vit.preprocess([image])
    expected = transformers.AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt").pixel_values
    assert got.shape == expected.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)  # resampling kernels differ slightly
    # without preprocessor_config.json: config image_size and the ImageNet mean/std; HF's LABEL_i are no names
    plain = load_vit(save_hf(make_hf("ViTModel"), tmp_path / "plain"))
    assert plain.img_size == (32, 32) and plain.data_config["mean"] == (0.485, 0.456, 0.406)
    assert plain.class_names is None and load_vit(save_hf(make_hf("ViTForImageClassification"),
                                                          tmp_path / "lab")).class_names is None


LEGACY = {  # transformers 5 -> 4 key names besides the attention's (which all families share)
    "ViTForImageClassification": [(r"\.layers\.(\d+)\.", r".encoder.layer.\1."),
                                  (r"mlp\.fc1", "intermediate.dense"), (r"mlp\.fc2", "output.dense")],
    "Dinov2ForImageClassification": [],
}


@pytest.mark.parametrize("arch", list(LEGACY))
def test_a_checkpoint_in_the_transformers_4_layout_loads(arch, tmp_path):
    """Hub checkpoints were written by transformers 4 (attention.attention.query, encoder.layer, ...):
    transformers renames their keys on load, and HeadScope reads the result."""
    import re

    from safetensors.torch import load_file, save_file

    model = make_hf(arch)
    folder = save_hf(model, tmp_path / "legacy")
    renames = LEGACY[arch] + [(r"attention\.([qkv])_proj", lambda m: "attention.attention." + {
        "q": "query", "k": "key", "v": "value"}[m.group(1)]), (r"attention\.o_proj", "attention.output.dense")]
    sd = load_file(str(tmp_path / "legacy" / "model.safetensors"))
    old = {}
    for key, value in sd.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        old[key] = value
    assert any("attention.attention.query" in k for k in old)
    save_file(old, str(tmp_path / "legacy" / "model.safetensors"), metadata={"format": "pt"})
    vit = load_vit(folder)
    x = torch.randn(1, 3, *vit.img_size)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), model(x).logits, atol=2e-5, rtol=1e-5)


def test_a_built_hf_module_loads_too():
    """A module instead of a folder (config image size, ImageNet mean/std); DINOv2 with SwiGLU MLPs."""
    model = make_hf("Dinov2ForImageClassification", use_swiglu_ffn=True)
    vit = load_vit(model)
    x = torch.randn(1, 3, *vit.img_size)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), model(x).logits, atol=2e-5, rtol=1e-5)


def test_unsupported_and_unsafe_folders_are_refused(tmp_path):
    swin = tmp_path / "swin"
    transformers.SwinModel(transformers.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                                   image_size=32, patch_size=4, window_size=4)).save_pretrained(swin)
    supported = r"SwinModel.*not supported.*ViTForImageClassification.*DeiTModel.*Dinov2Model"
    with pytest.raises(ModelLoadError, match=supported):
        load_vit(str(swin))
    with pytest.raises(ModelLoadError, match="SwinModel is not supported"):
        load_vit(transformers.SwinModel(transformers.SwinConfig(embed_dim=16, depths=[1], num_heads=[1])))
    folder = save_hf(make_hf("ViTModel"), tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").rename(tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pytorch_model.bin.*pickle.*save_pretrained"):
        load_vit(folder)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vit(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vit(str(tmp_path / "empty"))
    ok = save_hf(make_hf("ViTModel"), tmp_path / "ok")
    with pytest.raises(ModelLoadError, match="brings its own weights"):
        load_vit(ok, weights=str(tmp_path / "ok" / "model.safetensors"))
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not fit its config.json|Could not load"):
        load_vit(ok)


def test_build_cache_builds_and_reloads_an_hf_run(tmp_path):
    """scripts/build_cache.py --model FOLDER builds a run exactly like a timm model; the service
    reloads the model from the run's manifest (the folder path)."""
    import subprocess
    import sys
    from pathlib import Path

    from analysis import head_importance
    from analysis.datasets import open_image
    from analysis.runs.reader import open_run
    from analysis.models.adapter import model_from_manifest

    model = make_hf("ViTForImageClassification", num_labels=2)
    model.config.id2label, model.config.label2id = {0: "a", 1: "b"}, {"a": 0, "b": 1}
    folder = save_hf(model, tmp_path / "hf_vit")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{i}.png")
    out = tmp_path / "run"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "scripts/build_cache.py", "--model", folder, "--images",
                           str(tmp_path / "images"), "--out", str(out), "--batch-size", "3", "--threads", "1",
                           "--ae-epochs", "1", "--quiet"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = open_run(out)
    assert run.model["name"] == str(Path(folder).resolve()) and run.model["family"] == "hf"
    assert run.model["class_names"] == ["a", "b"] and run.model["prefix_tokens"] == 1
    assert "transformers" in run.manifest["versions"] and len(run.head_metrics) == 6 * 3 * 2
    vit = model_from_manifest(run.model)
    x = vit.preprocess([open_image(p) for p in run.images.path])
    ref = head_importance(vit, x, torch.tensor(run.images.label.to_numpy()))
    hm = run.head_metrics.sort_values(["image_id", "layer", "head"])
    ref["image_id"] = run.images.image_id.to_numpy()[ref.image]
    ref = ref.sort_values(["image_id", "layer", "head"])
    for m in ("prob", "jsd", "cls_dist", "patch_dist", "emb_dist"):
        np.testing.assert_allclose(hm[m].to_numpy(np.float64), ref[m].to_numpy(np.float64), rtol=1e-4, atol=1e-6,
                                   err_msg=m)
    # the dashboard opens it like a timm run: its online queries reload the folder
    from app import create_app

    client = create_app(run=str(out)).server.test_client()
    image_id = int(run.images.image_id.iloc[0])
    res = client.get(f"/api/partial_pruning?run={out.name}&image={image_id}&layer=1&head=0")
    assert res.status_code == 200, res.get_json()
    rows = sorted(res.get_json()["rows"], key=lambda r: r["mode"])
    x0 = vit.preprocess([open_image(run.images.path.iloc[0])])
    pruned_probs = torch.softmax(vit(x0, prune=[(1, 0, 1)]), -1)[0]
    assert rows[1]["prob"] == pytest.approx(float(pruned_probs[int(run.images.label.iloc[0])]), rel=1e-5)
    res = client.get(f"/api/attention?run={out.name}&image={image_id}&layer=2&head=1")
    assert res.status_code == 200, res.get_json()
    np.testing.assert_allclose(np.array(res.get_json()["attention"]),
                               vit.capture_attention(x0, layers=[2])[0, 0, 1].numpy(), atol=1e-3)  # float16 transport
