"""A split of images and labels held as tensors; resizing it (bilinear); its first N images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError


@dataclass
class Split:
    x: torch.Tensor  # N,C,H,W: uint8 in 0..255, or float in [0, 1]
    y: torch.Tensor  # N, int64

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """The images at `index` as stored (uint8 or float), for a loader to move."""
        return self.x[index]

    def images(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float images in [0, 1] (all, or those at `index`)."""
        x = self.x if index is None else self.x[index]
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def take(self, index) -> Split:
        return Split(self.x[index], self.y[index])

    def to(self, device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


def subset_of(split: Split, n: Optional[int], what: str, key: str) -> Split:
    """The first n samples of `split`; more than it has is an error, never silently fewer."""
    if n is None:
        return split
    if n > len(split):
        raise ConfigError(f"{key} = {n} is larger than {what} ({len(split)} images)")
    return split.take(slice(0, n))


def resize(split: Split, size: int) -> Split:
    """`split` with every image resized to size x size (bilinear), as float in [0, 1]."""
    if split.x.shape[-1] == size and split.x.shape[-2] == size:
        return split
    return Split(resize_images(split.x, (size,)), split.y)


def resize_images(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Images (uint8 or float, N,C,H,W) resized to each of `sizes` in turn; unchanged where they have
    that size already, else float in [0, 1]."""
    for size in sizes:
        if x.shape[-2:] == (size, size):
            continue
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x
