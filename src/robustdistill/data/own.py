"""Readers for one's own data: a tree of image files (`data.name: folder`) and array files
(`data.name: arrays`), both with `data.root` naming where they are.

folder: `root/train/<class>/<image>`, `root/test/<class>/<image>` and optionally `root/val/<class>/...`;
or a single tree `root/<class>/<image>`, whose test (and validation) split is then held out by
`data.test_fraction` (`data.val_fraction`) as for digits, from `data.split_seed`. Classes are the
folder names, sorted; images are read in class order, then by file name. Every image becomes
RGB (alpha dropped) unless all of them are grayscale, which stay one channel. Images of one size
are kept as they are; with `data.image_size: S` each image is resized so that its shorter side is S
(bilinear) and then cropped to S x S about its centre. Images of several sizes without
`data.image_size` are refused. The decoded splits are cached (`data.cache`) under a digest of the
files' names, sizes and modification times, so a second run starts at once.

arrays: `root` is an `.npz` file holding the training images and labels (an `.npz` of the released
generated data, keys `image` and `label`, is one), or a folder holding `train.npz` and `test.npz`
(optionally `val.npz`), or `train_images.npy` / `train_labels.npy` (and `test_`, `val_`). Images
under `image`, `images` or `x`, labels under `label`, `labels` or `y`. Images are uint8 (0..255)
or float in [0, 1], in NHWC or NCHW: `data.layout` says which, or it is inferred from which axis
has 1, 3 or 4 entries (an ambiguous shape is refused). Classes are 0..max label unless
`data.class_names` names them.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core.errors import DataError
from .base import DATASETS, Source
from .mapped import CHUNK_BYTES, FileArray, HostSplit, as_array, npz_members, open_npy
from .sources import _cached_splits, _files_digest, _root
from .split import Split

log = logging.getLogger("robustdistill")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FOLDER_LAYOUT = "train/<class>/<images> and test/<class>/<images> (optionally val/), or one tree <class>/<images>"
IMAGE_KEYS, LABEL_KEYS = ("image", "images", "x"), ("label", "labels", "y")


def has_own_validation(cfg) -> bool:
    """Whether `cfg` (a data section) reads a validation split of its own (a folder's val/, an
    array folder's val.npz or val_images.npy), so that `data.val_fraction` is not used."""
    root = Path(cfg.root).expanduser() if cfg.root else None
    if root is None or not root.is_dir():
        return False
    try:
        if cfg.name == "folder":
            return "val" in _folder_parts(root)
        if cfg.name == "arrays":
            return "val" in _array_files(root)
    except DataError:  # a layout the reader refuses: it says so when the data is read
        return False
    return False


# ----------------------------------------------------------------------------------- image folders


def _class_folders(tree: Path) -> dict[str, list[Path]]:
    """{class name: its image files, sorted}, classes sorted; an empty class folder is refused."""
    classes = sorted(p for p in tree.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{tree} holds no class folders; expected {FOLDER_LAYOUT}")
    files = {}
    for folder in classes:
        images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): remove it or add its images")
        files[folder.name] = images
    return files


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path} is not a readable image ({exc}); remove or replace it") from None
    return image


def _fit(image, size: Optional[int]):
    """The shorter side resized to `size` (bilinear), then an S x S centre crop; as it is when None."""
    from PIL import Image

    if size is None:
        return image
    w, h = image.size
    scale = size / min(w, h)
    resized = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = resized.size
    left, top = (w - size) // 2, (h - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _decode(paths: list[Path], gray: bool, size: Optional[int]) -> torch.Tensor:
    arrays, first = [], None
    for path in paths:
        with _open(path) as image:
            fitted = _fit(image.convert("L" if gray else "RGB"), size)
            array = np.asarray(fitted, dtype=np.uint8)
        if first is None:
            first = (array.shape, path)
        elif array.shape != first[0]:
            raise DataError(
                f"images of different sizes ({first[0][1]}x{first[0][0]} in {first[1]}, "
                f"{array.shape[1]}x{array.shape[0]} in {path}): set data.image_size to resize them all"
            )
        arrays.append(array)
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if gray else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def _all_gray(paths: list[Path]) -> bool:
    for path in paths:
        with _open(path) as image:
            if image.mode not in ("1", "L", "I;16", "I", "F", "LA"):
                return False
    return True


def _folder_parts(root: Path) -> dict[str, Path]:
    """{split: its tree}: train/ and test/ (and val/) when the folder has them, else {"train": root}."""
    parts = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if parts and ("train" not in parts or "test" not in parts):
        raise DataError(f"{root} holds {', '.join(sorted(parts))}/ but not both train/ and test/: {FOLDER_LAYOUT}")
    return parts or {"train": root}


@DATASETS.register("folder")
def folder(cfg) -> Source:
    """A tree of image files, one folder per class (see the module's docstring)."""
    root = _root(cfg, FOLDER_LAYOUT, file_ok=True)
    if not root.is_dir():
        raise DataError(f"data.root {root} is a file; dataset 'folder' reads a folder holding {FOLDER_LAYOUT}")
    trees = {name: _class_folders(tree) for name, tree in _folder_parts(root).items()}
    names = list(trees["train"])
    index = {c: i for i, c in enumerate(names)}
    for split, classes in trees.items():
        stray = sorted(set(classes) - set(names))
        if stray:
            raise DataError(f"{root / split} has class folders that train/ has not: {', '.join(stray)}")
    every = [p for classes in trees.values() for files in classes.values() for p in files]

    def decode() -> dict[str, Split]:
        gray = _all_gray(every)
        out = {}
        for split, classes in trees.items():
            paths = [p for files in classes.values() for p in files]
            labels = [index[c] for c, files in classes.items() for _ in files]
            out[split] = Split(_decode(paths, gray, cfg.image_size), torch.tensor(labels, dtype=torch.int64))
        return out

    digest = _files_digest(root, every) + f"-{cfg.image_size}"
    splits = _cached_splits(cfg, root, "folder", digest, decode)
    return Source(splits["train"], splits.get("test"), names, val=splits.get("val"))


# ------------------------------------------------------------------------------------ array files


def _pick(arrays, keys: tuple[str, ...], what: str, path: Path):
    for key in keys:
        if key in arrays:
            return arrays[key]
    found = ", ".join(sorted(arrays)) or "nothing"
    raise DataError(f"{path} has no {what} (looked for {', '.join(keys)}; it holds {found})")


def _layout(shape: tuple[int, ...], given: Optional[str], path: Path) -> str:
    if len(shape) == 3:
        return "NHW"
    if len(shape) != 4:
        raise DataError(f"{path}: images of shape {shape}; expected N,H,W,C or N,C,H,W")
    if given is not None:
        return given
    last, second = shape[3] in (1, 3, 4), shape[1] in (1, 3, 4)
    if last == second:
        raise DataError(f"{path}: cannot tell whether images of shape {shape} are NHWC or NCHW; set data.layout")
    return "NHWC" if last else "NCHW"


def _check_images(raw: np.ndarray | FileArray, path: Path) -> None:
    """uint8, or float in [0, 1] (checked a chunk at a time: a file is never read whole)."""
    if raw.dtype == np.uint8:
        return
    if not np.issubdtype(raw.dtype, np.floating):
        raise DataError(f"{path}: images of type {raw.dtype}; expected uint8 (0..255) or float in [0, 1]")
    step = max(1, CHUNK_BYTES // max(1, int(np.prod(raw.shape[1:])) * raw.dtype.itemsize))
    low, high = np.inf, -np.inf
    for start in range(0, len(raw), step):
        chunk = raw[start : start + step]
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    if len(raw) and not (0.0 <= low and high <= 1.0):
        raise DataError(f"{path}: float images must lie in [0, 1], these span [{low:g}, {high:g}]")


def _array_split(cfg, images_file: Path, labels_file: Optional[Path] = None) -> tuple[HostSplit, str, Optional[str]]:
    """One split of array files: its images left in the file where it allows (see `mapped`), its
    labels read; checked whole before any training. Without labels: every label -1, and the line
    that says so (the third value; None when it has labels)."""
    try:
        if labels_file is None:
            arrays = npz_members(images_file)
            images = _pick(arrays, IMAGE_KEYS, "images", images_file)
            key = next((k for k in LABEL_KEYS if k in arrays), None)
            raw_y = as_array(arrays[key]) if key else None
            holds = ", ".join(sorted(arrays))
            unlabeled = f"{images_file} has no labels (looked for {', '.join(LABEL_KEYS)}; it holds {holds})"
        else:
            images = open_npy(images_file)
            raw_y = np.load(labels_file, allow_pickle=False) if labels_file.is_file() else None
            unlabeled = f"{images_file} has no {labels_file.name} beside it"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{images_file} is not a readable numpy file ({exc})") from None
    layout = _layout(tuple(images.shape), cfg.layout, images_file)
    if raw_y is None:  # refused unless it is data.extra, for a method that needs no labels (load_dataset)
        labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
        return HostSplit(images, labels, layout, images_file), layout, unlabeled
    raw_y = np.asarray(raw_y).reshape(-1)
    if len(raw_y) != images.shape[0]:
        raise DataError(f"{images_file} holds {images.shape[0]} images but {len(raw_y)} labels")
    if not np.issubdtype(raw_y.dtype, np.integer):
        raise DataError(f"{labels_file or images_file}: labels of type {raw_y.dtype}; expected integers")
    if len(raw_y) and raw_y.min() < 0:
        raise DataError(f"{labels_file or images_file}: negative label {raw_y.min()}")
    _check_images(images, images_file)
    if not isinstance(images, FileArray):
        log.info("%s: read into memory whole (compressed or Fortran-ordered: not readable in parts)", images_file)
    labels = torch.from_numpy(raw_y.astype(np.int64))
    return HostSplit(images, labels, layout, images_file), layout, None


def _array_files(root: Path) -> dict[str, tuple[Path, Optional[Path]]]:
    if root.is_file():
        return {"train": (root, None)}
    found = {}
    for split in ("train", "val", "test"):
        if (root / f"{split}.npz").is_file():
            found[split] = (root / f"{split}.npz", None)
        elif (root / f"{split}_images.npy").is_file():
            found[split] = (root / f"{split}_images.npy", root / f"{split}_labels.npy")
    if "train" not in found:
        raise DataError(f"{root} holds neither train.npz nor train_images.npy (with train_labels.npy)")
    return found


@DATASETS.register("arrays")
def arrays(cfg) -> Source:
    """Images and labels from .npz / .npy files (see the module's docstring)."""
    layout = "train.npz and test.npz (or train_images.npy, train_labels.npy, ...), or be one .npz file"
    root = _root(cfg, layout, file_ok=True)
    splits, layouts, unlabeled = {}, set(), []
    for split, (images_file, labels_file) in _array_files(root).items():
        splits[split], used, without = _array_split(cfg, images_file, labels_file)
        layouts.add(used)
        unlabeled += [without] if without else []
    shapes = {tuple(s.shape[1:]) for s in splits.values()}
    if len(shapes) > 1:
        raise DataError(f"{root}: the splits' images differ in shape ({', '.join(map(str, sorted(shapes)))})")
    top = max(int(s.y.max()) for s in splits.values() if len(s))
    names = list(cfg.class_names) if cfg.class_names else [str(c) for c in range(top + 1)]
    if top >= len(names):
        raise DataError(f"{root}: label {top} is outside the {len(names)} classes of data.class_names")
    log.debug("arrays: %s, layout %s, %d classes", root, "/".join(sorted(layouts)), len(names))
    info = {"layout": "/".join(sorted(layouts)), "layout_from": "data.layout" if cfg.layout else "inferred"}
    info["in_file"] = sorted(k for k, s in splits.items() if isinstance(s.source, FileArray))  # read a batch at a time
    if unlabeled:
        info["unlabeled"] = unlabeled[0]
    return Source(splits["train"], splits.get("test"), names, val=splits.get("val"), info=info)
