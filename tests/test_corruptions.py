"""Corruption robustness: accuracy on CIFAR-10-C style files, per corruption and severity."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from robustdistill.core.errors import DataError
from robustdistill.evaluation.corruptions import (
    check_corruptions,
    corruption_accuracy,
    corruption_table,
    pack_counts,
    per_image_scores,
)


def _brightness_model():
    """Class 1 when the image's mean is above one half, else class 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        model[1].weight[1].fill_(1.0)
        model[1].bias[1] = -32.0
    return model.eval()


LABELS = np.array([0, 1, 0, 1] * 5)


def _images(pattern):
    """5 severities x 4 images, 8 x 8 x 1: per severity 'c' (correct: dark for 0, bright for 1),
    'b' (all bright), 'd' (all dark), 'i' (inverted)."""
    out = []
    for kind in pattern:
        for label in LABELS[:4]:
            bright = {"c": label == 1, "b": True, "d": False, "i": label == 0}[kind]
            out.append(np.full((8, 8, 1), 255 if bright else 0, dtype=np.uint8))
    return np.stack(out)


def _folder(tmp_path):
    np.save(tmp_path / "labels.npy", LABELS)
    np.save(tmp_path / "bright.npy", _images("cbdic"))
    np.save(tmp_path / "dark.npy", _images("ddddd"))
    return tmp_path


def test_accuracy_per_corruption_and_severity_by_hand(tmp_path):
    summary = corruption_accuracy(_brightness_model(), _folder(tmp_path), num_classes=2, shape=(1, 8, 8))
    assert summary["images"] == 4
    assert summary["accuracy"] == {"bright": [1.0, 0.5, 0.5, 0.0, 1.0], "dark": [0.5] * 5}
    assert summary["mean"] == pytest.approx(0.55)
    # class 0: right in 3 of 5 bright severities and all 5 dark ones (2 images each): 16 / 20
    assert summary["class_accuracy"] == pytest.approx([0.8, 0.3])
    table = "\n".join(corruption_table(summary))
    assert (
        "Mean corruption accuracy: 55.00 %" in table
        and "| bright | 100.00 | 50.00 | 50.00 | 0.00 | 100.00 | 60.00 |" in table
    )
    assert "Per class, over every corruption and severity: 0 80.00 %, 1 30.00 % (worst 30.00 %)." in table
    assert "dark 80.00 %, bright 30.00 %" in "\n".join(corruption_table(summary, ["dark", "bright"]))

    # each image's count of its 10 corrupted versions classified right: what comparisons bootstrap
    scores, labels = per_image_scores(summary)
    assert labels.tolist() == [0, 1, 0, 1] and scores.tolist() == [0.8, 0.3, 0.8, 0.3]
    check_corruptions(summary)  # the numbers are the record's


def test_a_report_whose_corruption_numbers_are_not_its_images_is_refused(tmp_path):
    from robustdistill.core.errors import UserError
    from robustdistill.evaluation.report import read_report

    summary = corruption_accuracy(_brightness_model(), _folder(tmp_path), num_classes=2, shape=(1, 8, 8))
    path = tmp_path / "report.json"
    for change, message in [
        (lambda c: c.update(mean=0.6), "its mean corruption accuracy 60.00 % is not its images' 55.00 %"),
        (lambda c: c["class_accuracy"].__setitem__(1, 0.4), "class-wise corruption accuracies are not its images'"),
        (lambda c: c["per_image"].update(hits="0000"), "1 values where 4 were expected"),
    ]:
        edited = json.loads(json.dumps(summary))
        change(edited)
        path.write_text(json.dumps({"attacks": {}, "corruptions": edited}))
        with pytest.raises(UserError, match="was edited or damaged: .*" + message.replace("%", ".")):
            read_report(path)
    path.write_text(json.dumps({"attacks": {}, "corruptions": summary}))
    assert read_report(path)["corruptions"]["mean"] == summary["mean"]


def test_a_comparison_gets_corruption_columns_only_when_every_run_has_the_same_images():
    from robustdistill.studies.assemble import _corruptions
    from robustdistill.studies.render import _corruption_lines

    def report(hits, labels=(0, 1, 0, 1)):
        record = {"hits": pack_counts(np.array(hits)), "labels": pack_counts(np.array(labels)), "variants": 10}
        return {"corruptions": {"folder": "/c", "images": len(hits), "per_image": record}}

    found, info = _corruptions({"a": report([8, 3, 8, 3]), "b": report([10, 0, 5, 5])})
    labels, scores = found
    assert labels.tolist() == [0, 1, 0, 1] and scores["b"].tolist() == [1.0, 0.0, 0.5, 0.5]
    assert info["images"] == 4 and info["variants"] == 10 and info["folders"] == ["/c"]
    assert "4 images x 10 corrupted versions (/c)" in "\n".join(_corruption_lines(info))
    assert _corruptions({"a": {}, "b": {}}) == (None, None)
    found, info = _corruptions({"a": report([8, 3, 8, 3]), "b": {}})
    assert found is None and "b have no per-image corruption record" in info["note"]
    found, info = _corruptions({"a": report([8, 3, 8, 3]), "b": report([8, 3, 8, 3], labels=(1, 1, 0, 0))})
    assert found is None and "different corrupted images" in info["note"]
    assert _corruption_lines(info) == [
        "",
        "Corruption accuracy not compared: the runs were evaluated on different corrupted images.",
    ]


BAD = {
    "no labels": (lambda p: np.save(p / "fog.npy", _images("ccccc")), "missing .*labels.npy"),
    "no corruption": (lambda p: np.save(p / "labels.npy", LABELS), "holds no <corruption>.npy"),
    "wrong size": (
        lambda p: (np.save(p / "labels.npy", LABELS), np.save(p / "fog.npy", np.zeros((20, 9, 9, 1), np.uint8))),
        r"fog.npy: images of shape \(20, 9, 9, 1\) \(uint8\); expected \(20, 8, 8, 1\) uint8",
    ),
    "floats": (
        lambda p: (np.save(p / "labels.npy", LABELS), np.save(p / "fog.npy", _images("ccccc").astype(np.float32))),
        r"\(float32\); expected",
    ),
    "labels not 5 x N": (
        lambda p: (np.save(p / "labels.npy", LABELS[:7]), np.save(p / "fog.npy", _images("ccccc"))),
        "expected 5 x N integer labels, got 7",
    ),
    "labels of another dataset": (
        lambda p: (np.save(p / "labels.npy", LABELS * 5), np.save(p / "fog.npy", _images("ccccc"))),
        "labels outside 0..1",
    ),
    "not npy": (
        lambda p: (np.save(p / "labels.npy", LABELS), (p / "fog.npy").write_text("hello")),
        "fog.npy is not a readable .npy file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_folder_not_in_the_layout_is_one_line(tmp_path, case):
    make, message = BAD[case]
    make(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        corruption_accuracy(_brightness_model(), tmp_path, num_classes=2, shape=(1, 8, 8))
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_eval_corruptions_through_the_cli_writes_them_into_the_report(trained_runs, tmp_path, capsys):
    from robustdistill.cli import main
    from robustdistill.data import load_dataset
    from robustdistill.training.config import load_config

    run = trained_runs["natural"]
    test = load_dataset(load_config(run / "config.yaml").data).test
    x = (test.x[:20].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    folder = tmp_path / "digits-c"
    folder.mkdir()
    np.save(folder / "labels.npy", np.tile(test.y[:20].numpy(), 5))
    np.save(folder / "identity.npy", np.concatenate([x] * 5))  # "corrupted" by 8-bit rounding only
    np.save(folder / "inverted.npy", np.concatenate([255 - x] * 5))
    missing = ["eval", str(run), "--attacks", "clean", "--no-checks", "--corruptions", str(tmp_path / "nope")]
    assert main([*missing, "--out", str(tmp_path / "e0")]) == 2
    assert "is not a folder" in capsys.readouterr().err and not (tmp_path / "e0").exists()
    args = ["eval", str(run), "--attacks", "clean", "--no-checks", "--subset", "20", "--corruptions", str(folder)]
    assert main([*args, "--out", str(tmp_path / "e1")]) == 0
    report = json.loads((tmp_path / "e1" / "report.json").read_text())
    found = report["corruptions"]
    assert found["images"] == 20 and set(found["accuracy"]) == {"identity", "inverted"}
    assert found["accuracy"]["identity"] == [pytest.approx(report["attacks"]["clean"]["accuracy"], abs=0.1)] * 5
    assert found["accuracy"]["inverted"][0] < found["accuracy"]["identity"][0]
    assert "## Corruptions" in (tmp_path / "e1" / "report.md").read_text()


def test_a_run_asking_for_a_missing_corruption_folder_is_refused_before_it_trains(tmp_path, capsys):
    from robustdistill.cli import main

    argv = ["train", "pgd_at", f"out_dir={tmp_path / 'runs'}", f"eval.corruptions={tmp_path / 'nope'}"]
    assert main(argv) == 2
    assert f"eval.corruptions {tmp_path / 'nope'} is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
