"""Image-set loaders: embedded sets (fashion, photos) and bring-your-own folders and manifests.

Fixtures (folder trees, manifests, corrupt files) are generated in tmp_path at run time.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from analysis import datasets
from analysis.datasets import (FASHION_MNIST_CLASSES, ImageItem, ImageSet, load_image_set, open_image,
                               validate_labels)
from analysis.errors import DatasetMissingError, ImageReadError, InputError, LabelError


def _png(path, color=(200, 30, 30), size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _tree(root):
    """root/cat/{a,b}.png, root/dog/c.jpg, root/dog/broken.jpg (corrupt), root/dog/notes.txt."""
    _png(root / "cat" / "a.png")
    _png(root / "cat" / "b.png", (0, 0, 255))
    _png(root / "dog" / "c.jpg", (0, 255, 0), (10, 10))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


# ---- fashion ------------------------------------------------------------------------------
def test_fashion_default_is_balanced_and_deterministic():
    s = load_image_set("fashion")
    assert s.name == "fashion" and len(s) == 200 and s.class_names == FASHION_MNIST_CLASSES
    assert collections.Counter(s.labels) == {c: 20 for c in range(10)}
    assert collections.Counter(s.labels[:50]) == {c: 5 for c in range(10)}  # any prefix is balanced
    assert all(it.label_name == FASHION_MNIST_CLASSES[it.label] for it in s)
    assert load_image_set("fashion").fingerprint == s.fingerprint
    assert load_image_set("fashion", seed=1).fingerprint != s.fingerprint
    big = load_image_set("fashion", limit=1000)
    assert len(big) == 1000 and set(collections.Counter(big.labels).values()) == {100}
    assert len({it.ref for it in big}) == 1000


def test_fashion_refs_reopen_as_rgb():
    item = load_image_set("fashion", limit=10).items[3]
    assert item.ref.startswith("fashion-mnist:t10k:")
    im = open_image(item.ref)
    assert im.mode == "RGB" and im.size == (28, 28)
    images, labels = datasets.fashion_mnist_arrays("t10k")
    idx = int(item.ref.rsplit(":", 1)[1])
    assert labels[idx] == item.label
    assert np.array_equal(np.asarray(im)[..., 0], images[idx])
    with pytest.raises(ImageReadError):
        open_image("fashion-mnist:t10k:99999")


def test_fashion_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HEADSCOPE_OFFLINE", "1")
    datasets.fashion_mnist_arrays.cache_clear()
    try:
        with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
            load_image_set("fashion")
    finally:
        datasets.fashion_mnist_arrays.cache_clear()


# ---- photos -------------------------------------------------------------------------------
def test_photos_have_imagenet_labels():
    s = load_image_set("photos")
    assert s.skipped == [] and len(s) >= 25 and len(s.class_names) == 1000
    foolbox = [it for it in s if "foolbox" in it.ref]
    assert len(foolbox) == 20
    for it in foolbox:
        assert it.label == int(it.ref.rsplit("_", 1)[1].split(".")[0])
        assert it.label_name == s.class_names[it.label]
    by_ref = {it.ref: it for it in s}
    assert by_ref["skimage:chelsea"].label == 281 and "tabby" in by_ref["skimage:chelsea"].label_name
    assert by_ref["skimage:astronaut"].label == -1
    im = open_image("skimage:camera")  # grayscale photo -> RGB
    assert im.mode == "RGB" and min(im.size) >= 200
    validate_labels(s, 0)  # backbone: labels are metadata only
    assert len(load_image_set("photos", limit=5)) == 5


# ---- folder -------------------------------------------------------------------------------
def test_folder_sorted_classes_and_corrupt_file_skipped(tmp_path):
    root = _tree(tmp_path / "pets")
    s = load_image_set(root)
    assert s.kind == "folder" and s.name == "pets" and s.class_names == ["cat", "dog"]
    assert [(it.label, it.label_name) for it in s] == [(0, "cat"), (0, "cat"), (1, "dog")]
    reasons = dict(s.skipped)
    assert "Cannot read image" in reasons[str(root / "dog" / "broken.jpg")]
    assert "not an image file" in reasons[str(root / "dog" / "notes.txt")]
    for it in s:
        assert open_image(it.ref).mode == "RGB"
    with pytest.raises(ImageReadError, match="broken.jpg"):
        open_image(str(root / "dog" / "broken.jpg"))
    with pytest.raises(ImageReadError, match="not found"):
        open_image(str(root / "missing.png"))
    assert len(load_image_set(root, limit=2, seed=3)) == 2


def test_folder_names_matched_to_model_classes(tmp_path):
    _png(tmp_path / "shop" / "Trouser" / "x.png")
    _png(tmp_path / "shop" / "t-shirt_top" / "y.png")
    s = load_image_set(tmp_path / "shop", class_names=FASHION_MNIST_CLASSES)
    assert sorted((it.label, it.label_name) for it in s) == [(0, "T-shirt/top"), (1, "Trouser")]
    assert s.class_names == FASHION_MNIST_CLASSES
    _png(tmp_path / "shop" / "socks" / "z.png")  # matches no model class while others do
    with pytest.raises(LabelError, match="socks"):
        load_image_set(tmp_path / "shop", class_names=FASHION_MNIST_CLASSES)


def test_synset_folders_map_to_imagenet(tmp_path):
    _png(tmp_path / "inet" / "n01440764" / "fish.png")
    _png(tmp_path / "inet" / "n02123045" / "cat.png")
    s = load_image_set(tmp_path / "inet")
    assert [(it.label, it.label_name) for it in s] == [(0, "tench, Tinca tinca"), (281, "tabby, tabby cat")]
    assert len(s.class_names) == 1000
    with pytest.raises(LabelError, match="n02123045"):  # refused up front for a 10-class model
        load_image_set(tmp_path / "inet", class_names=FASHION_MNIST_CLASSES)


# ---- manifest -----------------------------------------------------------------------------
def test_manifest_paths_labels_and_missing_file(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    csv = tmp_path / "list.csv"
    csv.write_text("path,label,label_name\nimg/a.png,3,Dress\n"
                   f"{tmp_path / 'img' / 'b.png'},7,\nnope.png,1,\nbad.png,2,\nimg/a.png,,\n")
    s = load_image_set(csv, class_names=FASHION_MNIST_CLASSES)
    assert s.kind == "manifest" and s.name == "list"
    assert [(it.ref, it.label, it.label_name) for it in s] == [
        (str(tmp_path / "img" / "a.png"), 3, "Dress"), (str(tmp_path / "img" / "b.png"), 7, "Sneaker"),
        (str(tmp_path / "img" / "a.png"), -1, "unknown")]
    skipped = dict(s.skipped)
    assert "not found" in skipped[str(tmp_path / "nope.png")] and "Cannot read" in skipped[str(tmp_path / "bad.png")]


def test_manifest_labels_outside_classes_refused_with_rows(tmp_path):
    _png(tmp_path / "a.png")
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\na.png,0\na.png,10\na.png,cat\n")
    with pytest.raises(LabelError) as err:
        load_image_set(csv, class_names=FASHION_MNIST_CLASSES)
    assert "line 3" in str(err.value) and "line 4" in str(err.value) and "line 2" not in str(err.value)
    (tmp_path / "cols.csv").write_text("file,class\na.png,0\n")
    with pytest.raises(InputError, match="path,label"):
        load_image_set(tmp_path / "cols.csv")


def test_validate_labels_and_fingerprint():
    s = ImageSet("x", [ImageItem("a", 0, "a"), ImageItem("b", 12, "b"), ImageItem("c", -1, "")])
    with pytest.raises(LabelError, match="item 1: b label 12"):
        validate_labels(s, 10)
    validate_labels(s, 13)
    t = ImageSet("y", [ImageItem("a", 0), ImageItem("b", 11), ImageItem("c", -1)])
    assert s.fingerprint != t.fingerprint
    assert ImageSet("z", list(s.items)).fingerprint == s.fingerprint


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="neither a known name"):
        load_image_set("imagenet-full")
    with pytest.raises(InputError, match="No image files"):
        load_image_set(tmp_path)


def test_class_mapping_is_recorded_only_when_not_by_name(tmp_path):
    _png(tmp_path / "shop" / "Trouser" / "x.png")
    _png(tmp_path / "shop" / "t-shirt_top" / "y.png")
    assert load_image_set(tmp_path / "shop", class_names=FASHION_MNIST_CLASSES).label_mapping is None
    by_order = load_image_set(tmp_path / "shop", class_names=FASHION_MNIST_CLASSES, labels="sorted")
    assert by_order.label_mapping == {"rule": "sorted order (--labels sorted)", "folders": {"Trouser": 0, "t-shirt_top": 1}}
    lines = by_order.label_mapping_lines()
    assert lines[1:3] == ["  Trouser -> class 0 (T-shirt/top)", "  t-shirt_top -> class 1 (Trouser)"]
    (tmp_path / "map.json").write_text('{"Trouser": "Trouser", "t-shirt_top": 0}')
    mapped = load_image_set(tmp_path / "shop", class_names=FASHION_MNIST_CLASSES, labels=str(tmp_path / "map.json"))
    assert mapped.label_mapping["folders"] == {"Trouser": 1, "t-shirt_top": 0}
    assert "the mapping file" in mapped.label_mapping["rule"]
