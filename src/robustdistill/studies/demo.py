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
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
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
    jobs: int | None = None,
) -> str:
    """Train teachers and students on digits under `out_dir` (`demo_runs`); return the comparison table
    (also written to `OUT/demo/comparison.md`, and into the markdown file `into` between
    `<!-- demo:begin -->` and `<!-- demo:end -->`). `progress`: log lines and progress bars.
    `jobs`: runs trained at once, each in its own process on one thread (default: one per core, at
    most two: the two teachers, then the students two by two); the results do not depend on it."""
    out_dir = Path(out_dir)
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be >= 1 (or left out: the recipes' epochs), got {epochs}")
    jobs = min(2, os.cpu_count() or 1) if jobs is None else jobs
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
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
        return _train_and_tabulate(runs, force, epochs, into, jobs)


LABELS = {"natural": "clean teacher (natural)", "trades": "robust teacher (TRADES)"} | {
    s: f"student ({s})" for s in STUDENTS
}


def _train_and_tabulate(runs: dict[str, Path], force: bool, epochs: int | None, into, jobs: int) -> str:
    started = time.perf_counter()
    shrink = [f"train.epochs={epochs}", "train.milestones=[]"] if epochs is not None else []
    teacher_paths = {role: runs[name] for role, name in TEACHERS.items()}
    configs = {
        name: from_dict(recipe(name, teacher_paths), [f"out_dir={runs[name].parent}", *shrink]) for name in LABELS
    }
    _train_all([configs[n] for n in TEACHERS.values()], force, jobs)  # the students need both teachers
    _train_all([configs[n] for n in STUDENTS], force, jobs)
    rows = [(LABELS[name], read_report(runs[name] / "report.json")) for name in LABELS]
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


def _train_all(configs: list, force: bool, jobs: int) -> None:
    """Train `configs`, `jobs` at a time (each in a process of its own, silent but for warnings,
    when more than one); the first failure stops the demo with its error."""
    for cfg in configs:
        log.info("demo: training %s -> %s", LABELS[cfg.run_dir.name], cfg.run_dir)
    if jobs == 1:
        for cfg in configs:
            train(cfg, force=force)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(configs)), mp_context=context) as pool:
        futures = [pool.submit(_train_quietly, cfg, force) for cfg in configs]
        for cfg, future in zip(configs, futures):
            future.result()  # a run's error (a UserError among them) is raised here
            log.info("demo: %s done", cfg.run_dir)


def _train_quietly(cfg, force: bool) -> None:
    os.environ["TQDM_DISABLE"] = "1"
    train(cfg, force=force, progress=False)
