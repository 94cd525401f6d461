"""The adapter's shape facts, preprocessing and clear errors for bad input."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from analysis import load_vit
from analysis.errors import InputError, ModelLoadError, WeightsMismatchError


@pytest.mark.parametrize("name,T,grid,patch", [
    ("vit_tiny_patch16_224", 1, (14, 14), 16),
    ("vit_base_patch32_384", 1, (12, 12), 32),
    ("vit_small_patch8_224", 1, (28, 28), 8),
    ("deit_tiny_distilled_patch16_224", 2, (14, 14), 16),
    ("deit3_small_patch16_224", 1, (14, 14), 16),
    ("vit_small_patch14_reg4_dinov2", 5, (37, 37), 14),
])
def test_shape_facts_of_the_timm_family(name, T, grid, patch):
    vit = load_vit(timm.create_model(name, pretrained=False))
    assert (vit.num_prefix_tokens, vit.grid, vit.patch_size) == (T, grid, patch)
    assert vit.num_tokens == T + grid[0] * grid[1]
    assert vit.data_config["input_size"] == (3, *vit.img_size)
    assert "mean" in vit.data_config and "std" in vit.data_config


def test_name_with_weights_and_num_classes_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    vit = load_vit("vit_tiny_patch16_224", weights=path, img_size=32)
    assert vit.num_classes == 3 and len(vit.weights_sha256) == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), src.eval()(x))
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": src.state_dict()}, pth)
    assert load_vit("vit_tiny_patch16_224", weights=pth, img_size=32).num_classes == 3
    # without img_size, the input size comes from the checkpoint's position grid (2x2 -> 32 px)
    inferred = load_vit("vit_tiny_patch16_224", weights=path)
    assert inferred.img_size == (32, 32) and inferred.grid == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(inferred(x), src(x))


def test_preprocess_pil_images():
    from PIL import Image

    vit = load_vit(timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=2))
    batch = vit.preprocess([Image.new("L", (100, 80), 128), Image.new("RGB", (64, 64))])
    assert batch.shape == (2, 3, 64, 64)


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="Unknown model 'vit_tinny_patch16_224'.*vit_tiny_patch16_224"):
        load_vit("vit_tinny_patch16_224")


def test_not_a_vit():
    with pytest.raises(ModelLoadError, match="not a supported ViT"):
        load_vit(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(ModelLoadError, match="not a supported ViT"):
        load_vit("resnet18")


def test_mismatched_weights_name_keys_and_shapes(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(WeightsMismatchError) as err:
        load_vit("vit_small_patch16_224", weights=path, img_size=32)
    msg = str(err.value)
    assert "missing keys: blocks.10" in msg or "missing keys" in msg
    assert "shape mismatches" in msg and "cls_token" in msg
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="Could not read weights"):
        load_vit("vit_tiny_patch16_224", weights=bad)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vit("vit_tiny_patch16_224", weights=tmp_path / "missing.safetensors")


def test_wrong_image_size_and_shape():
    vit = load_vit(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=2))
    with pytest.raises(InputError, match="expects 32x32 px"):
        vit(torch.randn(1, 3, 64, 64))
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        vit(torch.randn(3, 32, 32))
    from analysis import head_importance
    from analysis.errors import LabelError

    with pytest.raises(LabelError, match="rows \\[1\\]"):
        head_importance(vit, torch.randn(2, 3, 32, 32), torch.tensor([0, 7]))
