import json

import pytest

from robustdistill.cli import main
from robustdistill.studies.demo import STUDENTS


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
    for label in ("clean teacher (natural)", "robust teacher (TRADES)", "W-Robust (autoattack)", "NSD (autoattack)"):
        assert label in table
    for student in ("rslad", "absld", "mtard", "bmtard"):
        assert f"student ({student})" in table
    # the teachers where the digits recipes look for them, the students beside
    where = {"natural": out / "natural", "trades": out / "trades"} | {s: out / "demo" / s for s in STUDENTS}
    report = lambda run: json.loads((where[run] / "report.json").read_text())["attacks"]  # noqa: E731
    assert report("natural")["clean"]["accuracy"] > 0.95 and report("natural")["autoattack"]["accuracy"] < 0.05
    assert report("trades")["autoattack"]["accuracy"] > 0.3
    # the students, 4x smaller, inherit much of the robust teacher's robustness; AutoAttack is below PGD-20
    for student in STUDENTS:
        attacks = report(student)
        assert attacks["clean"]["accuracy"] > 0.85 and attacks["autoattack"]["accuracy"] > 0.15, student
        assert attacks["autoattack"]["accuracy"] <= attacks["pgd20"]["accuracy"], student
    worst = lambda run: report(run)["autoattack"]["worst_class_accuracy"]  # noqa: E731
    assert worst("absld") > worst("rslad")  # class-wise temperatures lift the worst class (AutoAttack: 9 vs 3 %)
    assert (out / "demo" / "comparison.md").read_text().count("|") > 20
    assert main(["demo", "--out", str(out)]) == 2  # an earlier demo is never replaced silently


def test_demo_into_a_file_without_its_markers_is_refused_before_anything_trains(tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--into", str(notes)]) == 2
    assert "it needs one line <!-- demo:begin -->" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists() and notes.read_text() == "# Notes\n"
