"""Datasets: the `data` config section, the readers of the papers' datasets (registered by name),
a deterministic train/val/test split, device-resident tensors and the batch loader.

    base.py     DataConfig, the registry DATASETS, Split / Dataset, `load_dataset` (split, imbalance, resize)
    sources.py  the readers: digits (embedded), CIFAR-10/100, SVHN, Tiny-ImageNet (local files)
    own.py      one's own data: image folders (`folder`) and .npz / .npy files (`arrays`)
    loader.py   batches cut and augmented on the device (`BatchLoader`, `Augment`)
"""

from . import own, sources  # noqa: F401  (registers the readers)
from .base import DATASETS, DataConfig, Dataset, Source, Split, load_dataset, subset_of
from .loader import Augment, BatchLoader

__all__ = [
    "DATASETS",
    "Augment",
    "BatchLoader",
    "DataConfig",
    "Dataset",
    "Source",
    "Split",
    "load_dataset",
    "subset_of",
]
