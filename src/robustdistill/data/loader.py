"""Training batches, augmented as whole batches on the device (airbench-style).

`BatchLoader` cuts them from tensors that live on the device; `StreamingLoader` (for data that does
not fit there) assembles the same batches on the host, in a background thread, from host memory or
from array files read a batch at a time, and copies each to the device (from pinned memory on a
GPU) while the previous one trains. Random crop with zero padding and horizontal flip are done on
the batch tensor with one gather per axis and one `where`, so augmentation costs a few kernel
launches per batch on any device.
Shuffling is a pure function of (seed, epoch): a resumed run sees the same order, and every DDP
rank draws the same permutation and takes its own interleaved shard of it.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .split import Split


@dataclass
class Augment:
    padding: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.padding > 0:
            p = self.padding
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=generator)
            dx = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=generator)
            rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
            cols = (dx[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
            c = x.shape[1]
            x = padded.gather(2, rows.expand(n, c, h, padded.shape[3]))
            x = x.gather(3, cols.expand(n, c, h, w))
        if self.flip:
            mask = torch.rand(n, device=x.device, generator=generator) < 0.5
            x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
        return x


class BatchLoader:
    """Iterate over (images in [0,1], labels) batches of a `Split` that lives on the device.

    `batch_size` is the global batch; with `world_size` ranks each yields batch_size/world_size.
    Training loaders (`shuffle=True`) drop the last incomplete global batch so that every rank
    does the same number of steps; evaluation loaders keep every sample exactly once.

    With `extra` (a second split, e.g. generated images) and `fraction`, every training batch is
    round(fraction * batch_size) extra images and the rest original ones, the original ones first;
    an epoch is one pass over the original split, and the extra images of each epoch are a fresh
    permutation of the extra split (several, back to back, when one is not enough). Both streams
    are sharded across the ranks as the original one alone is, so a global batch holds the same
    images on any number of ranks.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Optional[Augment] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        extra: Optional[Split] = None,
        fraction: float = 0.0,
    ):
        self.split = split
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.local_batch = max(1, batch_size // world_size)
        self.epoch = 0
        self.extra = extra if extra is not None and fraction > 0 else None
        self.local_extra = 0  # of local_batch, the extra images
        if self.extra is not None:
            assert shuffle, "extra images mix into training batches only"
            self.local_extra = round(fraction * batch_size) // world_size
        self.local_original = self.local_batch - self.local_extra

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.split)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
            usable = (n // (self.local_original * self.world_size)) * self.local_original * self.world_size
            order = order[: max(usable, 0)]
        else:
            order = torch.arange(n)
        return order[self.rank :: self.world_size]

    def _extra_indices(self, steps: int) -> torch.Tensor:
        """This rank's extra images of the epoch: `steps` batches' worth of back-to-back permutations."""
        need, n = steps * self.local_extra * self.world_size, len(self.extra)
        parts, k = [], 0
        while sum(len(p) for p in parts) < need:
            k += 1
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 1_000_003 * k)
            parts.append(torch.randperm(n, generator=g))
        order = torch.cat(parts)[:need] if parts else torch.zeros(0, dtype=torch.long)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.local_original if self.shuffle else math.ceil(n / self.local_batch)

    def _plan(self, device: torch.device) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Each step's (original, extra) indices, this rank's, on `device` (extra None without extra data)."""
        index = self._indices().to(device)
        if self.extra is None:
            return [(index[s : s + self.local_batch], None) for s in range(0, len(index), self.local_batch)]
        steps, original, added = len(self), self.local_original, self.local_extra
        extra = self._extra_indices(steps).to(device)
        return [(index[i * original : (i + 1) * original], extra[i * added : (i + 1) * added]) for i in range(steps)]

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        """The augmentation's random stream of this epoch and rank, on `device` (None without augmentation)."""
        if self.augment is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed * 100_003 + self.epoch + 7919 * (self.rank + 1))
        return generator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.split.y.device
        generator = self._generator(device)
        for mine, theirs in self._plan(device):
            x, y = self.split.images(mine), self.split.y[mine]
            if theirs is not None:
                x = torch.cat([x, self.extra.images(theirs).to(device)])
                y = torch.cat([y, self.extra.y[theirs].to(device)])
            if self.augment is not None:
                x = self.augment(x, generator)
            yield x, y


class StreamingLoader(BatchLoader):
    """`BatchLoader`'s batches, for training images that stay on the host.

    The same seed gives the same batches, image for image and bit for bit: the same indices, read
    from the host split (`batch(index)`: uint8 as stored, or float once resized), moved to
    `device`, turned into float there and augmented there with the same generator. A background
    thread reads up to `prefetch` batches ahead (pinned when the device is a GPU); an error in it
    is raised in the training loop.
    """

    def __init__(self, *args, device: torch.device | str = "cpu", prefetch: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = torch.device(device)
        self.prefetch = max(1, prefetch)

    def _assemble(self, mine: torch.Tensor, theirs: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.split.batch(mine), self.split.y[mine]
        if theirs is not None:
            other = self.extra.batch(theirs)
            if other.dtype != x.dtype:  # one of them resized or stored as float: both as float
                x, other = (_float(t) for t in (x, other))
            x, y = torch.cat([x, other]), torch.cat([y, self.extra.y[theirs]])
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = self._generator(self.device)
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        plan = self._plan(torch.device("cpu"))  # the host split is read with host indices
        worker = threading.Thread(target=self._work, args=(plan, ready, stop), daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                x, y = item
                x = _float(x.to(self.device, non_blocking=True))
                y = y.to(self.device, non_blocking=True)
                if self.augment is not None:
                    x = self.augment(x, generator)
                yield x, y
        finally:
            stop.set()
            while worker.is_alive():  # unblock a worker waiting to put
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()

    def _work(self, plan, ready: queue.Queue, stop: threading.Event) -> None:
        try:
            for mine, theirs in plan:
                item = self._assemble(mine, theirs)
                if not _put(ready, item, stop):
                    return
        except BaseException as exc:  # raised in the training loop
            _put(ready, exc, stop)
            return
        _put(ready, _END, stop)


_END = object()


def _put(ready: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
