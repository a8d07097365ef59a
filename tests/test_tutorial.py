"""The tutorial (docs/tutorial.md) run as a user runs it: every command of its bash blocks, in order,
in an empty folder, through the installed `robustdistill` command; then what the tutorial says of
the results is checked on them (the demo's teachers where the recipes look, AutoAttack below PGD-20,
ABSLD's worst class above RSLAD's, the grid's report on two seeds)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"


def commands(text: str) -> list[str]:
    """The bash blocks of a markdown page, in order."""
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_the_tutorial_holds_commands_for_every_step():
    blocks = commands(TUTORIAL.read_text())
    assert blocks[0].strip() == "robustdistill demo" and len(blocks) >= 5
    assert any("robustdistill compare my_grid.yaml" in block for block in blocks)


@pytest.mark.slow
def test_the_tutorial_runs_as_written_and_says_what_it_shows(tmp_path):
    script = "set -euo pipefail\n" + "\n".join(commands(TUTORIAL.read_text()))
    bin_dir = Path(shutil.which("robustdistill") or Path(sys.executable).parent / "robustdistill").parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = tmp_path / "runs"
    attacks = lambda run: json.loads((runs / run / "report.json").read_text())["attacks"]  # noqa: E731
    # the demo: its teachers where the recipes look for them, its students beside
    assert attacks("natural")["clean"]["accuracy"] > 0.95 and attacks("natural")["autoattack"]["accuracy"] < 0.05
    assert attacks("trades")["autoattack"]["accuracy"] > 0.3
    for student in ("rslad", "absld", "mtard", "bmtard"):
        got = attacks(f"demo/{student}")
        assert got["clean"]["accuracy"] > 0.85 and got["autoattack"]["accuracy"] > 0.15, student
        assert got["autoattack"]["accuracy"] <= got["pgd20"]["accuracy"], student  # PGD-20 overstates
    worst = lambda run: attacks(run)["autoattack"]["worst_class_accuracy"]  # noqa: E731
    assert worst("demo/absld") > worst("demo/rslad")  # class-wise temperatures lift the worst class
    assert "W-Robust (autoattack) %" in done.stdout and (runs / "demo" / "comparison.md").is_file()
    assert (runs / "demo" / "absld" / "plots" / "temperatures.png").is_file()
    # your own run, evaluated again; your own grid, on two seeds, says so
    assert "width: 24" in (runs / "rslad_wide" / "config.yaml").read_text()
    assert list((runs / "rslad_wide").glob("eval-*/report.json"))
    report = (tmp_path / "comparisons" / "my_grid" / "report.md").read_text()
    assert "These intervals rest on 2 seeds" in report and "absld - rslad" in report
    assert "runs/trades" in done.stdout  # the Python example printed the recipe's teacher path
