import pickle
import re

import numpy as np
import pytest
import torch

from robustdistill.core.errors import ConfigError, DataError
from robustdistill.data import Augment, BatchLoader, DataConfig, Split, load_dataset
from robustdistill.data.base import long_tailed
from robustdistill.training.config import load_config


def test_digits_split_is_deterministic_stratified_and_disjoint():
    cfg = DataConfig(name="digits", val_fraction=0.2, test_fraction=0.2)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert a.train.x.shape[1:] == (1, 8, 8) and a.num_classes == 10
    assert 0.0 <= a.train.x.min() and a.train.x.max() <= 1.0
    for split in (a.val, a.test):  # every class present in proportion (stratified)
        counts = torch.bincount(split.y, minlength=10).float()
        assert counts.min() >= 0.8 * counts.mean()
    rows = lambda s: {tuple(r.tolist()) + (int(label),) for r, label in zip(s.x.flatten(1), s.y)}
    assert not rows(a.test) & rows(a.val)  # the digits set has a few exact duplicates across classes only
    other = load_dataset(DataConfig(name="digits", val_fraction=0.2, split_seed=1))
    assert not torch.equal(other.test.y, a.test.y)


def test_a_long_tailed_subset_follows_the_exponential_profile_by_hand():
    # four classes of 10, 12, 20, 9 images; ratio 8 over 3 steps: n_c = 9 * 8^(-c/3) = 9, 4.5, 2.25, 1.125
    y = torch.tensor([0] * 10 + [1] * 12 + [2] * 20 + [3] * 9)
    keep = long_tailed(y, 8.0, seed=0)
    assert torch.bincount(y[keep]).tolist() == [9, 4, 2, 1]  # rounded half to even: 4.5 -> 4
    assert torch.equal(keep, long_tailed(y, 8.0, seed=0)) and not torch.equal(keep, long_tailed(y, 8.0, seed=1))
    assert keep.tolist() == sorted(set(keep.tolist()))  # distinct, in order
    assert torch.bincount(y[long_tailed(y, 1.0, seed=0)]).tolist() == [9, 9, 9, 9]


def test_data_imbalance_shapes_the_training_pool_only():
    plain = load_dataset(DataConfig(name="digits"))
    tail = load_dataset(DataConfig(name="digits", imbalance=10))
    counts = torch.bincount(tail.train.y).tolist()
    assert counts == sorted(counts, reverse=True) and round(counts[0] / counts[-1]) == 10
    assert set(torch.unique(tail.train.y).tolist()) == set(range(10))
    for name in ("val", "test"):  # every class whole, the very same images
        assert torch.equal(plain.split(name).y, tail.split(name).y) and torch.equal(
            plain.split(name).x, tail.split(name).x
        )
    # the kept training images are images of the plain pool
    kept = {tuple(row) for row in tail.train.x.flatten(1).tolist()}
    assert kept <= {tuple(row) for row in plain.train.x.flatten(1).tolist()}
    with pytest.raises(ConfigError, match="data.imbalance must be >= 1"):
        load_config(None, ["data.name=digits", "data.imbalance=0.5"])


def test_digits_upsampling_and_subset():
    ds = load_dataset(DataConfig(name="digits", image_size=16, train_subset=100))
    assert ds.train.x.shape == (100, 1, 16, 16) and ds.test.x.shape[-1] == 16
    assert 0.0 <= float(ds.train.x.min()) and float(ds.train.x.max()) <= 1.0


def test_augment_crop_matches_a_per_sample_reference():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 5, 5)
    g = torch.Generator().manual_seed(3)
    out = Augment(padding=2, flip=False)(x, g)
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 5, (6,), generator=g)
    dx = torch.randint(0, 5, (6,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 5])


def test_augment_flip_flips_about_half():
    x = torch.arange(2000 * 4, dtype=torch.float32).view(2000, 1, 1, 4)
    out = Augment(padding=0, flip=True)(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(3)).all(dim=3).flatten()
    kept = (out == x).all(dim=3).flatten()
    assert torch.all(flipped | kept) and 0.45 < flipped.float().mean() < 0.55


def test_loader_shards_cover_every_sample_once():
    split = Split(torch.rand(10, 1, 2, 2), torch.arange(10))
    seen = []
    for rank in range(3):
        for _, y in BatchLoader(split, batch_size=3, rank=rank, world_size=3):
            seen += y.tolist()
    assert sorted(seen) == list(range(10))


def test_training_loader_is_a_function_of_seed_and_epoch():
    split = Split(torch.rand(50, 1, 2, 2), torch.arange(50))
    order = lambda epoch: torch.cat([y for _, y in _epoch(split, epoch)])  # noqa: E731
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    assert len(order(0)) == 48  # the incomplete last batch is dropped in training
    ranks = [torch.cat([y for _, y in _epoch(split, 0, r, 2)]) for r in range(2)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())


def _epoch(split, epoch, rank=0, world=1):
    loader = BatchLoader(split, 16, shuffle=True, seed=1, rank=rank, world_size=world)
    loader.set_epoch(epoch)
    return list(loader)


# --- readers of the standard formats, on tiny fake folders -------------------------------------


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_cifar10(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write_pickle(
            folder / f"data_batch_{i}",
            {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [j % 10 for j in range(n)]},
        )
    _write_pickle(
        folder / "test_batch",
        {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [j % 10 for j in range(n)]},
    )
    _write_pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return folder


def test_cifar10_reader(tmp_path):
    folder = _fake_cifar10(tmp_path, n=20)
    raw = pickle.load(open(folder / "test_batch", "rb"))
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.1))
    assert len(ds.train) + len(ds.val) == 100 and len(ds.test) == 20
    assert ds.class_names[3] == "c3" and ds.train.x.dtype == torch.uint8
    expected = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(ds.test.images()[0], expected)


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, "images of shape (3000,), not 3072 bytes"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "holds 4 images but 3 labels"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, "labels outside 0..9"),
        ({b"pixels": np.zeros((4, 3072), np.uint8)}, "is not a CIFAR batch"),
    ],
)
def test_a_cifar_file_of_the_wrong_size_or_labels_is_one_error(tmp_path, batch, message):
    folder = _fake_cifar10(tmp_path)
    _write_pickle(folder / "data_batch_3", batch)
    with pytest.raises(DataError, match=re.escape(message)) as caught:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.1))
    assert "data_batch_3" in str(caught.value)


def test_an_svhn_file_of_the_wrong_shape_is_one_error(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((28, 28, 3, 5), np.uint8), "y": np.ones((5, 1))})
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.ones((4, 1))})
    with pytest.raises(DataError, match=r"X of shape \(28, 28, 3, 5\), not 32x32x3xN"):
        load_dataset(DataConfig(name="svhn", root=str(tmp_path)))
    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.ones((5, 1))})
    with pytest.raises(DataError, match="holds 5 images but 4 labels"):
        load_dataset(DataConfig(name="svhn", root=str(tmp_path)))


def test_cifar100_reader(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.random.default_rng(0).integers(0, 256, (200, 3072), dtype=np.uint8)
    for split in ("train", "test"):
        _write_pickle(
            folder / split, {b"data": data, b"fine_labels": [i % 100 for i in range(200)], b"coarse_labels": [0] * 200}
        )
    _write_pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path), val_fraction=0.5))
    assert ds.num_classes == 100 and len(ds.test) == 200 and len(ds.val) == 100


def test_svhn_reader_maps_label_10_to_0(tmp_path):
    from scipy.io import savemat

    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 10), dtype=np.uint8)
    y = np.array([[10], [1], [2], [3], [4], [5], [6], [7], [8], [9]])
    for split in ("train", "test"):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    ds = load_dataset(DataConfig(name="svhn", root=str(tmp_path), val_fraction=0.0))
    assert ds.test.y.tolist() == list(range(10))
    assert torch.equal(ds.test.x[0], torch.from_numpy(x[:, :, :, 0]).permute(2, 0, 1))


def _fake_tinyimagenet(tmp_path):
    from PIL import Image

    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n001", "n002"]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n001\tcat, kitty\nn002\tdog\n")
    lines = []
    for k, w in enumerate(wnids):
        images = folder / "train" / w / "images"
        images.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), (k * 100, i, 0)).save(images / f"{w}_{i}.JPEG")
        Image.new("L", (64, 64), 7).save(folder / "val" / "images" / f"val_{k}.JPEG")  # greyscale too
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_tinyimagenet_reader(tmp_path):
    _fake_tinyimagenet(tmp_path)
    ds = load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path), val_fraction=0.0))
    assert ds.class_names == ["cat", "dog"] and ds.train.x.shape == (6, 3, 64, 64)
    assert ds.test.y.tolist() == [0, 1]


def test_tinyimagenet_is_decoded_once_then_read_from_its_cache(tmp_path, monkeypatch):
    import os

    from robustdistill.data import sources

    folder = _fake_tinyimagenet(tmp_path)
    cfg = DataConfig(name="tinyimagenet", root=str(tmp_path), val_fraction=0.0)
    first = load_dataset(cfg)
    (cache,) = (tmp_path / ".robustdistill-cache").glob("tinyimagenet-*.pt")

    def no_decoding(paths):
        raise AssertionError("decoded JPEGs although the cache is valid")

    monkeypatch.setattr(sources, "_read_images", no_decoding)
    second = load_dataset(cfg)
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y, second.test.y)
    # a changed image file is a new cache key: decoded again (and the old cache stays untouched)
    image = next((folder / "train" / "n001" / "images").glob("*.JPEG"))
    os.utime(image, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded JPEGs"):
        load_dataset(cfg)
    assert cache.is_file()
    # data.cache=false never reads nor writes a cache
    monkeypatch.undo()
    off = tmp_path / "off"
    load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path), val_fraction=0.0, cache=False, cache_dir=str(off)))
    assert not off.exists()


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
        ("tinyimagenet", "tiny-imagenet-200"),
    ],
)
def test_missing_dataset_names_the_path_and_layout(tmp_path, name, fragment):
    with pytest.raises(DataError, match=fragment) as info:
        load_dataset(DataConfig(name=name, root=str(tmp_path)))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="needs data.root"):
        load_dataset(DataConfig(name=name))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = _fake_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    _write_pickle(folder / "test_batch", {b"data": Evil(), b"labels": []})
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


def test_the_class_table_shows_each_class_training_count_where_the_report_has_them():
    from robustdistill.evaluation.report import class_table

    report = {
        "data": {"class_names": ["a", "b"], "train_class_counts": [40, 4]},
        "attacks": {"clean": {"class_accuracy": [0.9, 0.5]}, "pgd20": {"class_accuracy": [0.5, 0.25]}},
    }
    table = class_table(report).splitlines()
    assert table[0].split("|")[1:5] == [" class ", " training images ", " clean % ", " pgd20 % "]
    assert table[3].replace(" ", "") == "|b|4|50.00|25.00|"
    del report["data"]["train_class_counts"]  # reports written before the counts were recorded
    assert "training images" not in class_table(report)
