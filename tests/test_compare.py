"""`robustdistill compare`: the grid file's checks (one error line before anything runs), and a tiny
digits grid end to end: reused when finished, the same report after a kill -9, a changed cell
refused, a failing cell reported while the others go on."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import snapshot
from robustdistill.cli import main
from robustdistill.core.errors import UserError
from robustdistill.studies.grid import load_grid, plan

SHORT = '[train.epochs=1, "train.milestones=[]", attack.steps=2, train.batch_size=128]'
CELL = SHORT.replace("train.epochs=1", "train.epochs=2")  # two epochs: a kill can fall between them
GRID = f"""
seeds: [0, 1]
threads: 1
teachers:
  robust: {{recipe: trades, overrides: {SHORT}}}
cells:
  rslad: {{recipe: rslad, overrides: {CELL}}}
  pgd_at: {{recipe: pgd_at, overrides: {CELL}}}
eval: {{attacks: [clean, pgd20], checks: false, subset: 120}}
reference: pgd_at
draws: 200
"""


def _grid(folder: Path, text: str = GRID) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "grid.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ("cells:\n  x: {recipe: nothing}\n", "no digits recipe 'nothing'"),
        ("cells:\n  x: {recipe: rslad, config: a.yaml}\n", "cells.x: give either recipe"),
        ("cells:\n  x: {recipe: natural, overrides: [train.epohcs=1]}\n", "unknown key 'train.epohcs'"),
        ("cells:\n  x: {recipe: natural}\naxes: {train.lr: [0.1, -1]}\n", "train.lr must be > 0"),
        ("cells:\n  x: {recipe: natural}\nreference: y\n", "reference 'y' is not a cell"),
        ("cells:\n  x: {recipe: natural}\npairs: [[x, z]]\n", "pairs must be [cell, cell]"),
        ("cells:\n  x: {recipe: natural}\nseed: [1]\n", "unknown key 'grid.seed'"),
        ("cells: {}\n", "the grid has no cells"),
        ("cells:\n  x: {recipe: rslad, teachers: {robust: nobody}}\n", "'nobody' is not a teacher of the grid"),
        ("cells:\n  x: {recipe: natural}\npublished: {y: text}\n", "published.y is not a cell"),
    ],
)
def test_a_bad_grid_is_one_error_line_and_nothing_runs(tmp_path, capsys, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    _grid(tmp_path, change)
    assert main(["compare", "grid.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_the_plan_crosses_cells_axes_and_seeds_and_wires_the_teachers(tmp_path):
    path = _grid(tmp_path, GRID + "axes: {model.kwargs.width: [8, 16]}\n")
    teachers, cells = plan(load_grid(path), path, tmp_path / "out")
    assert [t.name for t in teachers] == ["robust"]
    assert len(cells) == 2 * 2 * 2 and cells[0].name == "rslad__model.kwargs.width=8__seed0"
    first = cells[0].cfg
    assert first.model.kwargs == {"width": 8} and first.seed == 0 and first.eval.subset == 120
    assert first.teachers["robust"].path == str(tmp_path / "out" / "teachers" / "robust")
    assert {c.group for c in cells} == {0, 1} and cells[-1].cfg.model.kwargs == {"width": 16}


def test_the_grids_overrides_reach_every_run_teachers_included_and_a_cells_own_win(tmp_path):
    text = GRID + "overrides: [data.imbalance=10, train.lr=0.2]\n"
    text = text.replace("rslad: {recipe: rslad, overrides: [", "rslad: {recipe: rslad, overrides: [train.lr=0.3, ")
    path = _grid(tmp_path, text)
    teachers, cells = plan(load_grid(path), path, tmp_path / "out")
    assert all(r.cfg.data.imbalance == 10 for r in teachers + cells)
    assert teachers[0].cfg.train.lr == 0.2
    assert {c.cell: c.cfg.train.lr for c in cells} == {"rslad": 0.3, "pgd_at": 0.2}


def test_the_shipped_digits_grid_plans_the_readme_experiment(tmp_path):
    """`robustdistill compare digits_methods` finds the shipped grid: 27 cells x 5 seeds from the
    digits recipes, the demo's two teachers, B-MTARD with the robust teacher in both roles."""
    from robustdistill.recipes import grid_file

    path = grid_file("digits_methods")
    grid = load_grid(path)
    teachers, cells = plan(grid, path, tmp_path)
    assert [t.name for t in teachers] == ["clean", "robust"] and len(cells) == 27 * 5
    by_name = {c.name: c.cfg for c in cells}
    robust = str(tmp_path / "teachers" / "robust")
    assert by_name["bmtard_rt__seed3"].teachers["clean"].path == robust
    assert by_name["bmtard__seed3"].teachers["clean"].path == str(tmp_path / "teachers" / "clean")
    assert by_name["baseline__seed0"].method.ebb is False and by_name["rslad_ce__seed4"].method.attack_loss == "ce"
    assert set(grid.published) <= set(grid.cells) and "RELAYED" in grid.published["bmtard"]
    with pytest.raises(UserError, match="no grid file nothing and no shipped grid"):
        grid_file("nothing")


def test_into_needs_its_markers_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _grid(tmp_path, GRID)
    (tmp_path / "notes.md").write_text("no markers here\n")
    assert main(["compare", "grid.yaml", "--into", "notes.md"]) == 2
    assert "needs one line <!-- compare:grid:begin -->" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml", "notes.md"]


def test_dry_run_says_a_finished_run_whose_grid_now_asks_for_more_epochs_is_resumed(tmp_path, capsys, monkeypatch):
    """A finished run is not "finished" for the grid when the grid changed what a resume may change:
    the dry run says what `compare` will do (resume it), and a change it would refuse, refused."""
    monkeypatch.chdir(tmp_path)
    _grid(tmp_path, "cells:\n  natural: {recipe: natural, overrides: [train.epochs=2]}\n")
    (cell,) = plan(load_grid(tmp_path / "grid.yaml"), tmp_path / "grid.yaml", tmp_path / "out")[1]
    cell.folder.mkdir(parents=True)
    (cell.folder / "config.yaml").write_text(cell.cfg.to_yaml().replace("epochs: 2", "epochs: 1"))
    (cell.folder / "report.json").write_text("{}")
    before = snapshot(tmp_path)
    assert main(["compare", "grid.yaml", "--out", "out", "--dry-run"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "natural__seed0" in line)
    assert "finished; resumed (train.epochs 1 -> 2)" in row
    assert snapshot(tmp_path) == before
    (cell.folder / "config.yaml").write_text(cell.cfg.to_yaml().replace("lr: 0.1", "lr: 0.3"))
    assert main(["compare", "grid.yaml", "--out", "out", "--dry-run"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "natural__seed0" in line)
    assert "finished; refused:" in row and "train.lr: 0.3 -> 0.1" in row
    assert set(snapshot(tmp_path)) == set(before)  # nothing written by either dry run


def test_a_finished_run_is_not_trained_again_when_only_its_trackers_changed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _grid(tmp_path, "cells:\n  natural: {recipe: natural}\noverrides: [logging.tensorboard=true]\n")
    (cell,) = plan(load_grid(tmp_path / "grid.yaml"), tmp_path / "grid.yaml", tmp_path / "out")[1]
    cell.folder.mkdir(parents=True)
    (cell.folder / "config.yaml").write_text(cell.cfg.to_yaml().replace("tensorboard: true", "tensorboard: false"))
    (cell.folder / "report.json").write_text("{}")
    assert main(["compare", "grid.yaml", "--out", "out", "--dry-run"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "natural__seed0" in line)
    assert "finished" in row and "resumed" not in row and "refused" not in row, row


def test_the_figures_draw_every_group_from_the_report(tmp_path):
    from robustdistill.studies.figures import plot_comparison

    def cell(clean, robust):
        return {
            "seeds": [0, 1],
            "metrics": {
                "clean": [clean, clean - 2, clean + 2],
                "pgd20": [robust, robust - 3, robust + 3],
                "worst pgd20": [robust - 20, robust - 30, robust - 10],
            },
            "classwise": [[robust, robust - 5, robust + 5]] * 2 + [[None, None, None]],  # class 2 absent
        }

    diff = {"a": "x", "b": "y", "metric": "pgd20", "estimate": 5.0, "interval": [1.0, 9.0], "significant": True}
    outside = cell(85, 45)
    outside["metrics"]["worst pgd20"] = [0.0, 0.6, 2.1]  # bias-corrected: the estimate below its interval
    group = {"cells": {"x": cell(90, 50), "y": outside}, "differences": [diff], "missing": {}}
    document = {
        "focus": "pgd20",
        "metrics": ["clean", "pgd20", "worst pgd20"],
        "data": {"classes": ["a", "b", "c"]},
        "groups": [{**group, "axes": {"model.kwargs.width": 8}}, {**group, "axes": {"model.kwargs.width": 16}}],
    }
    written = plot_comparison(document, tmp_path)
    names = ["tradeoff", "fairness", "classwise", "differences"]
    assert [p.name for p in written] == [f"{n}_{g}.png" for g in (1, 2) for n in names]
    assert all(p.stat().st_size > 10_000 for p in written)


def _compare(cwd: Path, *extra: str, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "robustdistill", "compare", "grid.yaml", "--out", "out", *extra]
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_a_grid_runs_in_parallel_resumes_after_kill_9_to_the_same_report_and_reuses_what_is_finished(tmp_path):
    straight = tmp_path / "straight"
    _grid(straight)
    done = _compare(straight, "--jobs", "2")  # the killed grid below runs one at a time: the same bits
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    report = json.loads((straight / "out" / "report.json").read_text())
    cells = report["groups"][0]["cells"]
    assert set(cells) == {"rslad", "pgd_at"} and cells["rslad"]["seeds"] == [0, 1]
    assert {(d["a"], d["b"]) for d in report["groups"][0]["differences"]} == {("rslad", "pgd_at")}
    assert "Paired differences" in (straight / "out" / "report.md").read_text()
    assert "every run on 1 intra-op thread (train.threads)" in (straight / "out" / "report.md").read_text()
    assert report["run_threads"] == [1]
    figures = ["tradeoff.png", "fairness.png", "classwise.png", "differences.png"]
    assert all((straight / "out" / f).stat().st_size > 10_000 for f in figures)
    assert len(cells["rslad"]["classwise"]) == 10 and report["focus"] == "pgd20"
    csv = (straight / "out" / "cells.csv").read_text().splitlines()
    assert csv[0] == "cell,seed,metric,value" and len(csv) == 1 + 2 * 2 * 5

    killed = tmp_path / "killed"
    _grid(killed)
    # killed as the teacher's checkpoint appears (its final report not written), then between a
    # cell's two epochs (resumed from its checkpoint), then as a cell's folder appears
    cell = killed / "out" / "runs" / "rslad__seed1"
    for moment in [
        killed / "out" / "teachers" / "robust" / "checkpoints" / "train_state.pt",
        cell / "checkpoints" / "train_state.pt",
        killed / "out" / "runs" / "pgd_at__seed0" / "config.yaml",
    ]:
        process = _compare(killed, start_new_session=True)
        waited = 0.0
        while not moment.exists() and process.poll() is None and waited < 300:
            time.sleep(0.02)
            waited += 0.02
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert moment.exists() and not (killed / "out" / "report.json").exists(), moment
    again = _compare(killed)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    for name in ("report.json", "cells.csv"):
        assert (killed / "out" / name).read_bytes() == (straight / "out" / name).read_bytes(), name

    # run again: everything is finished, nothing is trained or rewritten but the report
    runs = snapshot(straight / "out" / "runs")
    rerun = _compare(straight)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "0 to train" in err, err
    assert snapshot(straight / "out" / "runs") == runs


@pytest.mark.slow
def test_a_changed_cell_is_refused_a_failing_cell_does_not_stop_the_others_a_new_eval_re_evaluates(tmp_path):
    _grid(tmp_path)
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\nbefore\n<!-- compare:grid:begin -->\nold\n<!-- compare:grid:end -->\nafter\n")
    first = _compare(tmp_path, "--into", "notes.md")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    written = notes.read_text()
    assert written.startswith("# Notes\nbefore\n<!-- compare:grid:begin -->\n### Comparison: grid.yaml")
    assert "#### all cells" in written and "\nold\n" not in written and written.endswith("end -->\nafter\n")
    changed = GRID.replace(
        "pgd_at: {recipe: pgd_at, overrides: [", "pgd_at: {recipe: pgd_at, overrides: [train.lr=0.05, "
    )
    changed = changed.replace("seeds: [0, 1]", "seeds: [0, 1]\n")
    _grid(tmp_path, changed)
    again = _compare(tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["failed"]) == {"pgd_at__seed0", "pgd_at__seed1"}
    assert "train.lr: 0.1 -> 0.05" in report["failed"]["pgd_at__seed0"]
    assert set(report["groups"][0]["cells"]) == {"rslad"} and report["groups"][0]["differences"] == []
    assert "Failed cells" in (tmp_path / "out" / "report.md").read_text()
    # a change of the evaluation only: the finished cells are evaluated again (recorded), not refused
    _grid(tmp_path, GRID.replace("subset: 120", "subset: 100"))
    third = _compare(tmp_path)
    _, err = third.communicate(timeout=600)
    assert third.returncode == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["groups"][0]["num_samples"] == 100 and set(report["groups"][0]["cells"]) == {"rslad", "pgd_at"}
    history = (tmp_path / "out" / "runs" / "rslad__seed0" / "config_history.jsonl").read_text()
    assert '"eval.subset": [120, 100]' in history


@pytest.mark.slow
def test_dry_run_lists_the_runs_and_the_time_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _grid(tmp_path)
    assert main(["compare", "grid.yaml", "--out", "out", "--dry-run", "--jobs", "2"]) == 0
    shown = capsys.readouterr().out
    assert "| robust " in shown and "| rslad__seed1 " in shown and shown.count(" new ") == 5
    assert "unknown (teachers?)" in shown  # the cells need the teacher the grid has not trained yet
    assert "to train: at least" in shown and "with --jobs 2" in shown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_a_report_on_fewer_than_three_seeds_says_so_and_a_cell_beaten_beyond_its_interval_is_noted():
    from types import SimpleNamespace

    from robustdistill.studies.assemble import _weaker_focus
    from robustdistill.studies.render import comparison_markdown

    def cell(seeds, aa, pgd):
        return {"seeds": seeds, "metrics": {"clean": [90.0, 88.0, 92.0], "autoattack": aa, "pgd20": pgd}}

    cells = {
        "a": cell([0, 1], [40.0, 35.0, 45.0], [50.0, 45.0, 55.0]),
        "b": cell([0, 1], [30.0, 25.0, 35.0], [20.0, 15, 25]),
    }
    results = SimpleNamespace(focus="autoattack", attacks=["clean", "pgd20", "autoattack"])
    assert _weaker_focus(cells, results) == [
        "b: pgd20 (20.0 %) is below the interval of autoattack (from 25.0 %); quote pgd20 for this cell"
    ]
    group = {"axes": {}, "cells": cells, "differences": [], "missing": {}, "notes": _weaker_focus(cells, results)}
    document = {
        "command": "",
        "data": {"name": "digits", "num_samples": 359},
        "versions": {},
        "machine": {},
        "threads": 1,
        "intervals": "",
        "metrics": ["clean", "pgd20", "autoattack"],
        "groups": [group],
        "published": {},
        "failed": {},
    }
    text = comparison_markdown(document, Path("grid.yaml"), {0: {"a": 1.0, "b": 1.0}})
    assert "These intervals rest on 2 seeds: the variation between trainings is barely estimated" in text
    assert "Note: b: pgd20 (20.0 %) is below the interval of autoattack" in text
    group["cells"] = {"a": cell([0, 1, 2], [40.0, 35.0, 45.0], [50.0, 45.0, 55.0])}
    assert "These intervals rest on" not in comparison_markdown(document, Path("grid.yaml"), {0: {"a": 1.0}})
    document["extra"] = {"30 extra images (arrays, /x.npz), 50 % of every batch": ["a__seed1", "a__seed0"]}
    assert "Trained with 30 extra images (arrays, /x.npz), 50 % of every batch: a__seed0, a__seed1." in (
        comparison_markdown(document, Path("grid.yaml"), {0: {"a": 1.0}})
    )


def test_the_comparison_names_the_runs_whose_sanity_checks_failed():
    from robustdistill.studies.assemble import failed_checks
    from robustdistill.studies.render import checks_summary

    def report(*failed):
        checks = [{"id": 1, "name": "eps_zero", "status": "passed", "message": "ok"}]
        checks += [{"id": i, "name": n, "status": "failed", "message": "m; detail"} for i, n in failed]
        return {"checks": checks}

    reports = {
        "a__seed0": report(),
        "a__seed1": report((8, "autoattack_flags")),
        "b__seed0": report((5, "black_box"), (8, "autoattack_flags")),
    }
    checks = failed_checks(reports)
    assert checks["runs"] == 3 and checks["checked"] == 3
    assert list(checks["failed"]) == ["5 black_box", "8 autoattack_flags"]
    assert checks["failed"]["8 autoattack_flags"]["runs"] == ["a__seed1", "b__seed0"]
    assert checks["failed"]["5 black_box"]["asserts"].startswith("a black-box attack stronger")
    text = "\n".join(checks_summary(checks))
    assert "1 of 3 runs passed every sanity check." in text and "may overestimate" in text
    assert "- check 8 autoattack_flags (AutoAttack's own checks must raise no warning): a__seed1, b__seed0" in text
    assert checks_summary(failed_checks({"a__seed0": report(), "b__seed0": {"checks": []}})) == [
        "1 of 2 runs passed every sanity check (1 ran none: eval.checks false)."
    ]
    assert checks_summary(failed_checks({"a__seed0": {"checks": []}})) == [
        "None of the 1 runs ran the sanity checks (eval.checks: false)."
    ]


@pytest.mark.slow
def test_a_grid_evaluated_on_corruptions_compares_them_with_intervals(tmp_path):
    import numpy as np
    import torch

    from robustdistill.data import load_dataset
    from robustdistill.recipes import recipe
    from robustdistill.training.config import from_dict

    test = load_dataset(from_dict(recipe("pgd_at")).data).test
    x = (test.x[:100].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    folder = tmp_path / "digits-c"
    folder.mkdir()
    np.save(folder / "labels.npy", np.tile(test.y[:100].numpy(), 5))
    rng = np.random.default_rng(0)
    for name, scale in (("noise", 40), ("speckle", 80)):
        severities = [np.clip(x + rng.normal(0, scale * s / 5, x.shape), 0, 255).astype(np.uint8) for s in range(1, 6)]
        np.save(folder / f"{name}.npy", np.concatenate(severities))
    text = GRID.replace("subset: 120}", f"subset: 120, corruptions: {folder}}}")
    _grid(tmp_path / "grid", text)
    done = _compare(tmp_path / "grid")
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    report = json.loads((tmp_path / "grid" / "out" / "report.json").read_text())
    assert report["metrics"][-2:] == ["corruptions", "worst corruptions"]
    assert report["corruptions"]["images"] == 100 and report["corruptions"]["variants"] == 10
    for cell in ("rslad", "pgd_at"):
        estimate, lo, hi = report["groups"][0]["cells"][cell]["metrics"]["corruptions"]
        assert 0 < lo <= estimate <= hi < 100
        runs = [
            json.loads((tmp_path / "grid" / "out" / "runs" / f"{cell}__seed{s}" / "report.json").read_text())
            for s in (0, 1)
        ]
        assert estimate == pytest.approx(100 * np.mean([r["corruptions"]["mean"] for r in runs]))  # mean over seeds
    assert any(d["metric"] == "corruptions" for d in report["groups"][0]["differences"])
    csv = (tmp_path / "grid" / "out" / "cells.csv").read_text()
    assert csv.count(",corruptions,") == 4 and csv.count(",worst corruptions,") == 4
    assert (
        "Corruptions: accuracy on 100 images x 10 corrupted versions"
        in (tmp_path / "grid" / "out" / "report.md").read_text()
    )


def test_the_cells_table_names_each_cells_extra_images():
    from robustdistill.evaluation.report import extra_cell
    from robustdistill.studies.assemble import _extra_entry
    from robustdistill.studies.render import _group_lines

    mixed = extra_cell({"source": "arrays", "root": "/g.npz", "fraction": 0.7, "images": 5000, "labels": False})
    assert mixed == "5000 unlabeled at 70 %" and extra_cell({"fraction": 0.5}) == "at 50 %"
    assert _extra_entry([None, None]) == {} and _extra_entry([mixed, mixed]) == {"extra": mixed}
    assert _extra_entry([mixed, None]) == {"extra": "differs between seeds"}
    metrics = {"clean": [90.0, 88.0, 92.0]}
    cells = {"plain": {"seeds": [0], "metrics": metrics}, "gen": {"seeds": [0], "metrics": metrics, "extra": mixed}}
    group = {"axes": {}, "cells": cells, "differences": [], "missing": {}, "notes": []}
    text = "\n".join(_group_lines(group, ["clean"], {"plain": 60.0, "gen": 90.0}))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    assert rows[0] == ["cell", "seeds", "extra images", "clean %", "training"]
    assert rows[2][:3] == ["plain", "1", "none"] and rows[3][:3] == ["gen", "1", "5000 unlabeled at 70 %"]
    del cells["gen"]["extra"]
    assert "extra images" not in "\n".join(_group_lines(group, ["clean"], {"plain": 60.0, "gen": 90.0}))
