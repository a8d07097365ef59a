"""A user's own model (`model.name: package.module:function`), and `eval` taking train's grammar
(`model.*`, `data.*`, `teachers.*` beside `eval.*`)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from robustdistill.cli import main
from robustdistill.core.errors import ConfigError
from robustdistill.models import ModelConfig, ModelSpec, create_model
from robustdistill.models.small_cnn import small_cnn

FACTORIES = """
    from torch import nn

    def tiny(num_classes, in_channels, width=8):
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(width, num_classes),
        )

    def loose(**options):
        return tiny(**options)

    def no_channels(num_classes, width=8):
        return nn.Linear(width, num_classes)

    def not_a_module(num_classes, in_channels):
        return 42

    def nothing(num_classes, in_channels, **options):
        return None

    def broken(num_classes, in_channels, width=8):
        raise ValueError("width must be even")

    NUMBER = 3
"""


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    """A module of factories in the current folder (found there, as a user's file beside the config)."""
    name = f"user_models_{tmp_path.name}"  # a module name of its own per test: imports are cached
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return name


def test_a_users_factory_builds_the_model_and_takes_its_options(factories):
    ModelConfig(name=f"{factories}:tiny", kwargs={"width": 4}).validate()
    model = create_model(ModelSpec(f"{factories}:tiny", 10, 1, {"width": 4}))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10) and model.net[0].out_channels == 4
    assert create_model(ModelSpec(f"{factories}:loose", 3, 3, {"width": 2}))(torch.zeros(1, 3, 5, 5)).shape == (1, 3)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        (
            "no_such_module_here:f",
            {},
            r"cannot import it \(ModuleNotFoundError: No module named 'no_such_module_here'\)",
        ),
        ("{m}:missing", {}, "cannot import it .AttributeError"),
        ("{m}:", {}, "a user's model is written package.module:function"),
        ("{m}:NUMBER", {}, "is a int, not a function that builds a model"),
        ("{m}:no_channels", {}, "must take num_classes and in_channels .* it does not take in_channels"),
        ("{m}:not_a_module", {}, "returned a int, not a torch.nn.Module"),
        ("{m}:tiny", {"depth": 3}, r"model.kwargs.depth is not an option of model '.*:tiny'; allowed: width"),
        ("{m}:broken", {}, "do not build model .*: width must be even"),
    ],
)
def test_a_bad_users_model_is_one_line(factories, name, kwargs, message):
    with pytest.raises(ConfigError, match=message) as caught:
        ModelConfig(name=name.format(m=factories), kwargs=kwargs).validate()
    assert "\n" not in str(caught.value)


def test_the_cli_refuses_a_bad_users_model_before_writing_anything(factories, tmp_path, capsys):
    assert main(["train", "natural", "out_dir=runs", f"model.name={factories}:nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "returned a NoneType, not a torch.nn.Module" in err
    assert not (tmp_path / "runs").exists()


def test_eval_takes_a_foreign_state_dicts_architecture_options(tmp_path, capsys):
    torch.save(small_cnn(num_classes=10, in_channels=1, width=16).state_dict(), tmp_path / "foreign.pt")
    base = ["eval", str(tmp_path / "foreign.pt"), "--data", "digits", "--model", "small_cnn", "--eps", "0.2"]
    base += ["--attacks", "clean", "--no-checks", "--subset", "20"]
    assert main([*base, "model.kwargs.width=16", "--out", str(tmp_path / "e1")]) == 0
    assert (tmp_path / "e1" / "report.json").is_file()
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "e2")]) == 2  # width 32 by default: the weights do not fit
    assert "does not fit the model" in capsys.readouterr().err and not (tmp_path / "e2").exists()
    assert main([*base, "train.epochs=2", "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err
    assert "eval takes eval.*, model.*, data.* and teachers.* overrides, as train does" in err
    no_name = ["eval", str(tmp_path / "foreign.pt"), "--data", "digits", "--eps", "0.2", "model.kwargs.width=16"]
    assert main([*no_name, "--out", str(tmp_path / "e4")]) == 2
    assert "model.* overrides need the architecture's name" in capsys.readouterr().err
    assert not any((tmp_path / f"e{k}").exists() for k in (2, 3, 4))


def test_eval_takes_data_overrides_as_train_does(tmp_path, capsys):
    torch.save(small_cnn(num_classes=10, in_channels=1, width=16).state_dict(), tmp_path / "foreign.pt")
    args = ["eval", str(tmp_path / "foreign.pt"), "data.name=digits", "data.test_fraction=0.5", "model.name=small_cnn"]
    args += ["model.kwargs.width=16", "--eps", "0.2", "--attacks", "clean", "--no-checks", "--out", str(tmp_path / "e")]
    assert main(args) == 0
    import json

    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["data"]["name"] == "digits" and report["data"]["num_samples"] > 800  # half of 1797 images


@pytest.mark.slow
def test_the_how_to_page_runs_as_written(tmp_path):
    """docs/how-to/own-model.md: its python block saved as my_models.py, its bash blocks run in that
    folder through the installed command; the eval reads the factory back from the checkpoint."""
    import json
    import os
    import re
    import shutil
    import subprocess
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "how-to" / "own-model.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, re.S)
    (tmp_path / "my_models.py").write_text(code)
    script = "set -euo pipefail\n" + "\n".join(re.findall(r"```bash\n(.*?)```", page, re.S))
    bin_dir = Path(shutil.which("robustdistill") or Path(sys.executable).parent / "robustdistill").parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "mine" / "report.json").read_text())
    assert report["model"]["name"] == "my_models:tiny_cnn" and report["model"]["kwargs"] == {"width": 24}
    assert report["attacks"]["clean"]["accuracy"] > 0.25 and report["attacks"]["pgd20"]["accuracy"] > 0.05  # it learned
    (again,) = list((tmp_path / "runs" / "mine").glob("eval-*/report.json"))
    again = json.loads(again.read_text())["attacks"]
    assert again["clean"]["verdicts"] == report["attacks"]["clean"]["verdicts"] and "pgd20" in again


def test_eval_takes_a_teacher_as_train_does_for_the_transfer_attacks_surrogate(tmp_path, capsys):
    import json

    torch.save(small_cnn(num_classes=10, in_channels=1, width=16).state_dict(), tmp_path / "foreign.pt")
    torch.manual_seed(1)
    torch.save(small_cnn(num_classes=10, in_channels=1, width=8).state_dict(), tmp_path / "other.pt")
    args = ["eval", str(tmp_path / "foreign.pt"), "--data", "digits", "--model", "small_cnn", "model.kwargs.width=16"]
    args += ["--eps", "0.2", "--attacks", "clean,transfer", "--no-checks", "--subset", "20"]
    teacher = [f"teachers.robust.path={tmp_path / 'other.pt'}", "teachers.robust.model.name=small_cnn"]
    assert main([*args, *teacher, "teachers.robust.model.kwargs.width=8", "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert "transfer" in report["attacks"] and report["settings"]["transfer"]
    capsys.readouterr()
    assert main([*args, *teacher, "--out", str(tmp_path / "e2")]) == 2  # width 32 by default: does not fit
    assert "other.pt does not fit the model" in capsys.readouterr().err and not (tmp_path / "e2").exists()
