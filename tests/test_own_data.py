"""One's own data: image folders (`data.name: folder`) and array files (`data.name: arrays`)."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import digits_config
from robustdistill.core.errors import DataError
from robustdistill.data import DataConfig, load_dataset

DIGITS = dict(val_fraction=0.2, test_fraction=0.2, split_seed=3)


def _same(a, b):
    for split in ("train", "val", "test"):
        sa, sb = a.split(split), b.split(split)
        assert sa.x.dtype == sb.x.dtype and torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y), split
    assert a.class_names == b.class_names and a.mean == b.mean and a.std == b.std


def _raw_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def test_digits_written_to_an_npz_read_back_bit_for_bit_as_the_builtin_reader(tmp_path):
    images, labels = _raw_digits()
    np.savez(tmp_path / "digits.npz", image=(images / 16.0).astype(np.float32)[:, None], label=labels)
    own = load_dataset(DataConfig(name="arrays", root=str(tmp_path / "digits.npz"), **DIGITS))
    _same(own, load_dataset(DataConfig(name="digits", **DIGITS)))


def _spec(dataset):
    from robustdistill.models import ModelSpec

    return ModelSpec("small_cnn", dataset.num_classes, dataset.channels)


def _digits_uint8(tmp_path):
    """The digits as 8-bit images (value * 15), written as a folder tree and as an .npz in the
    tree's order (class by class, then by file name)."""
    images, labels = _raw_digits()
    order = np.argsort(labels, kind="stable")
    pixels = (images[order] * 15).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, labels[order])):
        folder = tmp_path / "tree" / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    np.savez(tmp_path / "digits8.npz", x=pixels[:, :, :, None], y=labels[order])  # NHWC, inferred
    return tmp_path / "tree", tmp_path / "digits8.npz"


def test_an_image_tree_reads_the_same_tensors_as_the_same_images_in_an_npz(tmp_path):
    tree, npz = _digits_uint8(tmp_path)
    folder = load_dataset(DataConfig(name="folder", root=str(tree), **DIGITS))
    arrays = load_dataset(
        DataConfig(name="arrays", root=str(npz), class_names=[f"digit{c}" for c in range(10)], **DIGITS)
    )
    assert folder.train.x.dtype == torch.uint8 and folder.train.x.shape[1:] == (1, 8, 8)
    assert folder.class_names == [f"digit{c}" for c in range(10)]
    _same(folder, arrays)
    assert arrays.info == {"layout": "NHWC", "layout_from": "inferred", "in_file": ["train"]}  # what reports record
    from robustdistill.evaluation.report import build_report

    report = build_report({}, _spec(arrays), "m.safetensors", arrays, "test", len(arrays.test), 0)
    assert (
        report["data"]["read"]["layout"] == "NHWC"
        and "read" not in build_report({}, _spec(folder), "m.safetensors", folder, "test", len(folder.test), 0)["data"]
    )


def test_an_image_tree_is_decoded_once_then_read_from_its_cache(tmp_path, monkeypatch):
    from robustdistill.data import own

    tree = tmp_path / "tree"
    for c in ("cat", "dog"):
        (tree / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (5, 5), (i * 40, 90 if c == "dog" else 0, 7)).save(tree / c / f"{i}.png")
    cfg = DataConfig(name="folder", root=str(tree), val_fraction=0.0, test_fraction=0.34)
    first = load_dataset(cfg)

    def no_decoding(*args):
        raise AssertionError("decoded the images although the cache is valid")

    monkeypatch.setattr(own, "_decode", no_decoding)
    _same(first, load_dataset(cfg))
    Image.new("RGB", (5, 5), (1, 2, 3)).save(tree / "dog" / "3.png")  # a new file: a new cache key
    with pytest.raises(AssertionError, match="decoded the images"):
        load_dataset(cfg)


def test_train_test_and_val_trees_are_used_as_given(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (4, 4), 10 * i + (c == "b")).save(tmp_path / split / c / f"{i}.png")
    ds = load_dataset(DataConfig(name="folder", root=str(tmp_path), val_fraction=0.5))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 4, 6)  # no image of train/ held out
    assert ds.channels == 1 and ds.test.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.val.x[2, 0, 0, 0].item() == 10 * 0 + 1  # val/b/0.png


def test_images_are_rgb_unless_all_are_grayscale_and_alpha_is_dropped(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("L", (3, 3), 200).save(tmp_path / c / "0.png")
    Image.new("RGBA", (3, 3), (10, 20, 30, 0)).save(tmp_path / "b" / "1.png")
    ds = load_dataset(DataConfig(name="folder", root=str(tmp_path), val_fraction=0.0, test_fraction=0.5, cache=False))
    pool = torch.cat([ds.train.x, ds.test.x])
    assert pool.shape[1] == 3
    colours = {tuple(pool[i, :, 0, 0].tolist()) for i in range(len(pool))}
    assert colours == {(200, 200, 200), (10, 20, 30)}


def test_image_size_resizes_the_shorter_side_then_crops_the_centre_by_hand(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    wide = np.zeros((2, 6), dtype=np.uint8)
    wide[:, 2:4] = 255  # a bright band in the middle two columns of six
    Image.fromarray(wide).save(tmp_path / "a" / "0.png")
    Image.fromarray(np.full((4, 4), 50, dtype=np.uint8)).save(tmp_path / "b" / "0.png")
    cfg = DataConfig(name="folder", root=str(tmp_path), image_size=2, val_fraction=0.0, test_fraction=0.5, cache=False)
    ds = load_dataset(cfg)
    pool = {int(y): x for x, y in zip(torch.cat([ds.train.x, ds.test.x]), torch.cat([ds.train.y, ds.test.y]))}
    # 6x2 stays 6x2 (shorter side already 2), then the centre 2x2 crop is the bright band
    assert pool[0].tolist() == [[[255, 255], [255, 255]]]
    assert pool[1].tolist() == [[[50, 50], [50, 50]]]  # 4x4 -> 2x2: a flat image stays flat


def test_nhwc_and_nchw_are_inferred_or_given(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "hwc.npz", image=x, label=y)
    np.savez(tmp_path / "chw.npz", image=x.transpose(0, 3, 1, 2), label=y)
    cfg = DataConfig(name="arrays", val_fraction=0.0, test_fraction=0.5, split_seed=1)
    a = load_dataset(dataclasses.replace(cfg, root=str(tmp_path / "hwc.npz")))
    b = load_dataset(dataclasses.replace(cfg, root=str(tmp_path / "chw.npz")))
    assert a.train.x.shape[1:] == (3, 5, 7) and torch.equal(a.train.x, b.train.x)
    np.savez(tmp_path / "both.npz", image=np.zeros((4, 3, 5, 3), dtype=np.uint8), label=np.arange(4) % 2)
    with pytest.raises(DataError, match="cannot tell whether .* NHWC or NCHW; set data.layout"):
        load_dataset(dataclasses.replace(cfg, root=str(tmp_path / "both.npz")))
    given = load_dataset(dataclasses.replace(cfg, root=str(tmp_path / "both.npz"), layout="NHWC"))
    assert given.train.x.shape[1:] == (3, 3, 5)


def test_a_folder_of_split_npy_files(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("test", 4)):
        np.save(tmp_path / f"{split}_images.npy", rng.random((n, 1, 5, 5), dtype=np.float32))
        np.save(tmp_path / f"{split}_labels.npy", np.arange(n) % 2)
    ds = load_dataset(DataConfig(name="arrays", root=str(tmp_path), val_fraction=0.25))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4) and ds.class_names == ["0", "1"]


def _tree(tmp_path, sizes=((4, 4), (4, 4))):
    for c, size in zip(("a", "b"), sizes):
        (tmp_path / c).mkdir(parents=True, exist_ok=True)
        Image.new("L", size, 9).save(tmp_path / c / "0.png")
    return tmp_path


def _npz(tmp_path, image, label):
    np.savez(tmp_path / "d.npz", image=image, label=label)
    return tmp_path / "d.npz"


BAD = {
    "an empty class folder": (lambda p: (_tree(p), (p / "c").mkdir())[0], "folder", "holds no images"),
    "a corrupt image": (
        lambda p: (_tree(p), (p / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"))[0],
        "folder",
        "1.png is not a readable image",
    ),
    "mixed sizes": (lambda p: _tree(p, ((4, 4), (5, 4))), "folder", "images of different sizes .* set data.image_size"),
    "train/ without test/": (
        lambda p: (_tree(p / "train"), p)[1],
        "folder",
        "holds train/ but not both train/ and test/",
    ),
    "a file as the folder": (lambda p: _npz(p, np.zeros((2, 4, 4), np.uint8), [0, 1]), "folder", "is a file"),
    "counts that differ": (lambda p: _npz(p, np.zeros((3, 4, 4), np.uint8), [0, 1]), "arrays", "3 images but 2 labels"),
    "floats outside [0, 1]": (
        lambda p: _npz(p, np.full((2, 4, 4), 3.0, np.float32), [0, 1]),
        "arrays",
        r"must lie in \[0, 1\], these span \[3, 3\]",
    ),
    "int16 images": (lambda p: _npz(p, np.zeros((2, 4, 4), np.int16), [0, 1]), "arrays", "of type int16"),
    "float labels": (lambda p: _npz(p, np.zeros((2, 4, 4), np.uint8), [0.0, 1.0]), "arrays", "labels of type float64"),
    "no labels": (
        lambda p: (np.savez(p / "d.npz", image=np.zeros((2, 4, 4), np.uint8)), p / "d.npz")[1],
        "arrays",
        "has no labels .* it holds image",
    ),
    "a label outside the classes": (
        lambda p: _npz(p, np.zeros((4, 4, 4), np.uint8), [0, 1, 2, 5]),
        "arrays",
        "label 5 is outside the 3 classes",
    ),
    "not an npz": (lambda p: ((p / "d.npz").write_text("hello"), p / "d.npz")[1], "arrays", "not a readable numpy"),
    "a folder without train": (lambda p: p, "arrays", "holds neither train.npz nor train_images.npy"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_own_data_is_one_line_naming_the_file(tmp_path, case):
    make, name, message = BAD[case]
    (tmp_path / "data").mkdir()
    root = make(tmp_path / "data")
    names = ["a", "b", "c"] if case == "a label outside the classes" else None
    with pytest.raises(DataError, match=message) as caught:
        load_dataset(DataConfig(name=name, root=str(root), val_fraction=0.0, test_fraction=0.5, class_names=names))
    assert "\n" not in str(caught.value)
    assert not (root if root.is_dir() else root.parent).joinpath(".robustdistill-cache").exists()  # nothing written


@pytest.mark.slow
def test_a_student_trained_from_the_digits_npz_is_bit_identical_to_the_builtin_one(tmp_path):
    from robustdistill.training.loop import train

    images, labels = _raw_digits()
    np.savez(tmp_path / "digits.npz", image=(images / 16.0).astype(np.float32)[:, None], label=labels)
    runs = {}
    for name, data in (("builtin", {}), ("npz", {"data__name": "arrays", "data__root": str(tmp_path / "digits.npz")})):
        cfg = digits_config(tmp_path, "pgd_at", name=name, train__epochs=2, attack__steps=2, **data)
        cfg.eval.checks, cfg.eval.attacks = False, ["clean"]
        runs[name] = train(cfg, progress=False)
    from safetensors.torch import load_file

    builtin, npz = (load_file(str(runs[n] / "checkpoints" / "last.safetensors")) for n in ("builtin", "npz"))
    assert builtin.keys() == npz.keys() and all(torch.equal(builtin[k], npz[k]) for k in builtin)  # bit for bit


def test_the_cli_answers_a_missing_or_bad_data_root_in_one_line_and_writes_nothing(tmp_path, capsys):
    from robustdistill.cli import main

    out = f"out_dir={tmp_path / 'runs'}"
    assert main(["train", "pgd_at", out, "data.name=folder", f"data.root={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"data.root {tmp_path / 'nope'} does not exist" in err
    assert main(["train", "pgd_at", out, "data.name=arrays", "data.layout=HWC"]) == 2
    assert "data.layout" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------- extra data in every batch


def _split(values, labels):
    from robustdistill.data import Split

    x = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)
    return Split(x, torch.tensor(labels))


def _batches(loader):
    return [(x.flatten().tolist(), y.tolist()) for x, y in loader]


def test_every_batch_is_original_images_then_extra_ones_by_hand():
    from robustdistill.data import BatchLoader

    original = _split([i / 16 for i in range(8)], [0] * 8)
    extra = _split([0.5 + i / 64 for i in range(20)], [1] * 20)
    loader = BatchLoader(original, 4, shuffle=True, seed=2, extra=extra, fraction=0.5)
    batches = _batches(loader)
    assert len(loader) == len(batches) == 4  # an epoch: one pass over the 8 original images, 2 a batch
    assert all(y == [0, 0, 1, 1] for _, y in batches)  # the originals first, each batch half extra
    seen = [v for x, _ in batches for v in x[:2]]
    assert sorted(seen) == [i / 16 for i in range(8)]  # every original image once
    added = [v for x, _ in batches for v in x[2:]]
    assert len(set(added)) == 8 and all(v >= 0.5 for v in added)  # eight different extra images
    assert _batches(loader) == batches  # a function of (seed, epoch)
    loader.set_epoch(1)
    assert _batches(loader) != batches


def test_a_small_extra_set_is_drawn_as_back_to_back_permutations():
    from robustdistill.data import BatchLoader

    original = _split([i / 16 for i in range(10)], [0] * 10)
    extra = _split([0.5, 0.625, 0.75], [1, 1, 1])
    loader = BatchLoader(original, 3, shuffle=True, extra=extra, fraction=0.34)  # 1 extra, 2 original
    added = [x[2] for x, _ in _batches(loader)]
    assert len(added) == 5
    assert sorted(added[:3]) == [0.5, 0.625, 0.75]  # the first three: one permutation of the extra set


def test_two_ranks_draw_the_single_process_global_batches():
    from robustdistill.data import BatchLoader

    original = _split([i / 64 for i in range(16)], list(range(16)))
    extra = _split([0.5 + i / 128 for i in range(30)], [i % 16 for i in range(30)])
    one = _batches(BatchLoader(original, 8, shuffle=True, seed=5, extra=extra, fraction=0.25))
    ranks = [
        _batches(BatchLoader(original, 8, shuffle=True, seed=5, rank=r, world_size=2, extra=extra, fraction=0.25))
        for r in (0, 1)
    ]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 2
    for step, (x, _) in enumerate(one):
        together = ranks[0][step][0] + ranks[1][step][0]
        assert sorted(together) == sorted(x)


def _noisy_digits(tmp_path):
    images, labels = _raw_digits()
    noisy = np.clip(images / 16.0 + np.random.default_rng(0).normal(0, 0.05, images.shape), 0, 1)
    np.savez(tmp_path / "noisy.npz", image=noisy.astype(np.float32)[:, None], label=labels)
    return tmp_path / "noisy.npz"


def test_data_extra_is_read_checked_and_named_in_the_dataset(tmp_path):
    from robustdistill.data.base import ExtraData

    npz = _noisy_digits(tmp_path)
    plain = load_dataset(DataConfig(name="digits", **DIGITS))
    cfg = DataConfig(name="digits", extra=ExtraData(DataConfig(name="arrays", root=str(npz)), 0.5), **DIGITS)
    mixed = load_dataset(cfg)
    _same(mixed, plain)  # the original splits untouched
    assert len(mixed.extra) == 1797 and mixed.extra_fraction == 0.5
    epoch = {"epoch": "one pass over the original training images"}
    assert mixed.extra_info == {
        "source": "arrays",
        "root": str(npz),
        "fraction": 0.5,
        **epoch,
        "images": 1797,
        "labels": True,
    }
    unread = load_dataset(cfg, extra=False)  # an evaluation: not read, still named
    assert unread.extra is None and unread.extra_info == {
        "source": "arrays",
        "root": str(npz),
        "fraction": 0.5,
        **epoch,
    }
    np.savez(tmp_path / "big.npz", image=np.zeros((4, 1, 9, 9), np.float32), label=[0, 1, 2, 3])
    cfg.extra.source.root = str(tmp_path / "big.npz")
    with pytest.raises(DataError, match=r"holds images of shape \(1, 9, 9\), the training data \(1, 8, 8\)"):
        load_dataset(cfg)
    cfg.extra.source.image_size = 8  # the source's own resize
    assert load_dataset(cfg).extra.x.shape == (4, 1, 8, 8)
    tree = tmp_path / "tree"
    for c in ("cat", "dog"):
        (tree / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tree / c / "0.png")
    cfg.extra.source = DataConfig(name="folder", root=str(tree))
    with pytest.raises(DataError, match=r"data.extra's classes \(cat, dog\) are not the training data's"):
        load_dataset(cfg)


def test_extra_data_through_the_cli_is_checked_in_one_line(tmp_path, capsys):
    from robustdistill.cli import main

    npz = _noisy_digits(tmp_path)
    out = f"out_dir={tmp_path / 'runs'}"
    extra = ["data.extra.source.name=arrays", f"data.extra.source.root={npz}"]
    assert main(["train", "pgd_at", out, *extra, "data.extra.fraction=1.0"]) == 2
    assert "data.extra.fraction must be in [0, 1)" in capsys.readouterr().err
    assert main(["train", "pgd_at", out, *extra, "data.extra.fraction=0.001", "--estimate"]) == 2
    err = capsys.readouterr().err
    assert "is 0 extra images a batch" in err and "must leave both kinds in every batch" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_digits_run_with_noisy_copies_mixed_into_every_batch(tmp_path):
    import json

    from robustdistill.training.loop import train

    npz = _noisy_digits(tmp_path)
    extra = {"data__extra__source__name": "arrays", "data__extra__source__root": str(npz), "data__extra__fraction": 0.5}
    cfg = digits_config(tmp_path, "pgd_at", name="mixed", train__epochs=2, attack__steps=2, **extra)
    cfg.eval.checks = False
    run = train(cfg, progress=False)
    data = json.loads((run / "report.json").read_text())["data"]
    assert data["extra"]["images"] == 1797 and data["extra"]["labels"] and data["extra"]["fraction"] == 0.5
    assert data["extra"]["epoch"] == "one pass over the original training images"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("type") == "epoch"]
    # an epoch is one pass over the original images, half a batch each step
    assert "trained with 1797 extra images (arrays, " in (run / "report.md").read_text()
    assert epochs[0]["step"] == len(load_dataset(cfg.data, extra=False).train) // (cfg.train.batch_size // 2)


def _unlabeled_digits(tmp_path):
    images, _ = _raw_digits()
    np.savez(tmp_path / "unlabeled.npz", image=(images * 15).astype(np.uint8))  # no labels: generated, say
    return tmp_path / "unlabeled.npz"


def test_unlabeled_extra_images_are_read_and_a_label_using_method_is_refused_in_one_line(tmp_path, capsys):
    from robustdistill.cli import main
    from robustdistill.data.base import ExtraData

    npz = _unlabeled_digits(tmp_path)
    cfg = DataConfig(name="digits", extra=ExtraData(DataConfig(name="arrays", root=str(npz)), 0.5), **DIGITS)
    dataset = load_dataset(cfg)
    assert dataset.extra_info["labels"] is False and bool((dataset.extra.y == -1).all())
    with pytest.raises(DataError, match="unlabeled.npz has no labels .*; only data.extra may be unlabeled"):
        load_dataset(DataConfig(name="arrays", root=str(npz)))
    out = f"out_dir={tmp_path / 'runs'}"
    extra = ["data.extra.source.name=arrays", f"data.extra.source.root={npz}", "data.extra.fraction=0.5"]
    assert main(["train", "pgd_at", out, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"method pgd_at uses the training labels, and data.extra ({npz}) has none" in err
    assert "a method that learns from its teachers alone (adaad, igdm, rslad)" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_rslad_trains_on_unlabeled_extra_images(tmp_path, trained_runs):
    import json

    from robustdistill.training.loop import train

    npz = _unlabeled_digits(tmp_path)
    extra = {"data__extra__source__name": "arrays", "data__extra__source__root": str(npz), "data__extra__fraction": 0.5}
    teacher = {"teachers__robust__path": str(trained_runs["trades"])}
    cfg = digits_config(tmp_path, "rslad", name="unlabeled", train__epochs=2, attack__steps=2, **extra, **teacher)
    cfg.eval.checks = False
    run = train(cfg, progress=False)
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["extra"]["labels"] is False and report["attacks"]["clean"]["accuracy"] > 0.3
    assert "trained with 1797 unlabeled extra images (arrays, " in (run / "report.md").read_text()


def test_a_validation_split_of_its_own_needs_no_val_fraction(tmp_path):
    from robustdistill.core.errors import ConfigError
    from robustdistill.training.preflight import preflight

    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("L", (4, 4), 9).save(tmp_path / split / c / "0.png")
    cfg = digits_config(tmp_path, "pgd_at", data__name="folder", data__root=str(tmp_path), data__val_fraction=0.0)
    assert preflight(cfg, force=False, resume=False, check_folder=False) == {}  # val/ is the validation split
    cfg.data.root = str(tmp_path / "train")  # one tree: the validation split must be held out
    with pytest.raises(ConfigError, match="needs data.val_fraction > 0"):
        preflight(cfg, force=False, resume=False, check_folder=False)


@pytest.mark.slow
def test_the_how_to_example_runs_as_written(tmp_path):
    """docs/how-to/own-data.md's bash blocks, in an empty folder, through the installed command."""
    import json
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "how-to" / "own-data.md"
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
    assert blocks, "the how-to lost its example"
    bin_dir = Path(shutil.which("robustdistill") or Path(sys.executable).parent / "robustdistill").parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    script = "set -euo pipefail\n" + "\n".join(blocks)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    plain, extra = (
        json.loads((tmp_path / "runs" / n / "report.json").read_text()) for n in ("digits_npz", "digits_extra")
    )
    assert plain["data"]["num_samples"] == extra["data"]["num_samples"] == 120  # the same test images
    assert "extra" not in plain["data"] and extra["data"]["extra"]["images"] == 1797
    assert "streamed from the host" in done.stderr
    text = (tmp_path / "runs" / "digits_extra" / "report.md").read_text()
    assert "trained with 1797 extra images (arrays, noisy.npz), 50 % of every batch" in text
    for report in (plain, extra):
        attacks = report["attacks"]
        assert attacks["clean"]["accuracy"] > 0.5 and attacks["autoattack"]["accuracy"] <= attacks["pgd20"]["accuracy"]
