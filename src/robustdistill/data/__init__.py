"""Datasets: the `data` config section, the readers of the papers' datasets (registered by name),
a deterministic train/val/test split, device-resident tensors and the batch loader.

    split.py    Split (images and labels as tensors), resizing
    base.py     DataConfig, the registry DATASETS, Dataset, `load_dataset` (split, imbalance, resize, loader)
    sources.py  the readers: digits (embedded), CIFAR-10/100, SVHN, Tiny-ImageNet (local files)
    own.py      one's own data: image folders (`folder`) and .npz / .npy files (`arrays`)
    mapped.py   images left on the host: .npy / .npz files read a batch at a time, `HostSplit`
    loader.py   batches cut and augmented on the device (`BatchLoader`, `Augment`), or streamed
                from the host by a background thread (`StreamingLoader`)
"""

from . import own, sources  # noqa: F401  (registers the readers)
from .base import DATASETS, DataConfig, Dataset, Source, load_dataset
from .loader import Augment, BatchLoader, StreamingLoader
from .mapped import HostSplit
from .split import Split, subset_of

__all__ = [
    "DATASETS",
    "Augment",
    "BatchLoader",
    "DataConfig",
    "HostSplit",
    "Dataset",
    "Source",
    "Split",
    "StreamingLoader",
    "load_dataset",
    "subset_of",
]
