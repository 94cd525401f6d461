"""Image sets: the embedded defaults (``fashion``, ``photos``) and bring-your-own folders/manifests.

Every image is identified by a *ref* string that ``open_image`` re-opens on its own:

- ``fashion-mnist:t10k:1234`` (split ``train`` or ``t10k``, 0-based index into the idx file),
- ``skimage:chelsea`` (a photo bundled with scikit-image),
- any other string is a file path (absolute for folders and manifests; foolbox's photos are files).

Labels are 0-based class indices of the set's ``class_names`` (-1 = unknown). Unreadable image files
are listed in ``ImageSet.skipped`` with the reason, never raised; labels outside the model's classes
are refused up front with a ``LabelError`` naming the offending rows.
"""
from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from analysis.errors import DatasetMissingError, ImageReadError, InputError, LabelError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_DEFAULT_SIZE = 200  # images in the default `fashion` set (20 per class)
FASHION_INSTALL_HINT = ("Install it with: sudo apt-get install dataset-fashion-mnist "
                        "(Debian/Ubuntu), or go online once so torchvision can download it.")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# Real photos bundled with scikit-image: name -> ImageNet index where one label is obvious, else -1.
SKIMAGE_PHOTOS = {
    "astronaut": -1, "camera": -1, "chelsea": 281,  # tabby cat
    "coffee": 967,  # espresso
    "coins": -1, "hubble_deep_field": -1, "moon": -1, "rocket": -1, "motorcycle": -1,
}
_SYNSET = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ImageItem:
    """One image: ``ref`` for open_image, ``label`` (class index, -1 unknown), ``label_name``."""
    ref: str
    label: int = -1
    label_name: str = ""


@dataclass
class ImageSet:
    """A named, ordered list of images with their labels and the files that were skipped."""
    name: str
    items: list[ImageItem]
    class_names: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (ref, reason)
    kind: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    @property
    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) over the refs and labels, in order."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.ref}\t{it.label}\n".encode())
        return h.hexdigest()


# ---- public API ---------------------------------------------------------------------------
def load_image_set(name_or_path: str | os.PathLike, *, kind: str | None = None, limit: int | None = None,
                   seed: int = 0, class_names: list[str] | None = None) -> ImageSet:
    """Load an image set by name ('fashion', 'photos') or path (folder of class sub-folders, or a
    CSV manifest with columns path,label[,label_name]).

    kind forces 'fashion', 'photos', 'folder' or 'manifest'. limit: number of images (a seeded
    sample; for 'fashion' class-balanced, default 200). class_names: the model's classes; when
    given, labels outside range(len(class_names)) raise LabelError and folder names are matched to
    them.
    """
    src = str(name_or_path)
    kind = kind or _guess_kind(src)
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of images, got {limit}.")
    if kind == "fashion":
        image_set = _fashion_set(limit, seed)
    elif kind == "photos":
        image_set = _photos_set(limit, seed)
    elif kind == "folder":
        image_set = _folder_set(Path(src), limit, seed, class_names)
    elif kind == "manifest":
        image_set = _manifest_set(Path(src), limit, seed, class_names)
    else:
        raise InputError(f"Unknown image set kind '{kind}'. Use 'fashion', 'photos', 'folder' or 'manifest'.")
    if class_names is not None:
        validate_labels(image_set, len(class_names))
    return image_set


def open_image(ref: str) -> Image.Image:
    """Re-open an image from its ref alone -> RGB PIL image. Raises ImageReadError if unreadable."""
    ref = str(ref)
    if ref.startswith("fashion-mnist:"):
        parts = ref.split(":")
        if len(parts) != 3 or parts[1] not in ("train", "t10k") or not parts[2].isdigit():
            raise ImageReadError(f"Bad Fashion-MNIST ref '{ref}': expected fashion-mnist:train|t10k:INDEX.")
        images, _ = fashion_mnist_arrays(parts[1])
        if int(parts[2]) >= len(images):
            raise ImageReadError(f"Bad Fashion-MNIST ref '{ref}': index out of range 0..{len(images) - 1}.")
        return Image.fromarray(images[int(parts[2])]).convert("RGB")
    if ref.startswith("skimage:"):
        return _skimage_photo(ref.split(":", 1)[1])
    try:
        with Image.open(ref) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(f"Image file not found: {ref}. Check the path or rebuild the image list.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"Cannot read image {ref}: {type(err).__name__}: {err}. "
                             "Replace or remove the file.") from None


def validate_labels(image_set: ImageSet, num_classes: int) -> None:
    """Raise LabelError listing every item whose label is not -1 (unknown) or in 0..num_classes-1.
    num_classes <= 0 (a backbone without head): labels are metadata only, nothing to check."""
    if num_classes <= 0:
        return
    bad = [(i, it) for i, it in enumerate(image_set.items) if not (it.label == -1 or 0 <= it.label < num_classes)]
    if bad:
        rows = "\n".join(f"  item {i}: {it.ref} label {it.label} {it.label_name!r}" for i, it in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise LabelError(f"{len(bad)} image(s) of '{image_set.name}' have labels outside the model's "
                         f"{num_classes} classes (0..{num_classes - 1}):\n{rows}{more}\n"
                         "Fix the labels or choose a model whose classes they belong to.")


# ---- Fashion-MNIST -----------------------------------------------------------------------
def _fashion_dir() -> Path:
    return Path(os.environ.get("HEADSCOPE_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


@functools.lru_cache(maxsize=2)
def fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]) of split 'train' (60k) or 't10k' (10k).

    Read from the Debian package's idx files; when absent, downloaded with torchvision into
    <cache>/datasets (unless HEADSCOPE_OFFLINE=1). Raises DatasetMissingError with the install command.
    """
    if split not in ("train", "t10k"):
        raise InputError(f"Fashion-MNIST split must be 'train' or 't10k', got '{split}'.")
    found = _find_fashion(split)
    if found is None:
        _download_fashion_mnist()
        found = _find_fashion(split)
    if found is None:
        raise DatasetMissingError(f"Fashion-MNIST split '{split}' was not found after downloading. {FASHION_INSTALL_HINT}")
    return _read_idx(found[0]), _read_idx(found[1]).astype(np.int64)


def _find_fashion(split: str) -> tuple[Path, Path] | None:
    """(images, labels) idx paths of a split in the Debian folder or the download cache, or None."""
    for folder in (_fashion_dir(), _download_dir() / "FashionMNIST" / "raw"):
        images = _find_idx(folder, f"{split}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{split}-labels-idx1-ubyte")
        if images and labels:
            return images, labels
    return None


def _download_dir() -> Path:
    from analysis.paths import default_cache_dir

    return default_cache_dir() / "datasets"


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped) -> uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, IndexError, EOFError) as err:
        raise DatasetMissingError(f"Fashion-MNIST file {path} is corrupt ({err}). Reinstall it: "
                                  "sudo apt-get install --reinstall dataset-fashion-mnist") from None


def _download_fashion_mnist() -> None:
    where = _fashion_dir()
    if os.environ.get("HEADSCOPE_OFFLINE") == "1":
        raise DatasetMissingError(f"Fashion-MNIST is not installed ({where} has no idx files) and downloads are "
                                  f"disabled (HEADSCOPE_OFFLINE=1). {FASHION_INSTALL_HINT}")
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(_download_dir()), train=train, download=True)
    except Exception as err:
        raise DatasetMissingError(f"Fashion-MNIST is not installed ({where} has no idx files) and could not be "
                                  f"downloaded ({type(err).__name__}: {err}). {FASHION_INSTALL_HINT}") from None


def _fashion_set(limit: int | None, seed: int) -> ImageSet:
    """Class-balanced seeded sample of the Fashion-MNIST test set, classes interleaved so that any
    prefix of the list is balanced too."""
    _, labels = fashion_mnist_arrays("t10k")
    n = min(limit or FASHION_DEFAULT_SIZE, len(labels))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(FASHION_MNIST_CLASSES))]
    order = [int(idx[k]) for k in range(max(map(len, per_class))) for idx in per_class if k < len(idx)]
    items = [ImageItem(f"fashion-mnist:t10k:{i}", int(labels[i]), FASHION_MNIST_CLASSES[labels[i]])
             for i in order[:n]]
    return ImageSet("fashion", items, list(FASHION_MNIST_CLASSES), kind="fashion")


# ---- photos (foolbox + scikit-image) -----------------------------------------------------
@functools.lru_cache(maxsize=1)
def imagenet_names() -> tuple[list[str], list[str]]:
    """(synsets ['n01440764', ...], short descriptions ['tench', ...]) of the 1000 ImageNet classes."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synsets = list(info.label_names())
    return synsets, [info.index_to_description(i) for i in range(len(synsets))]


def _photos_set(limit: int | None, seed: int) -> ImageSet:
    _, names = imagenet_names()
    items, skipped = [], []
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        skipped.append(("foolbox/data", "PyPI package foolbox is not installed: pip install --no-deps foolbox"))
    else:
        for path in sorted((Path(spec.origin).parent / "data").glob("imagenet_*_*.jpg")):
            label = int(path.stem.rsplit("_", 1)[1])
            items.append(ImageItem(str(path), label, names[label]))
    items += [ImageItem(f"skimage:{n}", lab, names[lab] if lab >= 0 else "unknown") for n, lab in SKIMAGE_PHOTOS.items()]
    items, bad = _take_readable(items, limit, seed)
    return ImageSet("photos", items, names, skipped + bad, kind="photos")


def _skimage_photo(name: str) -> Image.Image:
    if name not in SKIMAGE_PHOTOS:
        raise ImageReadError(f"Unknown scikit-image photo '{name}'. Known: {', '.join(SKIMAGE_PHOTOS)}.")
    try:
        from skimage import data

        arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    except Exception as err:
        raise ImageReadError(f"Cannot load scikit-image photo '{name}' ({type(err).__name__}: {err}). "
                             "Install scikit-image: pip install scikit-image") from None
    return Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")


# ---- bring your own: folder of class sub-folders, CSV manifest ---------------------------
def _guess_kind(src: str) -> str:
    if src in ("fashion", "photos"):
        return src
    path = Path(src)
    if path.is_dir():
        return "folder"
    if path.suffix.lower() == ".csv" and path.is_file():
        return "manifest"
    if not path.exists():
        raise InputError(f"Image set '{src}' is neither a known name ('fashion', 'photos') nor an existing "
                         "folder or .csv manifest. Check the name or path.")
    raise InputError(f"'{src}' is a file but not a .csv manifest. Give a folder of class sub-folders "
                     "or a CSV with columns path,label.")


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _folder_classes(folders: list[str], class_names: list[str] | None) -> tuple[list[int], list[str]]:
    """Map class folder names -> (label per folder, class names of the set)."""
    synsets, descriptions = imagenet_names()
    synset_index = {s: i for i, s in enumerate(synsets)}
    if folders and all(_SYNSET.match(f) and f in synset_index for f in folders):
        return [synset_index[f] for f in folders], descriptions
    if class_names:
        lookup = {_norm(c): i for i, c in enumerate(class_names)}
        matched = [lookup.get(_norm(f)) for f in folders]
        if all(m is not None for m in matched):
            return matched, list(class_names)
        if any(m is not None for m in matched):
            missing = [f for f, m in zip(folders, matched) if m is None]
            raise LabelError(f"Class folders {missing} match none of the model's classes ({', '.join(class_names)}) "
                             "while other folders do. Rename them to the model's class names.")
    return list(range(len(folders))), list(folders)


def _folder_set(root: Path, limit: int | None, seed: int, class_names: list[str] | None) -> ImageSet:
    """Folder of class sub-folders (any depth below each); loose files in the root are unlabelled."""
    root = root.resolve()
    if not root.is_dir():
        raise InputError(f"Image folder {root} does not exist. Check the path.")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labels, names = _folder_classes(folders, class_names)
    items, skipped = [], []

    def add(path: Path, label: int, label_name: str) -> None:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            items.append(ImageItem(str(path), label, label_name))
        else:
            skipped.append((str(path), f"not an image file (extension '{path.suffix}')"))

    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        add(path, -1, "unknown")
    for folder, label in zip(folders, labels):
        for path in sorted(p for p in (root / folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
            add(path, label, names[label])
    if not items:
        raise InputError(f"No image files found in {root}. Put images in class sub-folders "
                         f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    items, bad = _take_readable(items, limit, seed)
    return ImageSet(root.name, items, names or None, skipped + bad, kind="folder")


def _manifest_set(path: Path, limit: int | None, seed: int, class_names: list[str] | None) -> ImageSet:
    """CSV with header path,label[,label_name]; relative paths are relative to the CSV's folder."""
    path = path.resolve()
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = set(rows[0].keys()) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"Cannot read manifest {path}: {err}.") from None
    if not {"path", "label"} <= columns:
        raise InputError(f"Manifest {path} needs a header with columns path,label (optional label_name); "
                         f"found {sorted(columns) or 'no rows'}.")
    items, bad_rows = [], []
    n_classes = len(class_names) if class_names else None
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        text = (row.get("label") or "").strip()
        try:
            label = int(text) if text else -1
        except ValueError:
            label = None
        if label is None or label < -1 or (n_classes is not None and label >= n_classes):
            bad_rows.append(f"  line {line}: {row.get('path')} label {text!r}")
            continue
        name = (row.get("label_name") or "").strip()
        if not name:
            name = class_names[label] if class_names and label >= 0 else ("unknown" if label < 0 else str(label))
        file = Path((row.get("path") or "").strip())
        items.append(ImageItem(str(file if file.is_absolute() else (path.parent / file).resolve()), label, name))
    if bad_rows:
        allowed = f"0..{n_classes - 1}" if n_classes is not None else "non-negative integers"
        raise LabelError(f"Manifest {path}: {len(bad_rows)} row(s) have labels that are not class indices "
                         f"({allowed}, or empty/-1 for unknown):\n" + "\n".join(bad_rows[:20])
                         + (f"\n  ... and {len(bad_rows) - 20} more" if len(bad_rows) > 20 else ""))
    if not items:
        raise InputError(f"Manifest {path} lists no images.")
    items, bad = _take_readable(items, limit, seed)
    return ImageSet(path.stem, items, list(class_names) if class_names else None, bad, kind="manifest")


def _take_readable(items: list[ImageItem], limit: int | None, seed: int) -> tuple[list[ImageItem], list]:
    """Keep readable items (all, or a seeded sample of `limit`, in the original order); return
    (items, [(ref, reason), ...] for the unreadable ones that were tried)."""
    order = range(len(items)) if limit is None or limit >= len(items) else np.random.default_rng(seed).permutation(len(items))
    keep, skipped = [], []
    for i in order:
        if limit is not None and len(keep) >= limit:
            break
        try:
            open_image(items[i].ref)
            keep.append(int(i))
        except ImageReadError as err:
            skipped.append((items[i].ref, str(err)))
    return [items[i] for i in sorted(keep)], skipped
