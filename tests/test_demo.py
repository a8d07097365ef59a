import json

import pytest

from robustdistill.cli import main


@pytest.mark.slow
def test_demo_trains_teachers_and_a_robust_student(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for label in ("clean teacher (natural)", "robust teacher (TRADES)", "student (rslad)", "W-Robust"):
        assert label in table
    acc = lambda run, attack: json.loads((out / run / "report.json").read_text())["attacks"][attack]["accuracy"]  # noqa: E731
    assert acc("natural", "clean") > 0.95 and acc("natural", "pgd20") < 0.1
    assert acc("trades", "pgd20") > 0.5
    # the student, 4x smaller, inherits most of the robust teacher's robustness
    assert acc("rslad", "clean") > 0.85 and acc("rslad", "pgd20") > 0.4
    assert (out / "comparison.md").read_text().count("|") > 20
    assert main(["demo", "--out", str(out)]) == 2  # an earlier demo is never replaced silently
