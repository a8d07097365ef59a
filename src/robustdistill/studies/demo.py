"""`robustdistill demo`: the whole story on the embedded digits, in a few minutes on a laptop CPU.

It trains a clean teacher (natural training) and a robust teacher (TRADES) where the digits recipes
look for them (`runs/natural`, `runs/trades`), distills RSLAD, ABSLD, MTARD and B-MTARD students
from them (`runs/demo/`), evaluates everything on the test split and prints one comparison table
(clean, PGD-20 and AutoAttack accuracy; under AutoAttack the worst class, NSD and W-Robust Acc).

The digits recipes are package data (`robustdistill.recipes`; `configs/digits` in a checkout links
to them), so the demo works from any install.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..core.errors import UserError
from ..core.progress import shown
from ..core.timing import duration
from ..evaluation.report import comparison_table, machine, read_report, setup_line, versions, write_section
from ..recipes import recipe
from ..training.config import from_dict
from ..training.loop import train
from .assemble import failed_checks
from .render import checks_summary

log = logging.getLogger("robustdistill")

TEACHERS = {"clean": "natural", "robust": "trades"}
STUDENTS = ["rslad", "absld", "mtard", "bmtard"]


def demo_runs(out: Path) -> dict[str, Path]:
    """Where the demo trains each run: its teachers where the digits recipes look for them (`OUT/natural`,
    `OUT/trades`: with the default OUT, `runs/`), its students under `OUT/demo/`."""
    return {name: out / name for name in TEACHERS.values()} | {name: out / "demo" / name for name in STUDENTS}


def run_demo(
    out_dir: str | Path = "runs",
    force: bool = False,
    epochs: int | None = None,
    into: str | Path | None = None,
    progress: bool = True,
) -> str:
    """Train teachers and students on digits under `out_dir` (`demo_runs`); return the comparison table
    (also written to `OUT/demo/comparison.md`, and into the markdown file `into` between
    `<!-- demo:begin -->` and `<!-- demo:end -->`). `progress`: log lines and progress bars."""
    out_dir = Path(out_dir)
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be >= 1 (or left out: the recipes' epochs), got {epochs}")
    if into is not None:
        write_section(into, "demo")  # the markers are there, before anything trains
    runs = demo_runs(out_dir)
    there = [str(path) for path in runs.values() if path.exists() and any(path.iterdir())]
    if there and not force:
        raise UserError(
            f"{', '.join(there[:3])}{' ...' if len(there) > 3 else ''} already exist: the runs of an earlier demo "
            "(or teachers you trained); pass --force to replace the demo's runs, or --out another folder"
        )
    with shown(progress):
        return _train_and_tabulate(runs, force, epochs, into)


def _train_and_tabulate(runs: dict[str, Path], force: bool, epochs: int | None, into) -> str:
    started = time.perf_counter()
    shrink = [f"train.epochs={epochs}", "train.milestones=[]"] if epochs is not None else []
    teacher_paths = {role: runs[name] for role, name in TEACHERS.items()}
    rows = []
    for label, name in [("clean teacher (natural)", "natural"), ("robust teacher (TRADES)", "trades")] + [
        (f"student ({s})", s) for s in STUDENTS
    ]:
        cfg = from_dict(recipe(name, teacher_paths), [f"out_dir={runs[name].parent}", *shrink])
        log.info("demo: training %s -> %s", label, runs[name])
        run_dir = train(cfg, force=force)
        rows.append((label, read_report(run_dir / "report.json")))
    checks = checks_summary(failed_checks(dict(rows)))
    table = comparison_table(rows) + "\n\n" + "\n".join(checks)
    heading = "# robustdistill demo on digits (test split, eps = 0.2)\n\n"
    (runs[STUDENTS[0]].parent / "comparison.md").write_text(heading + table + "\n")
    if into is not None:
        command = "robustdistill demo" + (f" --epochs {epochs}" if epochs is not None else "")
        setup = setup_line(versions(), machine())
        took = duration(time.perf_counter() - started)
        write_section(into, "demo", f"`{command}` ({setup}; {took}), as it printed it:\n\n{table}")
    return table
