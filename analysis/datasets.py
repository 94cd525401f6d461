"""Image sets: the embedded defaults (``fashion``, ``photos``) and bring-your-own folders/manifests.

Every image is identified by a *ref* string that ``open_image`` re-opens on its own:

- ``fashion-mnist:t10k:1234`` (split ``train`` or ``t10k``, 0-based index into the idx file),
- ``skimage:chelsea`` (a photo bundled with scikit-image),
- any other string is a file path (absolute for folders and manifests; foolbox's photos are files).

Labels are 0-based class indices of the set's ``class_names`` (-1 = unknown). Unreadable image files
(corrupt, over ``max_image_pixels()``, broken symbolic links) are listed in ``ImageSet.skipped`` with
the reason, never raised; labels outside the model's classes are refused up front with a
``LabelError`` naming the offending rows. Class folders are matched to the model's class names
(``folder_labels``); folder names that match none are refused unless a mapping is given.

File names that are not valid UTF-8 keep their exact bytes in the ref (Python's surrogate escapes);
``printable(ref)`` is the text the tables and messages show (``\\xff`` for such a byte), and
``open_image`` accepts both.
"""
from __future__ import annotations

import csv
import difflib
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from analysis.errors import DatasetMissingError, ImageReadError, InputError, LabelError
from analysis.models.labels import FASHION_MNIST_CLASSES, imagenet_names
from analysis.paths import default_cache_dir

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
MAX_IMAGE_PIXELS = 40_000_000  # default cap on width x height (HEADSCOPE_MAX_IMAGE_PIXELS overrides)
LABELS_HELP = ("--labels sorted (the i-th folder in sorted order is class i) or --labels MAP.json / MAP.csv "
               "(JSON {\"folder\": class index or name}, or a CSV with columns folder,label)")


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
    # how class folders became classes when it was not by name: {"rule": text, "folders": {folder: index}}
    label_mapping: dict | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    @property
    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def label_mapping_lines(self, shown: int = 20) -> list[str]:
        """What to tell the user when class folders became classes by a rule rather than by name:
        the rule, ``folder -> index (name)`` for the first ``shown`` folders, and how to change it."""
        if not self.label_mapping:
            return []
        pairs = list(self.label_mapping["folders"].items())
        names = self.class_names or []
        rows = [f"  {folder} -> class {i}" + (f" ({names[i]})" if i < len(names) and names[i] != folder else "")
                for folder, i in pairs[:shown]]
        more = [f"  ... and {len(pairs) - shown} more (all in the run's manifest.json, dataset.label_mapping)"] \
            if len(pairs) > shown else []
        return [f"Class folders were mapped to classes by {self.label_mapping['rule']}, not by name:", *rows, *more,
                "To map them otherwise, pass --labels MAP.json ({\"folder\": class index or name}) or a CSV "
                "folder,label."]

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) over the refs and labels, in order."""
        h = hashlib.sha256()
        for it in self.items:  # bytes of the ref: file names need not be valid UTF-8
            h.update(os.fsencode(it.ref) + f"\t{it.label}\n".encode())
        return h.hexdigest()


# ---- public API ---------------------------------------------------------------------------
def load_image_set(name_or_path: str | os.PathLike, *, kind: str | None = None, limit: int | None = None,
                   seed: int = 0, class_names: list[str] | None = None, labels: str | None = None) -> ImageSet:
    """Load an image set by name ('fashion', 'photos') or path (folder of class sub-folders, or a
    CSV manifest with columns path,label[,label_name]).

    kind forces 'fashion', 'photos', 'folder' or 'manifest'. limit: number of images (a seeded
    sample; for 'fashion' class-balanced, default 200). class_names: the model's classes; when
    given, labels outside range(len(class_names)) raise LabelError and folder names are matched to
    them. labels (folders only): None (match the names), "sorted" or a mapping file (see folder_labels).
    Raises InputError naming the skipped files when none of the images can be read.
    """
    src = str(name_or_path)
    kind = kind or _guess_kind(src)
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of images, got {limit}.")
    if labels is not None and kind != "folder":
        raise InputError(f"--labels maps class folders to classes; '{src}' is not a folder of class sub-folders.")
    if kind == "fashion":
        image_set = _fashion_set(limit, seed)
    elif kind == "photos":
        image_set = _photos_set(limit, seed)
    elif kind == "folder":
        image_set = _folder_set(Path(src), limit, seed, class_names, labels)
    elif kind == "manifest":
        image_set = _manifest_set(Path(src), limit, seed, class_names)
    else:
        raise InputError(f"Unknown image set kind '{kind}'. Use 'fashion', 'photos', 'folder' or 'manifest'.")
    if not image_set.items and image_set.skipped:
        rows = "\n".join(f"  {printable(ref)}: {printable(reason)}" for ref, reason in image_set.skipped[:10])
        more = f"\n  ... and {len(image_set.skipped) - 10} more" if len(image_set.skipped) > 10 else ""
        raise InputError(f"None of the {len(image_set.skipped)} image(s) of '{printable(src)}' can be read:\n"
                         f"{rows}{more}\nFix the paths or files.")
    if class_names is not None:
        validate_labels(image_set, len(class_names))
    return image_set


def open_image(ref: str) -> Image.Image:
    """Re-open an image from its ref alone -> 8-bit RGB PIL image (``to_rgb``). Raises ImageReadError
    if unreadable or larger than ``max_image_pixels()``."""
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
    path, shown = _unescape(ref), printable(ref)
    if os.path.islink(path) and not os.path.exists(path):
        raise ImageReadError(f"{shown} is a broken symbolic link (its target {printable(os.readlink(path))} "
                             "does not exist). Fix or remove the link.")
    cap = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > cap:
                    raise ImageReadError(f"Image {shown} has {w} x {h} = {w * h / 1e6:.0f} megapixels, more than "
                                         f"the limit of {cap / 1e6:g} megapixels. Downscale it, or raise the limit "
                                         "with HEADSCOPE_MAX_IMAGE_PIXELS (pixels).")
                im.load()
                return to_rgb(im)
    except FileNotFoundError:
        raise ImageReadError(f"Image file not found: {shown}. Check the path or rebuild the image list.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"Cannot read image {shown}: {type(err).__name__}: {printable(str(err))}. "
                             "Replace or remove the file.") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. High-bit-depth grey is scaled, not clipped as ``convert`` does:
    16-bit (I;16*, or mode I with values in 0..65535) by 255/65535; float F by 255 when its values
    lie in 0..1, as is when in 0..255; other I / F ranges min-max to 0..255."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im.convert("RGB")
    a = np.nan_to_num(np.asarray(im).astype(np.float64))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535 and hi > 255):
        a = a * (255 / 65535)
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif lo < 0 or hi > 255:
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")


def max_image_pixels() -> int:
    """The largest width x height open_image accepts: $HEADSCOPE_MAX_IMAGE_PIXELS, default 40 MP."""
    text = os.environ.get("HEADSCOPE_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"HEADSCOPE_MAX_IMAGE_PIXELS must be a positive number of pixels, got {text!r}.")
    return int(text)


def printable(text: str) -> str:
    """A ref or message as valid UTF-8 text: bytes of a non-UTF-8 file name shown as \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unescape(ref: str) -> str:
    """The file path of a ref given in its printable form (``\\xNN`` escapes), when only that exists."""
    if "\\x" not in ref or os.path.lexists(ref):
        return ref
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m[1], 16)]), ref.encode("utf-8", "surrogateescape"))
    path = os.fsdecode(raw)
    return path if os.path.lexists(path) else ref


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


def _class_lookup(class_names: list[str]) -> dict[str, int]:
    """Normalised name -> class index: every full name, then each of its synonyms ("tabby, tabby cat",
    "T-shirt/top") that only one class has."""
    lookup = {_norm(c): i for i, c in reversed(list(enumerate(class_names)))}
    owners: dict[str, set[int]] = {}
    for i, c in enumerate(class_names):
        for part in re.split(r"[,/]", c):
            if _norm(part):
                owners.setdefault(_norm(part), set()).add(i)
    for key, idx in owners.items():
        if len(idx) == 1 and key not in lookup:
            lookup[key] = next(iter(idx))
    return lookup


def _closest(folder: str, class_names: list[str], n: int = 3) -> list[str]:
    """Class names nearest to a folder name: those with a synonym holding all its words
    ("cat" -> "tabby, tabby cat"), then difflib's closest synonyms."""
    words = set(re.findall(r"[0-9a-z]+", folder.lower()))
    synonyms = [(i, part) for i, c in enumerate(class_names) for part in re.split(r"[,/]", c) if _norm(part)]
    hits: list[int] = []
    for i, part in synonyms:
        if words and words <= set(re.findall(r"[0-9a-z]+", part.lower())) and i not in hits:
            hits.append(i)
    keys = {_norm(part): i for i, part in reversed(synonyms)}
    for k in difflib.get_close_matches(_norm(folder), list(keys), n=n, cutoff=0.6):
        if keys[k] not in hits:
            hits.append(keys[k])
    return [class_names[i] for i in hits[:n]]


def _read_label_map(path: Path) -> dict[str, str]:
    """A --labels mapping file -> {folder: class index or name, as text}."""
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("expected a JSON object {\"folder\": class index or name}")
            return {str(k): str(v) for k, v in raw.items()}
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"folder", "label"} <= set(rows[0]):
            raise ValueError("expected a CSV header with columns folder,label")
        return {r["folder"].strip(): (r["label"] or "").strip() for r in rows}
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"Cannot read the --labels mapping {path}: {err}. Use {LABELS_HELP}.") from None


def folder_labels(folders: list[str], class_names: list[str] | None,
                  labels: str | None = None) -> tuple[list[int], list[str], str | None]:
    """Class folder names -> (label per folder, class names of the set, the rule used when it is not
    by name: "sorted order (--labels sorted)", "the mapping file PATH", "sorted order (the model has
    no class names)"; None when folders matched class names or ImageNet synsets).

    labels None: ImageNet synset folders (n01440764, ...) map to ImageNet; otherwise each folder must
    match one of the model's class names (case- and punctuation-insensitive, or one synonym of an
    id2label-style "tabby, tabby cat" name), else LabelError with the closest names. A model without
    class names takes the folders in sorted order. labels "sorted": the i-th folder is class i.
    labels PATH: a JSON or CSV mapping folder -> class index or name (see LABELS_HELP).
    """
    if labels == "sorted":
        if class_names and len(folders) > len(class_names):
            raise LabelError(f"--labels sorted maps {len(folders)} class folders onto a model with only "
                             f"{len(class_names)} classes. Remove folders or give a mapping file.")
        return (list(range(len(folders))), list(class_names) if class_names else [printable(f) for f in folders],
                "sorted order (--labels sorted)")
    if labels is not None:
        mapping = _read_label_map(Path(labels))
        lookup = _class_lookup(class_names) if class_names else {}
        out, bad = [], []
        for f in folders:
            value = mapping.get(f, mapping.get(printable(f)))
            index = (int(value) if re.fullmatch(r"\d+", value or "") else lookup.get(_norm(value or ""))) if value is not None else None
            if index is not None and class_names and index >= len(class_names):
                value, index = f"{value} (the model has {len(class_names)} classes)", None
            if index is None:
                bad.append(f"  {printable(f)}: " + ("not in the mapping" if value is None else f"{value!r} is not a class index or name"))
            out.append(index)
        if bad:
            raise LabelError(f"The --labels mapping {labels} does not give a class for {len(bad)} folder(s):\n"
                             + "\n".join(bad[:20]) + "\nAdd them (class index or name) or remove those folders.")
        names = list(class_names) if class_names else [str(i) for i in range(max(out) + 1)]
        if not class_names:
            for f, i in zip(folders, out):
                names[i] = printable(f)
        return out, names, f"the mapping file {printable(str(labels))} (--labels)"
    synsets, descriptions = imagenet_names()
    synset_index = {s: i for i, s in enumerate(synsets)}
    if folders and all(_SYNSET.match(f) and f in synset_index for f in folders):
        return [synset_index[f] for f in folders], descriptions, None
    if not class_names:
        return list(range(len(folders))), [printable(f) for f in folders], "sorted order (the model has no class names)"
    lookup = _class_lookup(class_names)
    if len(class_names) == len(synsets):  # an ImageNet head: synset folders too
        lookup.update({s: i for s, i in synset_index.items()})
    matched = [lookup.get(_norm(f)) for f in folders]
    if all(m is not None for m in matched):
        return matched, list(class_names), None
    missing = [f for f, m in zip(folders, matched) if m is None]
    rows = "\n".join(f"  {printable(f)}/ -> closest: {'; '.join(_closest(f, class_names)) or 'none'}"
                     for f in missing[:20])
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    shown = "; ".join(class_names[:10]) + (f"; ... ({len(class_names)} in all)" if len(class_names) > 10 else "")
    raise LabelError(f"{len(missing)} of {len(folders)} class folder(s) match none of the model's class names "
                     f"({shown}):\n{rows}{more}\nRename the folders to the model's class names, or pass "
                     f"{LABELS_HELP}.")


def _folder_set(root: Path, limit: int | None, seed: int, class_names: list[str] | None,
                labels: str | None = None) -> ImageSet:
    """Folder of class sub-folders (any depth below each); loose files in the root are unlabelled.
    Broken symbolic links are listed as skipped."""
    root = root.resolve()
    if root.is_file():
        raise InputError(f"{printable(str(root))} is a file, not a folder of images. Give a folder of class "
                         "sub-folders, or a CSV manifest (--manifest) with columns path,label.")
    if not root.is_dir():
        raise InputError(f"Image folder {printable(str(root))} does not exist. Check the path.")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labels, names, rule = folder_labels(folders, class_names, labels)
    items, skipped = [], []

    def add(path: Path, label: int, label_name: str) -> None:
        if not path.is_file():  # a broken link: open_image says so
            skipped.append((str(path), _broken_link(path)))
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            items.append(ImageItem(str(path), label, label_name))
        else:
            skipped.append((str(path), f"not an image file (extension '{printable(path.suffix)}')"))

    def files(folder: Path, deep: bool):
        found = folder.rglob("*") if deep else folder.iterdir()
        return sorted(p for p in found if not p.name.startswith(".")
                      and (p.is_file() or (p.is_symlink() and not p.exists())))

    for path in files(root, False):
        add(path, -1, "unknown")
    for folder, label in zip(folders, labels):
        for path in files(root / folder, True):
            add(path, label, names[label])
    if not items:
        listed = "".join(f"\n  {printable(r)}: {why}" for r, why in skipped[:10])
        raise InputError(f"No image files found in {printable(str(root))}. Put images in class sub-folders "
                         f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))}).{listed}")
    items, bad = _take_readable(items, limit, seed)
    mapping = None if rule is None else {"rule": rule, "folders": {printable(f): i for f, i in zip(folders, labels)}}
    return ImageSet(printable(root.name), items, names or None, skipped + bad, kind="folder", label_mapping=mapping)


def _broken_link(path: Path) -> str:
    try:
        target = printable(os.readlink(path))
    except OSError:
        target = "?"
    return f"broken symbolic link (its target {target} does not exist)"


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
