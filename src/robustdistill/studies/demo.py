"""`robustdistill demo`: the whole story on the embedded digits, in a few minutes on a laptop CPU.

It trains a clean teacher (natural training) and a robust teacher (TRADES), distills RSLAD,
ABSLD, MTARD and B-MTARD students from them, evaluates everything on the test split and prints
one comparison table (clean, PGD-20, worst-class PGD-20, NSD, W-Robust Acc).

The digits recipes are package data (`robustdistill.recipes`; `configs/digits` in a checkout links
to them), so the demo works from any install.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..core.errors import UserError
from ..core.timing import duration
from ..evaluation.report import comparison_table, machine, read_report, setup_line, versions, write_section
from ..recipes import recipe
from ..training.config import from_dict
from ..training.loop import train

log = logging.getLogger("robustdistill")

TEACHERS = {"clean": "natural", "robust": "trades"}
STUDENTS = ["rslad", "absld", "mtard", "bmtard"]


def run_demo(
    out_dir: str | Path = "runs/demo", force: bool = False, epochs: int | None = None, into: str | Path | None = None
) -> str:
    """Train teachers and students on digits under `out_dir`; return the comparison table (also
    written into the markdown file `into` between `<!-- demo:begin -->` and `<!-- demo:end -->`)."""
    out_dir = Path(out_dir)
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be >= 1 (or left out: the recipes' epochs), got {epochs}")
    if into is not None:
        write_section(into, "demo")  # the markers are there, before anything trains
    started = time.perf_counter()
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace the demo runs, or --out another folder")
    extra = [f"out_dir={out_dir}"] + ([f"train.epochs={epochs}", "train.milestones=[]"] if epochs is not None else [])
    teacher_paths = {role: out_dir / name for role, name in TEACHERS.items()}
    rows = []
    for label, name in [("clean teacher (natural)", "natural"), ("robust teacher (TRADES)", "trades")] + [
        (f"student ({s})", s) for s in STUDENTS
    ]:
        cfg = from_dict(recipe(name, teacher_paths), extra)
        log.info("demo: training %s -> %s", label, out_dir / name)
        run_dir = train(cfg, force=force)
        rows.append((label, read_report(run_dir / "report.json")))
    table = comparison_table(rows)
    (out_dir / "comparison.md").write_text("# robustdistill demo on digits (test split, eps = 0.2)\n\n" + table + "\n")
    if into is not None:
        command = "robustdistill demo" + (f" --epochs {epochs}" if epochs is not None else "")
        setup = setup_line(versions(), machine())
        took = duration(time.perf_counter() - started)
        write_section(into, "demo", f"`{command}` ({setup}; {took}), as it printed it:\n\n{table}")
    return table
