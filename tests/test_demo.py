import re

import pytest

from robustdistill.cli import main
from robustdistill.studies.demo import STUDENTS


@pytest.mark.slow
def test_demo_writes_its_table_into_a_file_and_never_replaces_an_earlier_demo(tmp_path, capsys):
    """What the demo's runs show is checked by the tutorial's test (tests/test_tutorial.py), which runs
    the full demo; this one, one epoch per run, checks the table it writes where it is asked to."""
    out, notes = tmp_path / "demo", tmp_path / "notes.md"
    notes.write_text("# Notes\n<!-- demo:begin -->\nold table\n<!-- demo:end -->\nafter\n")
    assert main(["demo", "--out", str(out), "--epochs", "1", "--into", str(notes)]) == 0
    table = capsys.readouterr().out
    written = notes.read_text()
    printed = table.split("\n\nteachers:")[0].strip()
    assert written.startswith("# Notes\n<!-- demo:begin -->\n`robustdistill demo --epochs 1` (robustdistill ")
    assert printed in written and "old table" not in written and written.endswith("<!-- demo:end -->\nafter\n")
    for label in ("clean teacher (natural)", "robust teacher (TRADES)", "W-Robust (autoattack)", "NSD (autoattack)"):
        assert label in table
    assert all(f"student ({s})" in table for s in STUDENTS)
    assert re.search(r"\d of 6 runs passed every sanity check", written)  # a failed check is never hidden
    assert (out / "natural" / "report.json").is_file() and (out / "demo" / "comparison.md").is_file()
    assert main(["demo", "--out", str(out)]) == 2  # an earlier demo is never replaced silently
    assert "already exist: the runs of an earlier demo" in capsys.readouterr().err


def test_demo_into_a_file_without_its_markers_is_refused_before_anything_trains(tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--into", str(notes)]) == 2
    assert "it needs one line <!-- demo:begin -->" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists() and notes.read_text() == "# Notes\n"


def test_demo_jobs_below_one_is_refused_before_anything_trains(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--jobs", "0"]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
