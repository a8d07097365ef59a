import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from robustdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_print_config_shows_the_resolved_config(capsys):
    assert main(["train", str(ROOT / "configs/digits/rslad.yaml"), "train.epochs=5", "seed=1", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 5" in out and "seed: 1" in out and "name: rslad" in out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "configs/digits/rslad.yaml", "method.name=nope"], "unknown method 'nope'"),
        (["train", "configs/digits/rslad.yaml", "data.name=mnist"], "unknown dataset 'mnist'"),
        (["train", "configs/digits/rslad.yaml", "model.name=vgg"], "unknown model 'vgg'"),
        (["train", "configs/digits/rslad.yaml", "teachers.robust.path=/no/such/run"], "/no/such/run"),
        (["train", "missing.yaml"], "config file not found"),
        (["eval", "/no/such/run"], "no run folder or checkpoint file"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(ROOT)
    args = [a if not a.startswith("configs/") else str(ROOT / a) for a in args]
    assert main(args + ([f"out_dir={tmp_path}/runs"] if args[0] == "train" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_list_describes_methods_and_attacks(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "bmtard   teachers: robust, clean" in out and "Goldblum et al., AAAI 2020" in out
    assert main(["-v", "list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert "transfer" in out and "black-box" in out and "white-box" in out


def test_malformed_yaml_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    assert main(["train", str(bad)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_then_eval_end_to_end(tmp_path):
    """The console script as a user runs it: teacher, student, evaluation, refusal to overwrite."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the console script installed beside this interpreter (found without activating its environment)
    script = shutil.which("robustdistill", path=str(Path(sys.executable).parent)) or "robustdistill"
    run = lambda *a, **extra: subprocess.run(  # noqa: E731
        [script, *a], cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True
    )
    cfg = ROOT / "configs" / "digits"
    r = run("train", str(cfg / "trades.yaml"), "train.epochs=2", "train.milestones=[]", "attack.steps=3")
    assert r.returncode == 0, r.stderr
    r = run("train", str(cfg / "rslad.yaml"), "train.epochs=2", "attack.steps=3")
    assert r.returncode == 0, r.stderr
    assert "pgd20" in r.stdout and (tmp_path / "runs/rslad/report.json").is_file()
    r = run("eval", "runs/rslad", "--attacks", "clean,fgsm,pgd20", "--subset", "100")
    assert r.returncode == 0, r.stderr
    report_path = Path(r.stdout.strip().splitlines()[-1].split("report: ")[1])
    report = json.loads((tmp_path / report_path).read_text())
    assert report["data"]["num_samples"] == 100 and list(report["attacks"]) == ["clean", "fgsm", "pgd20"]
    assert "W-Robust Acc" in r.stdout
    r = run("eval", "runs/rslad/checkpoints/best.safetensors", "--subset", "50", OMP_NUM_THREADS="1")  # the file alone
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / r.stdout.strip().splitlines()[-1].split("report: ")[1]).read_text())
    assert report["threads"] == 1  # the thread count the verdicts were computed with (their rounding depends on it)
    # dotted overrides, as for train (the flags are their aliases); tables name PGD by its steps
    r = run("eval", "runs/rslad", "eval.subset=30", "--no-checks", "eval.attacks=[clean,pgd5]")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / r.stdout.strip().splitlines()[-1].split("report: ")[1]).read_text())
    assert report["data"]["num_samples"] == 30 and report["settings"]["pgd5"]["steps"] == 5
    assert "| pgd5 " in r.stdout and "checks" not in report
    assert report["w_robust"]["definition"] == "(clean + pgd5) / 2"  # under the strongest attack that ran
    r = run("train", str(cfg / "rslad.yaml"), "train.epochs=2")
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("list", "methods")
    assert "rslad" in r.stdout and "trades" in r.stdout
    r = subprocess.run([sys.executable, "-m", "robustdistill", "list", "models"], capture_output=True, text=True)
    assert "wrn34_10" in r.stdout


def test_the_front_door_version_recipes_grids_and_every_grid_key(capsys):
    """What a newcomer types first: --version, the shipped recipes and grids, the grid file's keys."""
    import dataclasses

    import robustdistill
    from robustdistill.recipes import grid_names, recipe_names
    from robustdistill.studies.grid import Grid

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"robustdistill {robustdistill.__version__}"
    assert main(["list", "recipes"]) == 0 and main(["list", "grids"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in recipe_names() + grid_names())
    assert "Robust teacher on digits: TRADES" in listed  # each with what it is
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    shown = capsys.readouterr().out
    for key in (f.name for f in dataclasses.fields(Grid)):
        assert f"\n  {key} " in shown, key  # every key of a grid file, with its meaning


def test_import_robustdistill_offers_the_public_api():
    import robustdistill as rd

    for name in ("train", "evaluate", "compare", "demo", "estimate", "load_config", "eval_config"):
        assert callable(getattr(rd, name)), name
    assert set(rd.__all__) >= {"train", "evaluate", "compare", "demo", "load_config", "Config", "__version__"}
    cfg = rd.load_config("rslad", ["train.epochs=3"])  # a shipped recipe, by its name
    assert cfg.name == "rslad" and cfg.train.epochs == 3 and cfg.teachers["robust"].path == "runs/trades"


def test_library_calls_show_progress_unless_asked_not_to(capsys, monkeypatch):
    import logging
    import os

    from robustdistill.core.progress import shown

    log = logging.getLogger("robustdistill")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # nobody configured logging
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with shown(True):
        log.info("epoch 1/30")
    with shown(False):
        log.info("not this")
        log.warning("but a warning")
        assert os.environ["TQDM_DISABLE"] == "1"
    err = capsys.readouterr().err
    assert "epoch 1/30" in err and "not this" not in err and "but a warning" in err
    assert log.handlers == [] and "TQDM_DISABLE" not in os.environ  # nothing left behind
