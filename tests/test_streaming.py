"""Array files left on disk and the streaming loader: a file's rows read as they are asked for,
the on-device loader's batches bit for bit, the automatic choice, errors that reach the training
loop, and a run trained through either loader giving the same student."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from robustdistill.core.errors import DataError
from robustdistill.data import Augment, BatchLoader, DataConfig, HostSplit, StreamingLoader, load_dataset
from robustdistill.data import base as data_base
from robustdistill.data.base import ExtraData
from robustdistill.data.mapped import FileArray, npz_members, open_npy
from robustdistill.data.split import Split


def _images(n=23, shape=(5, 6, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_an_npy_and_a_stored_npz_member_stay_in_the_file_and_read_any_rows(tmp_path):
    x = _images()
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", image=x, label=np.arange(len(x)))
    for array in (open_npy(tmp_path / "a.npy"), npz_members(tmp_path / "b.npz")["image"]):
        assert isinstance(array, FileArray) and array.shape == x.shape and array.dtype == np.uint8
        rows = np.array([7, 3, 4, 5, 3, 22, 0, 1, 2])  # unordered, repeated, runs of consecutive rows
        assert np.array_equal(array[rows], x[rows])
        assert np.array_equal(array[:], x) and array[np.array([], dtype=np.int64)].shape == (0, 5, 6, 3)
    assert np.array_equal(npz_members(tmp_path / "b.npz")["label"][:], np.arange(len(x)))
    far = _images(1000, (32, 32, 3))  # 3 MiB: rows this far apart are read run by run, not as one stretch
    np.save(tmp_path / "far.npy", far)
    rows = np.array([999, 5, 500, 6, 5, 7, 998])
    assert np.array_equal(open_npy(tmp_path / "far.npy")[rows], far[rows])


def test_a_compressed_npz_or_a_fortran_npy_is_read_into_memory(tmp_path):
    x = _images()
    np.savez_compressed(tmp_path / "c.npz", image=x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    compressed, fortran = npz_members(tmp_path / "c.npz")["image"], open_npy(tmp_path / "f.npy")
    assert isinstance(compressed, np.ndarray) and np.array_equal(compressed, x)
    assert isinstance(fortran, np.ndarray) and np.array_equal(fortran, x)


def test_a_truncated_npy_is_one_line_naming_it(tmp_path):
    np.save(tmp_path / "train_images.npy", _images())
    np.save(tmp_path / "train_labels.npy", np.arange(23) % 3)
    data = (tmp_path / "train_images.npy").read_bytes()
    (tmp_path / "train_images.npy").write_bytes(data[: len(data) - 100])
    with pytest.raises(DataError, match="train_images.npy is truncated"):
        load_dataset(DataConfig(name="arrays", root=str(tmp_path), test_fraction=0.3))


def _arrays(tmp_path: Path, name="d.npz") -> Path:
    """Digits as an uncompressed .npz of uint8 NHWC images (the released generated data's form)."""
    pool = load_dataset(DataConfig(name="digits", val_fraction=0.0)).train
    x = (pool.x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / name, image=x, label=pool.y.numpy())
    return tmp_path / name


def _noisy(tmp_path: Path) -> Path:
    """An "extra" set: the digits' images with noise, as float NCHW in [0, 1]."""
    pool = load_dataset(DataConfig(name="digits", val_fraction=0.0)).train
    noise = torch.randn(pool.x.shape, generator=torch.Generator().manual_seed(1)) * 0.1
    np.savez(tmp_path / "noisy.npz", image=(pool.x + noise).clamp(0, 1).numpy(), label=pool.y.numpy())
    return tmp_path / "noisy.npz"


CASES = {
    "uint8 file": dict(),
    "resized": dict(image_size=12),
    "extra at 0.5": dict(extra="noisy"),
    "extra at 0.5, resized": dict(extra="noisy", image_size=12),
    "held in memory": dict(built_in=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [1, 2])
def test_the_streaming_loader_gives_the_device_loaders_batches_bit_for_bit(tmp_path, case, world):
    options = dict(CASES[case])
    extra = options.pop("extra", None)
    built_in = options.pop("built_in", False)
    raw = dict(name="digits") if built_in else dict(name="arrays", root=str(_arrays(tmp_path)))
    if extra:
        raw["extra"] = ExtraData(source=DataConfig(name="arrays", root=str(_noisy(tmp_path))), fraction=0.5)
    device, stream = (load_dataset(DataConfig(**raw, **options, loader=kind)) for kind in ("device", "stream"))
    assert not device.streamed and stream.streamed
    assert isinstance(stream.train, Split if built_in else HostSplit) and stream.train.y.device.type == "cpu"
    assert np.allclose(device.mean, stream.mean, atol=1e-6) and np.allclose(device.std, stream.std, atol=1e-6)
    for rank in range(world):
        kwargs = dict(shuffle=True, augment=Augment(2, True), seed=5, rank=rank, world_size=world)
        a = BatchLoader(device.train, 32, extra=device.extra, fraction=device.extra_fraction, **kwargs)
        b = StreamingLoader(stream.train, 32, extra=stream.extra, fraction=stream.extra_fraction, **kwargs)
        for epoch in (0, 3):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            batches = list(zip(a, b, strict=True))
            assert len(batches) == len(a) > 10
            for (xa, ya), (xb, yb) in batches:
                assert xb.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_auto_streams_only_training_images_that_do_not_fit(tmp_path, monkeypatch):
    root = str(_arrays(tmp_path))
    monkeypatch.setattr(data_base, "_available_memory", lambda: 10**12)
    assert not load_dataset(DataConfig(name="arrays", root=root)).streamed
    monkeypatch.setattr(data_base, "_available_memory", lambda: 100_000)  # digits' 1,400 x 64 bytes: > half
    auto = load_dataset(DataConfig(name="arrays", root=root))
    assert auto.streamed and isinstance(auto.train, HostSplit)
    assert isinstance(auto.val, Split) and isinstance(auto.test, Split)  # evaluation splits are always held
    assert not load_dataset(DataConfig(name="arrays", root=root, loader="device")).streamed
    assert not load_dataset(DataConfig(name="digits")).streamed  # in memory already: nothing to gain on a CPU
    assert load_dataset(DataConfig(name="digits", loader="stream")).streamed


def test_an_error_while_streaming_reaches_the_training_loop_and_the_thread_ends(tmp_path):
    x = np.random.default_rng(0).random((40, 1, 4, 4)).astype(np.float32)
    x[33] = 2.0  # a float image outside [0, 1], met only when its batch is read
    np.save(tmp_path / "x.npy", x)
    split = HostSplit(open_npy(tmp_path / "x.npy"), torch.zeros(40, dtype=torch.int64), "NCHW", tmp_path / "x.npy")
    before = threading.active_count()
    with pytest.raises(DataError, match=r"x.npy: float images must lie in \[0, 1\]"):
        for _ in StreamingLoader(split, 8, shuffle=False):
            pass
    assert threading.active_count() == before


def test_leaving_a_streamed_epoch_early_stops_its_thread(tmp_path):
    split = HostSplit(_images(200, (4, 4, 1)), torch.zeros(200, dtype=torch.int64), "NHWC", tmp_path / "x")
    before = threading.active_count()
    loader = StreamingLoader(split, 4, shuffle=True, prefetch=1)
    for step, _ in enumerate(loader):
        if step == 2:
            break
    assert len(loader) == 50 and threading.active_count() == before


def test_a_host_split_read_whole_is_the_array_read_at_once(tmp_path):
    x = _images(30, (8, 8, 4))  # RGBA: alpha dropped
    np.save(tmp_path / "x.npy", x)
    split = HostSplit(open_npy(tmp_path / "x.npy"), torch.arange(30), "NHWC", tmp_path / "x.npy")
    held = split.take(torch.tensor([4, 2, 9])).materialise()
    assert held.x.dtype == torch.uint8 and torch.equal(
        held.x, torch.from_numpy(x[[4, 2, 9], :, :, :3]).permute(0, 3, 1, 2)
    )
    assert split.shape == (30, 3, 8, 8) and split.resized(16).shape == (30, 3, 16, 16)
    assert split.nbytes == 30 * 3 * 64 and split.resized(16).nbytes == 30 * 3 * 256 * 4  # resized: float32


@pytest.mark.slow
def test_a_run_trained_through_the_streaming_loader_equals_the_device_loaders(tmp_path):
    """Through the CLI, built-in digits (in memory, so both loaders take the same mean and std), PGD-AT:
    the same student bit for bit."""
    from safetensors.torch import load_file

    from robustdistill.cli import main

    common = [f"out_dir={tmp_path}", "train.epochs=2", "attack.steps=2", "eval.attacks=[clean]", "eval.checks=false"]
    for kind in ("device", "stream"):
        assert main(["train", "pgd_at", *common, f"name={kind}", f"data.loader={kind}"]) == 0
    device, stream = (
        load_file(str(tmp_path / kind / "checkpoints" / "last.safetensors")) for kind in ("device", "stream")
    )
    assert device.keys() == stream.keys() and all(torch.equal(device[k], stream[k]) for k in device)
