import json

import pytest

from robustdistill.cli import main


@pytest.mark.slow
def test_demo_trains_teachers_and_a_robust_student(tmp_path, capsys):
    out, notes = tmp_path / "demo", tmp_path / "notes.md"
    notes.write_text("# Notes\n<!-- demo:begin -->\nold table\n<!-- demo:end -->\nafter\n")
    assert main(["demo", "--out", str(out), "--into", str(notes)]) == 0
    table = capsys.readouterr().out
    written = notes.read_text()
    printed = table.split("\n\nruns and reports")[0].strip()
    assert written.startswith("# Notes\n<!-- demo:begin -->\n`robustdistill demo` (robustdistill ")
    assert printed in written and "old table" not in written and written.endswith("<!-- demo:end -->\nafter\n")
    for label in ("clean teacher (natural)", "robust teacher (TRADES)", "W-Robust", "NSD"):
        assert label in table
    for student in ("rslad", "absld", "mtard", "bmtard"):
        assert f"student ({student})" in table
    acc = lambda run, attack: json.loads((out / run / "report.json").read_text())["attacks"][attack]["accuracy"]  # noqa: E731
    assert acc("natural", "clean") > 0.95 and acc("natural", "pgd20") < 0.1
    assert acc("trades", "pgd20") > 0.5
    # the students, 4x smaller, inherit much of the robust teacher's robustness
    for student in ("rslad", "absld", "mtard", "bmtard"):
        assert acc(student, "clean") > 0.85 and acc(student, "pgd20") > 0.25, student
    worst = lambda run: json.loads((out / run / "report.json").read_text())["attacks"]["pgd20"]["worst_class_accuracy"]  # noqa: E731
    assert worst("absld") > worst("rslad")  # class-wise temperatures lift the worst class (3 seeds: 25 vs 13 %)
    assert (out / "comparison.md").read_text().count("|") > 20
    assert main(["demo", "--out", str(out)]) == 2  # an earlier demo is never replaced silently


def test_demo_into_a_file_without_its_markers_is_refused_before_anything_trains(tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--into", str(notes)]) == 2
    assert "it needs one line <!-- demo:begin -->" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists() and notes.read_text() == "# Notes\n"
