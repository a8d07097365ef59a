"""Datasets: the `data` config section, a registry of readers, a deterministic train/val/test
split, device-resident tensors.

Every reader returns whole splits as tensors (uint8 0..255 or float in [0, 1], NCHW). The data is
moved once to the training device and batches are cut and augmented there (see `loader.py`): no
DataLoader workers, no per-sample Python. The validation split is held out of the training pool,
stratified, as a pure function of `data.split_seed`, so model selection never sees the test set.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from ..core.errors import DataError, require
from ..core.registry import Registry
from ..core.schema import SEED_LIMIT
from .mapped import HostSplit
from .split import Split, resize

DATASETS: Registry[Callable] = Registry("dataset")
log = logging.getLogger("robustdistill")


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: Optional[str] = None  # folder holding the dataset files (not needed for digits)
    image_size: Optional[int] = None  # resize images to this side (digits: 8 -> e.g. 32)
    val_fraction: float = 0.02  # share of the training pool held out, stratified, for model selection
    test_fraction: float = 0.2  # only for datasets without an official test split (digits)
    split_seed: int = 0  # the train/val(/test) split is a pure function of this seed
    train_subset: Optional[int] = None  # use only the first N (shuffled) training images
    imbalance: Optional[float] = None  # long-tailed training pool: largest / smallest class (CIFAR-10-LT style)
    crop_padding: int = 4  # random crop with this zero padding; 0 disables
    flip: bool = True  # random horizontal flip
    cache: bool = True  # keep decoded images of JPEG datasets (Tiny-ImageNet) as one tensor file
    cache_dir: Optional[str] = None  # where (default: <root>/.robustdistill-cache)
    layout: Optional[Literal["NHWC", "NCHW"]] = None  # arrays: the images' axes (None: inferred from the shape)
    class_names: Optional[list[str]] = None  # arrays: the classes' names (None: "0" .. the largest label)
    extra: Optional[ExtraData] = None  # extra training images (e.g. generated ones) mixed into every batch
    loader: Literal["auto", "device", "stream"] = "auto"  # training images on the device, or streamed from the host

    def validate(self) -> None:
        DATASETS.get(self.name)
        require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
        require(0.0 < self.test_fraction < 1.0, "data.test_fraction", "must be in (0, 1)")
        require(self.crop_padding >= 0, "data.crop_padding", "must be >= 0")
        require(self.image_size is None or self.image_size > 0, "data.image_size", "must be > 0")
        require(self.train_subset is None or self.train_subset > 0, "data.train_subset", "must be > 0")
        require(self.imbalance is None or self.imbalance >= 1, "data.imbalance", "must be >= 1 (largest / smallest)")
        require(0 <= self.split_seed < SEED_LIMIT, "data.split_seed", "must be an integer in [0, 2**32)")
        require(self.layout in (None, "NHWC", "NCHW"), "data.layout", "must be NHWC or NCHW")
        require(self.loader in ("auto", "device", "stream"), "data.loader", "must be auto, device or stream")
        if self.class_names is not None:
            names = self.class_names
            require(len(names) >= 2, "data.class_names", "must name at least two classes")
            require(len(set(map(str, names))) == len(names), "data.class_names", "names a class twice")
        if self.extra is not None:
            self.extra.validate()


@dataclass
class ExtraData:
    """Extra training images, read by any data section, each training batch `fraction` of them."""

    source: DataConfig = field(default_factory=lambda: DataConfig(name="arrays"))  # where they are: a data section
    fraction: float = 0.5  # share of every training batch (0.7 in the generated-data papers)

    def validate(self) -> None:
        require(0.0 <= self.fraction < 1.0, "data.extra.fraction", "must be in [0, 1)")
        require(self.source.extra is None, "data.extra.source.extra", "must be empty: extra data has no extra data")
        self.source.validate()


@dataclass
class Source:
    """What a reader returns: the training pool, the official test split if there is one, and a
    validation split when the data comes with one (otherwise it is held out of the pool)."""

    train: Split
    test: Optional[Split]
    class_names: list[str]
    val: Optional[Split] = None
    info: dict = field(default_factory=dict)  # what the reports record of how it was read (arrays: the layout)


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    extra: Optional[Split] = None  # extra training images (data.extra), mixed into the training batches
    extra_fraction: float = 0.0
    extra_info: Optional[dict] = None  # what the reports say of data.extra (source, root, fraction, images)
    streamed: bool = False  # train and extra stay on the host (HostSplit or CPU tensors): the streaming loader
    info: dict = field(default_factory=dict)  # the reader's record of how it read the data (Source.info)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.shape[1])

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def to(self, device) -> Dataset:
        """The dataset on `device`; a streamed one's training (and extra) images stay on the host."""
        moved = {k: getattr(self, k).to(device) for k in ("val", "test")}
        if not self.streamed:
            moved |= {"train": self.train.to(device), "extra": None if self.extra is None else self.extra.to(device)}
        return dataclasses.replace(self, **moved)


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, held_out) with `fraction` of every class held out; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    keep_idx = np.sort(np.concatenate(keep))
    held_idx = np.sort(np.concatenate(held))
    return torch.from_numpy(keep_idx), torch.from_numpy(held_idx)


def long_tailed(y: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Indices of a long-tailed subset (sorted): class c keeps n_min * ratio^(-c / (C - 1)) images
    (rounded, at least 1), n_min being the smallest class's count, so class 0 is the head and the
    last class the tail, with `ratio` between them (the CIFAR-10-LT profile); which images each class
    keeps is deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    classes = np.unique(labels)
    n_min = min(int((labels == c).sum()) for c in classes)
    keep = []
    for rank, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        count = max(1, int(round(n_min * ratio ** (-rank / max(len(classes) - 1, 1)))))
        keep.append(np.sort(idx[rng.permutation(len(idx))[:count]]))
    return torch.from_numpy(np.sort(np.concatenate(keep)))


def load_dataset(cfg, device: torch.device | str = "cpu", extra: bool = True) -> Dataset:
    """Read dataset `cfg.name` (a `DataConfig`), split it, and put it on `device` (the training images
    stay on the host when `cfg.loader` streams them, see `streams`); `extra=False` leaves
    `data.extra`'s images unread (an evaluation does not need them; its report still names them)."""
    source: Source = DATASETS.get(cfg.name)(cfg)
    if source.info.get("unlabeled"):
        raise DataError(f"{source.info['unlabeled']}; only data.extra may be unlabeled")
    pool, test = source.train, source.test
    if test is None:
        keep, held = stratified_split(pool.y, cfg.test_fraction, cfg.split_seed)
        pool, test = pool.take(keep), pool.take(held)
    if source.val is not None:
        train, val = pool, source.val
    else:
        keep, held = stratified_split(pool.y, cfg.val_fraction, cfg.split_seed + 1)
        train, val = pool.take(keep), pool.take(held)
    if cfg.imbalance is not None:  # the training pool only: validation and test keep every class whole
        train = train.take(long_tailed(train.y, cfg.imbalance, cfg.split_seed + 2))
    if cfg.train_subset is not None and cfg.train_subset < len(train):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.split_seed))
        train = train.take(order[: cfg.train_subset].sort().values)
    sizes = () if cfg.image_size is None else (cfg.image_size,)
    val, test = (_in_memory(s, sizes) for s in (val, test))
    train = _sized(train, sizes)
    mixed = cfg.extra is not None and cfg.extra.fraction > 0
    added = _extra(cfg, train, source.class_names) if mixed and extra else None
    streamed = streams(cfg.loader, device, train, added)
    if not streamed:
        train = _in_memory(train, ())
        added = None if added is None else _in_memory(added, ())
    if isinstance(train, HostSplit):  # never read whole: float64 sums, chunk by chunk
        mean, std = train.moments()
    else:
        images = train.images()
        mean = images.mean(dim=(0, 2, 3)).tolist()
        std = images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    info = None
    if mixed:
        info = {"source": cfg.extra.source.name, "root": cfg.extra.source.root, "fraction": cfg.extra.fraction}
        info["epoch"] = "one pass over the original training images"  # what train.epochs counts
        if added is not None:
            info |= {"images": len(added), "labels": bool(len(added) and int(added.y.min()) >= 0)}
    fraction = cfg.extra.fraction if added is not None else 0.0
    dataset = Dataset(
        cfg.name, source.class_names, train, val, test, mean, std, added, fraction, info, streamed, source.info
    )
    return dataset.to(device)


def _sized(split, sizes: tuple[int, ...]):
    """`split` resized to each of `sizes` in turn: a host split when it is read, a tensor split now."""
    if isinstance(split, HostSplit):
        return split.resized(*split.sizes, *sizes)
    for size in sizes:
        split = resize(split, size)
    return split


def _in_memory(split, sizes: tuple[int, ...]) -> Split:
    """`split` (a tensor split, or a host split read whole) resized to `sizes`."""
    split = _sized(split, sizes)
    return split.materialise() if isinstance(split, HostSplit) else split


def streams(choice: str, device, train, extra) -> bool:
    """Whether the training images are streamed from the host (`data.loader`): as chosen, or with
    "auto" when they (and the extra ones) would take more than half of the device's free memory;
    on a CPU, only array files (read a batch at a time) that would take more than half of the
    available memory are."""
    splits = [s for s in (train, extra) if s is not None]
    need = sum(s.nbytes for s in splits)
    device = torch.device(device)
    if choice != "auto":
        chosen, why = choice == "stream", f"data.loader={choice}"
    elif device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        chosen, why = need > free // 2, f"data.loader=auto, {_gib(free)} free on {device}"
    else:
        files = any(isinstance(s, HostSplit) for s in splits)
        free = _available_memory()
        chosen = files and need > free // 2
        why = f"data.loader=auto, {_gib(free)} of memory available"
    where = "streamed from the host by a background thread" if chosen else f"held on {device}"
    # said when it is not the plain case (the images fit and stay on the device unasked)
    say = log.info if chosen or choice != "auto" else log.debug
    say("data: the training images (%s) are %s (%s)", _gib(need), where, why)
    return chosen


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: assume it fits


def _extra(cfg, train, class_names: list[str]):
    """The training images of `data.extra.source` (its test and validation splits unused), resized
    with the original ones; refused when their shape or classes are not the original data's."""
    source: Source = DATASETS.get(cfg.extra.source.name)(cfg.extra.source)
    sizes = tuple(s for s in (cfg.extra.source.image_size, cfg.image_size) if s is not None)
    extra = _sized(source.train, sizes)  # its own resize, then the original data's
    if len(extra) == 0:
        raise DataError(f"data.extra ({cfg.extra.source.name}) holds no training images")
    if extra.shape[1:] != train.shape[1:]:
        raise DataError(
            f"data.extra holds images of shape {tuple(extra.shape[1:])}, the training data "
            f"{tuple(train.shape[1:])}: give data.extra.source.image_size, or convert them"
        )
    names = source.class_names
    numbered = names == [str(c) for c in range(len(names))]  # a reader that knows no names
    if len(names) > len(class_names) or not (numbered or names == class_names):
        raise DataError(
            f"data.extra's classes ({', '.join(names[:12])}) are not the training data's "
            f"({', '.join(class_names[:12])})"
        )
    return extra
