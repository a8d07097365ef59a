"""robustdistill export: each format's file, read back in its own runtime, reproduces the student
(predictions equal, logits within the stated tolerance), and the manifest says what the run
measured; RobustBench's files carry its field names; every refusal is one line and writes nothing."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from conftest import digits_config, run_page
from robustdistill.cli import main
from robustdistill.core.errors import UserError
from robustdistill.export import export_run
from robustdistill.export.formats import ExportError, unsupported_operators, write_onnx
from robustdistill.models import Classifier, ModelSpec
from robustdistill.models.checkpoint import load_model, save_model
from robustdistill.storage.files import FolderLock
from robustdistill.training.loop import train


def test_the_operators_onnx_lacks_are_read_from_the_exporters_message():
    message = (
        "Failed to convert ... <class 'DispatchError'>: No ONNX function found for "
        "<OpOverload(op='mylib.wiggle', overload='default')>. Failure message: ...\n"
        "No ONNX function found for <OpOverload(op='aten.frobnicate', overload='Tensor')>. again "
        "No ONNX function found for <OpOverload(op='mylib.wiggle', overload='default')>."
    )
    assert unsupported_operators(message) == ["mylib.wiggle", "aten.frobnicate.Tensor"]
    assert unsupported_operators("some other failure") == []


@torch.library.custom_op("robustdistill_test::wiggle", mutates_args=())
def _wiggle(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@_wiggle.register_fake
def _(x):
    return torch.empty_like(x)


class _Wiggly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(_wiggle(x).flatten(1))


def test_an_onnx_export_of_an_operator_onnx_lacks_names_it_in_one_line(tmp_path):
    spec = ModelSpec("my_models:wiggly", 10, 1)
    with pytest.raises(ExportError, match=r"^ONNX cannot express the operator robustdistill_test.wiggle of model "):
        write_onnx(Classifier(_Wiggly()).eval(), torch.rand(2, 1, 8, 8), tmp_path, spec)


def _fake_run(tmp_path, report=True):
    """A run folder with a config and a best checkpoint (and, with `report`, a report.json file)."""
    cfg = digits_config(tmp_path, "natural")
    run = cfg.run_dir
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    save_model(run / "checkpoints" / "best.safetensors", nn.Linear(2, 2), ModelSpec("small_cnn", 10, 1))
    if report:
        (run / "report.json").write_text("{}")
    return run


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda p: p, ["--format", "onnx"], "is not a run folder of this tool (no config.yaml)"),
        (lambda p: _fake_run(p, report=False), ["--format", "onnx"], "is not finished: its best checkpoint has no"),
        (lambda p: _fake_run(p), ["--format", "keras"], "argument --format: invalid choice: 'keras'"),
        (lambda p: _fake_run(p), ["--format", "onnx", "--images", "0"], "--images must be >= 1"),
    ],
)
def test_bad_exports_are_one_line_and_write_nothing(tmp_path, capsys, setup, args, message):
    run = setup(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["export", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_an_onnx_export_without_its_packages_names_the_install_command(tmp_path, monkeypatch, capsys, missing):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if it were not installed
    run = _fake_run(tmp_path)
    assert main(["export", str(run), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --format onnx needs the {missing} package, which is not installed: " + (
        "pip install 'robustdistill[export]'"
    )
    assert not (run / "export-onnx").exists()


def test_a_report_older_than_the_best_checkpoint_is_an_unfinished_run(tmp_path):
    run = _fake_run(tmp_path)
    old = run / "report.json"
    os.utime(old, (1, 1))  # a resumed run has saved a newer best checkpoint since
    with pytest.raises(UserError, match="is not finished"):
        export_run(run, "torchscript")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A natural small CNN on digits, two epochs, evaluated under clean, PGD-20 and AutoAttack."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = digits_config(tmp, "natural", train__epochs=2, train__milestones="[1]")
    cfg.eval.attacks = ["clean", "pgd20", "autoattack"]
    return train(cfg, progress=False)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_each_format_reproduces_the_student_and_its_manifest_says_what_was_measured(finished, tmp_path, capsys, fmt):
    out = tmp_path / "shipped"
    assert main(["export", str(finished), "--format", fmt, "--out", str(out), "--images", "100"]) == 0
    printed = capsys.readouterr().out
    assert "parity passed on 100 test images" in printed and "autoattack" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((finished / "report.json").read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["predictions_equal"] == 100
    assert manifest["parity"]["max_abs_logit_diff"] <= 1e-4 and manifest["format"] == fmt
    for attack in ("clean", "pgd20", "autoattack"):
        assert manifest["accuracy"][attack]["value"] == report["attacks"][attack]["accuracy"]
        assert manifest["accuracy"][attack]["interval_95"] == report["attacks"][attack]["accuracy_interval"]
    assert manifest["threat_model"] == {"norm": "Linf", "eps": 0.2, "eps_text": "0.2"}
    assert manifest["dataset"] == "digits" and manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["image_size"] == [1, 8, 8] and manifest["input"]["range"] == [0.0, 1.0]
    assert manifest["config_sha256"] == _sha256(finished / "config.yaml")
    (model_file,) = manifest["files"].values()
    assert _sha256(out / model_file["path"]) == model_file["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", model_file["path"]])

    # the file, read without this tool's help, gives the student's predictions on the test images
    student, _ = load_model(finished / "checkpoints" / "best.safetensors")
    x = torch.rand(7, 1, 8, 8)
    want = student.eval()(x).detach()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        assert manifest["onnx_opset"] >= 17
    elif fmt == "torchscript":
        got = torch.jit.load(str(out / "model.pt"))(x)
    else:
        got = load_model(out / "model.safetensors")[0].eval()(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)

    assert main(["export", str(finished), "--format", fmt, "--out", str(out)]) == 2  # never replaced
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_a_parity_failure_a_failed_sanity_check_and_a_run_in_training_are_refused(finished, tmp_path, monkeypatch):
    from robustdistill import export

    real = export.torchscript_runner

    def drifting(folder):
        run, runtime = real(folder)
        return (lambda x: run(x) + 1e-3), runtime

    monkeypatch.setattr(export, "torchscript_runner", drifting)
    out = tmp_path / "drift"
    with pytest.raises(ExportError, match=r"does not reproduce the model: parity FAILED on 20 test images"):
        export_run(finished, "torchscript", out=out, images=20)
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))  # nothing left behind
    export_run(finished, "torchscript", out=out, images=20, atol=2e-3)  # a difference the user accepts
    monkeypatch.undo()

    report = json.loads((finished / "report.json").read_text())
    fake = [{"id": 4, "name": "unbounded", "status": "failed"}]
    monkeypatch.setattr(export, "failed", lambda checks: fake if checks == report.get("checks", []) else [])
    with pytest.raises(UserError, match="failed sanity check 4 unbounded: its numbers are not to be trusted"):
        export_run(finished, "safetensors", out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    _, manifest = export_run(finished, "safetensors", out=tmp_path / "bad", allow_failed_checks=True)
    assert manifest["sanity_checks_failed"] == ["4 unbounded"]
    monkeypatch.undo()

    with pytest.raises(UserError, match="RobustBench has leaderboards for cifar10, cifar100, imagenet, not digits"):
        export_run(finished, "robustbench", out=tmp_path / "rb")
    assert not (tmp_path / "rb").exists()

    with FolderLock(finished, "training"):
        with pytest.raises(UserError, match="is in use: .* is training it"):
            export_run(finished, "safetensors", out=tmp_path / "busy")
    assert not (tmp_path / "busy").exists()


@pytest.mark.slow
def test_an_onnx_export_of_a_run_whose_model_onnx_cannot_express_is_one_line(finished, monkeypatch, capsys):
    from robustdistill import export

    real = export.load_model

    def wiggly(path):
        _, meta = real(path)
        net = nn.Sequential(nn.Flatten(0, 0), _Wiggly())
        return Classifier(net), meta

    monkeypatch.setattr(export, "load_model", wiggly)
    assert main(["export", str(finished), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ONNX cannot express the operator robustdistill_test.wiggle of model 'small_cnn'")
    assert len(err.splitlines()) == 1 and not (finished / "export-onnx").exists()
    assert not list(finished.glob(".export-onnx*"))


def _fake_cifar10(root, n):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [j % 10 for j in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))


@pytest.mark.slow
def test_robustbench_files_carry_its_field_names_and_load_back(tmp_path, capsys, monkeypatch):
    _fake_cifar10(tmp_path / "data", n=20)
    cfg = digits_config(tmp_path, "pgd_at", train__epochs=1, train__milestones="[]")
    cfg.data.name, cfg.data.root, cfg.attack.eps, cfg.attack.step_size = (
        "cifar10",
        str(tmp_path / "data"),
        8 / 255,
        2 / 255,
    )
    cfg.eval.attacks, cfg.eval.eps, cfg.model.normalize = ["clean", "autoattack"], None, True
    run = train(cfg, progress=False)
    assert main(["export", str(run), "--format", "robustbench", "--name", "Me2026Tiny"]) == 0
    out = run / "export-robustbench"
    info = json.loads((out / "model_info" / "cifar10" / "Linf" / "Me2026Tiny.json").read_text())
    report = json.loads((run / "report.json").read_text())
    aa = f"{100 * report['attacks']['autoattack']['accuracy']:.2f}"
    assert info["name"] == "Me2026Tiny" and info["dataset"] == "cifar10" and info["eps"] == "8/255"
    assert info["autoattack_acc"] == info["reported"] == aa and info["additional_data"] is False
    assert info["clean_acc"] == f"{100 * report['attacks']['clean']['accuracy']:.2f}"
    assert info["number_forward_passes"] == 1 and info["architecture"] == "small_cnn"
    assert {"link", "authors", "venue", "footnote"} <= info.keys()
    state = torch.load(out / "models" / "cifar10" / "Linf" / "Me2026Tiny.pt", weights_only=True)
    assert "normalize.mean" in state  # the normalisation travels with the weights
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["images"] == 20
    assert manifest["input"]["normalisation"].startswith("inside the model (mean [0.49")

    assert main(["export", str(run), "--format", "robustbench", "--out", str(tmp_path / "x"), "--name", "a/b"]) == 2
    assert "--name 'a/b' must be a file name" in capsys.readouterr().err

    from robustdistill import export
    from robustdistill.data.split import Split

    real = export.load_dataset

    def doubled(cfg, **kwargs):  # the report then covers half of the test split, as with eval.subset
        dataset = real(cfg, **kwargs)
        dataset.test = Split(torch.cat([dataset.test.x] * 2), torch.cat([dataset.test.y] * 2))
        return dataset

    monkeypatch.setattr(export, "load_dataset", doubled)
    with pytest.raises(UserError, match="measured 20 of the 40 test images"):
        export_run(run, "robustbench", out=tmp_path / "half")
    assert not (tmp_path / "half").exists()


@pytest.mark.slow
def test_the_how_to_page_runs_as_written(tmp_path):
    """docs/how-to/ship-a-student.md: train, export three ways, run the ONNX file without this tool."""
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "how-to" / "ship-a-student.md"
    done = run_page(page, tmp_path)
    run = tmp_path / "runs" / "shipped"
    for folder in (run / "export-onnx", run / "export-torchscript", tmp_path / "shipped-student"):
        assert json.loads((folder / "manifest.json").read_text())["parity"]["passed"], folder
    predicted = done.stdout.split("predicted: ")[1].split(" true:")[0]
    assert predicted.count("'") == 16  # eight class names printed from the manifest
    assert "AutoAttack accuracy: {'value': " in done.stdout
