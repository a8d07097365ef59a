"""Images that stay on the host: arrays left in their `.npy` / uncompressed `.npz` files (or held in
host memory), read one batch at a time.

`open_npy` and `npz_members` open a file's arrays without reading them: an `.npy` file and every
member of an `.npz` written by `np.savez` (stored, not compressed) become a `FileArray`, whose rows
are read with positioned reads (`os.preadv`: one per run of consecutive rows, or one for the whole
stretch when the rows lie within 1 MiB or 4x the batch's bytes) into a buffer of the batch's size;
only a compressed member (`np.savez_compressed`) or a Fortran-ordered array has to be read into
memory whole. Positioned reads rather than a memory map: touching one 3 KB row of a map
makes the kernel map the pages around it too (fault-around, 64 KB), so a batch of random rows would
occupy twenty times its size of resident memory; a read occupies what it reads. The kernel's page
cache still keeps a file that fits in memory there, so a second epoch reads from memory.

`HostSplit` is a split over such an array: taking a subset, holding out a validation split or a
long-tailed profile only composes row indices, and `batch(index)` reads the rows of one batch, in
the array's own layout turned to N,C,H,W.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core.errors import DataError
from .split import Split, resize, resize_images

CHUNK_BYTES = 64 * 2**20  # what one pass over a whole array reads at a time
SPAN_BYTES = 2**20  # rows of a batch this close together are read in one stretch


class FileArray:
    """An array stored in a file at `offset` (C order), read a set of rows at a time."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, np.dtype(dtype), tuple(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if offset + shape[0] * self.row_bytes > path.stat().st_size:
            raise DataError(f"{path} is truncated: it ends before its {shape} array of {dtype} does")
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        """The rows at `rows` (an integer array, any order, repeats allowed, or a slice), in that order."""
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        low, high = int(rows.min()), int(rows.max()) + 1
        if (high - low) * self.row_bytes <= max(SPAN_BYTES, 4 * len(rows) * self.row_bytes):
            return self._span(low, high)[rows - low]  # rows close together: one read of the stretch
        order = np.argsort(rows, kind="stable")  # read the file front to back, one read per run
        ordered = rows[order]
        got = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        flat = memoryview(got.reshape(-1).view(np.uint8))
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            at = self.offset + int(ordered[start]) * self.row_bytes
            self._fill(flat[int(start) * self.row_bytes : int(stop) * self.row_bytes], at)
        out = np.empty_like(got)
        out[order] = got
        return out

    def _span(self, low: int, high: int) -> np.ndarray:
        got = np.empty((high - low, *self.shape[1:]), dtype=self.dtype)
        self._fill(memoryview(got.reshape(-1).view(np.uint8)), self.offset + low * self.row_bytes)
        return got

    def _fill(self, buffer: memoryview, at: int) -> None:
        """Read len(buffer) bytes from `at` into `buffer`."""
        begin = 0
        while begin < len(buffer):
            n = os.preadv(self._fd, [buffer[begin:]], at + begin)
            if n <= 0:
                raise DataError(f"{self.path} ended while reading it (was it changed during the run?)")
            begin += n


def _header(f, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        return np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise DataError(f"{path} is not a readable numpy file ({exc})") from None


def open_npy(path: Path) -> np.ndarray | FileArray:
    """The array of an .npy file, left in the file (a C-ordered, non-object array) or else read."""
    with open(path, "rb") as f:
        shape, fortran, dtype = _header(f, path)
        offset = f.tell()
    if fortran or dtype.hasobject:
        return np.load(path, allow_pickle=False)
    return FileArray(path, offset, dtype, shape)


def npz_members(path: Path) -> dict[str, np.ndarray | FileArray]:
    """Every array of an .npz file by name (without `.npy`): stored members left in the file,
    compressed ones read."""
    out: dict[str, np.ndarray | FileArray] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            stored = _stored_member(path, info) if info.compress_type == zipfile.ZIP_STORED else None
            if stored is not None:
                out[name] = stored
            else:
                with archive.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
    return out


def _stored_member(path: Path, info: zipfile.ZipInfo) -> Optional[FileArray]:
    """A stored .npz member as a `FileArray` (None when its array cannot be read in parts)."""
    with open(path, "rb") as f:  # the member's local header says where its bytes begin
        f.seek(info.header_offset)
        local = f.read(30)
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little")
        start += int.from_bytes(local[28:30], "little")
        f.seek(start)
        shape, fortran, dtype = _header(f, path)
        offset = f.tell()
    return None if fortran or dtype.hasobject else FileArray(path, offset, dtype, shape)


def as_array(value: np.ndarray | FileArray) -> np.ndarray:
    """The whole array (a file's read into memory)."""
    return value[:] if isinstance(value, FileArray) else value


class HostSplit:
    """A split whose images stay in a host array (a `FileArray` or one in memory), read per batch.

    `array` is N,H,W / N,H,W,C / N,C,H,W as `layout` says; `rows` picks and orders the rows this
    split holds (None: all); each of `sizes` in turn resizes every image (bilinear, as
    `load_dataset` resizes whole splits) when it is read. Float values outside [0, 1] are refused
    when read.
    """

    def __init__(
        self,
        source: np.ndarray | FileArray,
        y: torch.Tensor,
        layout: str,
        path: Path,
        rows: Optional[np.ndarray] = None,
        sizes: tuple[int, ...] = (),
    ):
        self.source, self.y, self.layout, self.path = source, y, layout, path
        self.rows, self.sizes = rows, sizes

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        raw = self.source.shape
        if self.layout == "NHW":
            h, w, c = raw[1], raw[2], 1
        elif self.layout == "NHWC":
            h, w, c = raw[1], raw[2], raw[3]
        else:
            h, w, c = raw[2], raw[3], raw[1]
        c = 3 if c == 4 else c  # alpha dropped
        if self.sizes:
            h = w = self.sizes[-1]
        return len(self), c, h, w

    @property
    def nbytes(self) -> int:
        """Bytes of the split as the on-device loader holds it (float32 once resized or stored as float)."""
        n, c, h, w = self.shape
        resized = (h, w) != self.resized().shape[2:]
        return n * c * h * w * (4 if resized or self.source.dtype != np.uint8 else 1)

    def take(self, index) -> HostSplit:
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        rows = index if self.rows is None else self.rows[index]
        return HostSplit(self.source, self.y[torch.from_numpy(index)], self.layout, self.path, rows, self.sizes)

    def resized(self, *sizes: int) -> HostSplit:
        """This split read at `sizes` (resized once for each; none: as stored)."""
        return HostSplit(self.source, self.y, self.layout, self.path, self.rows, sizes)

    def _read(self, index: np.ndarray) -> torch.Tensor:
        """The images at `index` (positions in this split) as N,C,H,W, uint8 or float32, unresized."""
        raw = self.source[index if self.rows is None else self.rows[index]]
        if self.layout == "NHW":
            raw = raw[:, None]
        elif self.layout == "NHWC":
            raw = raw.transpose(0, 3, 1, 2)
        if raw.shape[1] == 4:
            raw = raw[:, :3]
        if raw.dtype == np.uint8:
            return torch.from_numpy(np.ascontiguousarray(raw))
        x = np.ascontiguousarray(raw, dtype=np.float32)
        if len(x) and not (0.0 <= float(x.min()) and float(x.max()) <= 1.0):
            raise DataError(f"{self.path}: float images must lie in [0, 1], these span [{x.min():g}, {x.max():g}]")
        return torch.from_numpy(x)

    def batch(self, index) -> torch.Tensor:
        """The images at `index` as the loaders move them: uint8 when they are stored so and need no
        resizing, else float32 in [0, 1] (resized as `load_dataset` resizes a whole split)."""
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        return resize_images(self._read(index), self.sizes)

    def images(self, index=None) -> torch.Tensor:
        x = self.batch(np.arange(len(self)) if index is None else index)
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

    def materialise(self) -> Split:
        """The split read into one in-memory tensor, chunk by chunk, then resized whole: the tensors
        the on-device loader holds, as `load_dataset` built them from an array read at once."""
        n, c, h, w = self.resized().shape
        x = torch.empty((n, c, h, w), dtype=torch.uint8 if self.source.dtype == np.uint8 else torch.float32)
        step = max(1, CHUNK_BYTES // max(1, c * h * w * x.element_size()))
        for start in range(0, n, step):
            x[start : start + step] = self._read(np.arange(start, min(n, start + step)))
        split = Split(x, self.y)
        for size in self.sizes:
            split = resize(split, size)
        return split

    def to(self, device) -> Split:
        return self.materialise().to(device)

    def moments(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of the images in [0, 1], in float64 chunk by chunk."""
        n, c, h, w = self.shape
        total, squares = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        step = max(1, CHUNK_BYTES // (4 * c * h * w))
        for start in range(0, n, step):
            x = self.images(np.arange(start, min(n, start + step))).double()
            total += x.sum(dim=(0, 2, 3))
            squares += x.square().sum(dim=(0, 2, 3))
        count = n * h * w
        mean = total / count
        var = (squares - count * mean.square()) / max(count - 1, 1)
        return mean.float().tolist(), var.clamp_min(0).sqrt().float().clamp_min(1e-3).tolist()
