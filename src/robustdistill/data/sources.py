"""Readers for the datasets of the papers, each in its standard on-disk format.

Nothing is downloaded: `data.root` points at a folder that holds the files, and a missing file
raises a `DataError` that names the path and the layout expected there.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from ..storage.files import atomic_write
from .base import DATASETS, Source
from .split import Split


def _root(cfg, layout: str, file_ok: bool = False) -> Path:
    """`data.root`, which must exist: a folder holding `layout` (or, with `file_ok`, a file)."""
    if not cfg.root:
        raise DataError(f"dataset '{cfg.name}' needs data.root: a local folder holding {layout}")
    root = Path(cfg.root).expanduser()
    if not (root.exists() if file_ok else root.is_dir()):
        raise DataError(f"data.root {root} does not exist; it should hold {layout}")
    return root


def _need(path: Path, layout: str) -> Path:
    if not path.exists():
        raise DataError(f"missing {path}; expected {layout}")
    return path


@DATASETS.register("digits")
def digits(cfg) -> Source:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16 scaled to [0,1])."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return Source(Split(x, y), None, [str(c) for c in range(10)])


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file cannot run code."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise DataError(f"{path} is not a readable CIFAR pickle: {exc}") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_split(batches: list[dict], label_key: str, files: list[Path], classes: int) -> Split:
    """The images and labels of CIFAR batch files, each checked: (N, 3072) bytes, N labels in range."""
    data, labels = [], []
    for batch, path in zip(batches, files):
        try:
            images = np.asarray(batch["data"], dtype=np.uint8)
            y = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path} is not a CIFAR batch (no usable 'data' and '{label_key}': {exc})") from None
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path} holds images of shape {images.shape[1:]}, not 3072 bytes (3x32x32): not CIFAR")
        if len(y) != len(images):
            raise DataError(f"{path} holds {len(images)} images but {len(y)} labels: the file is damaged")
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise DataError(f"{path} has labels outside 0..{classes - 1} ({y.min()}..{y.max()}): not this dataset")
        data.append(images)
        labels.append(y)
    x = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32).copy())
    return Split(x, torch.from_numpy(np.concatenate(labels)))


def _names(raw: list) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in raw]


@DATASETS.register("cifar10")
def cifar10(cfg) -> Source:
    layout = "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the python version)"
    folder = _need(_root(cfg, layout) / "cifar-10-batches-py", layout)
    train_files = [_need(folder / f"data_batch_{i}", layout) for i in range(1, 6)]
    test_file = _need(folder / "test_batch", layout)
    train, test = [_unpickle(f) for f in train_files], [_unpickle(test_file)]
    meta = folder / "batches.meta"
    names = _names(_unpickle(meta)["label_names"]) if meta.exists() else [str(i) for i in range(10)]
    return Source(_cifar_split(train, "labels", train_files, 10), _cifar_split(test, "labels", [test_file], 10), names)


@DATASETS.register("cifar100")
def cifar100(cfg) -> Source:
    layout = "cifar-100-python/{train, test, meta} (the python version)"
    folder = _need(_root(cfg, layout) / "cifar-100-python", layout)
    train_file, test_file = _need(folder / "train", layout), _need(folder / "test", layout)
    train, test = _unpickle(train_file), _unpickle(test_file)
    meta = folder / "meta"
    names = _names(_unpickle(meta)["fine_label_names"]) if meta.exists() else [str(i) for i in range(100)]
    train_split = _cifar_split([train], "fine_labels", [train_file], 100)
    return Source(train_split, _cifar_split([test], "fine_labels", [test_file], 100), names)


def _svhn_split(path: Path) -> Split:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise DataError(f"{path} is not an SVHN .mat file with X and y: {exc}") from None
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DataError(f"{path} holds X of shape {images.shape}, not 32x32x3xN: not SVHN's cropped digits")
    if len(labels) != images.shape[3]:
        raise DataError(f"{path} holds {images.shape[3]} images but {len(labels)} labels: the file is damaged")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1)).astype(np.uint8))
    y = torch.from_numpy(labels.astype(np.int64) % 10)  # the files label digit 0 as 10
    return Split(x, y)


@DATASETS.register("svhn")
def svhn(cfg) -> Source:
    layout = "train_32x32.mat and test_32x32.mat (the cropped-digits format)"
    root = _root(cfg, layout)
    train = _svhn_split(_need(root / "train_32x32.mat", layout))
    test = _svhn_split(_need(root / "test_32x32.mat", layout))
    return Source(train, test, [str(c) for c in range(10)])


log = logging.getLogger("robustdistill")


def _files_digest(folder: Path, paths: list[Path]) -> str:
    """A digest of the files' names, sizes and modification times: any change makes a new cache."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cached_splits(cfg, root: Path, name: str, digest: str, decode) -> dict[str, Split]:
    """The splits `decode()` returns ({"train": ..., "test": ...}), decoded once and then read from
    `<cache_dir>/<name>-<digest>.pt`; a cache that cannot be written (a read-only data folder) is
    skipped with a warning, never an error."""
    if not cfg.cache:
        return decode()
    folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else root / ".robustdistill-cache"
    path = folder / f"{name}-{digest}.pt"
    if path.is_file():
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            return {k[:-2]: Split(raw[k], raw[k[:-2] + "_y"]) for k in raw if k.endswith("_x")}
        except Exception as exc:  # a damaged cache is decoded again and replaced
            log.warning("ignoring the unreadable cache %s (%s)", path, exc)
    splits = decode()
    raw = {f"{k}_{part}": getattr(s, part) for k, s in splits.items() for part in ("x", "y")}
    try:
        atomic_write(path, lambda tmp: torch.save(raw, tmp))
        log.info("decoded %s once; cached as %s", name, path)
    except OSError as exc:
        log.warning("could not write the decoded-image cache %s (%s); set data.cache_dir", path, exc)
    return splits


def _read_images(paths: list[Path]) -> torch.Tensor:
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


@DATASETS.register("tinyimagenet")
def tinyimagenet(cfg) -> Source:
    """Tiny-ImageNet-200; its labelled `val` folder serves as the test split (the test set has no labels)."""
    layout = (
        "tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, "
        "val/images/*.JPEG, val/val_annotations.txt}"
    )
    root = _root(cfg, layout)
    folder = _need(root / "tiny-imagenet-200", layout)
    wnids = _need(folder / "wnids.txt", layout).read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        images = sorted(_need(folder / "train" / w / "images", layout).glob("*.JPEG"))
        train_paths += images
        train_labels += [index[w]] * len(images)
    val_paths, val_labels = [], []
    for line in _need(folder / "val" / "val_annotations.txt", layout).read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            val_paths.append(_need(folder / "val" / "images" / parts[0], layout))
            val_labels.append(index[parts[1]])
    words = {}
    if (folder / "words.txt").exists():
        for line in (folder / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    names = [words.get(w, w) for w in wnids]

    def decode() -> dict[str, Split]:
        train = Split(_read_images(train_paths), torch.tensor(train_labels, dtype=torch.int64))
        return {"train": train, "test": Split(_read_images(val_paths), torch.tensor(val_labels, dtype=torch.int64))}

    listing = [folder / "wnids.txt", folder / "val" / "val_annotations.txt", *train_paths, *val_paths]
    splits = _cached_splits(cfg, root, "tinyimagenet", _files_digest(folder, listing), decode)
    return Source(splits["train"], splits["test"], names)
