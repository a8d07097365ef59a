"""Benchmark: what AutoAttack costs a comparison grid. The time of the digits_methods grid with
AutoAttack in every cell's final evaluation, against the same grid with PGD-20 alone.

    python -m benchmarks.grid_cost                         # every cell of digits_methods, one seed
    python -m benchmarks.grid_cost --cells rslad absld --repeats 3

The two grids train the same weights (the evaluation never touches training), so they differ by
each run's final evaluation only. Every cell is trained once (seed 0: a grid's seeds cost the same,
so the ratio of one seed is that of five), with the grid's own overrides and one intra-op thread
as the recipes pin it; its training time is measured with the PGD-20 evaluation the PGD grid ends
with. Then each run's final evaluation is timed both ways, the sanity checks included as in the
grid: PGD-20 alone (clean, pgd20), with the fast AutoAttack beside it (autoattack_fast) and with the
standard one (autoattack), `repeats` times, interleaved. An AutoAttack grid's time is the PGD grid's
with each run's PGD evaluation replaced by its AutoAttack one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, settings_line
from robustdistill.api import evaluate
from robustdistill.core.timing import duration
from robustdistill.recipes import grid_file
from robustdistill.studies.grid import load_grid, plan
from robustdistill.training.loop import train

KINDS = {  # each run's final evaluation, timed three ways
    "pgd": "eval.attacks=[clean, pgd20]",
    "fast": "eval.attacks=[clean, pgd20, autoattack_fast]",
    "autoattack": "eval.attacks=[clean, pgd20, autoattack]",
}


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="digits_methods")
    parser.add_argument("--cells", nargs="+", help="these cells only (default: every cell)")
    parser.add_argument("--repeats", type=int, default=2, help="timed evaluations of each kind per run")
    args = parser.parse_args()
    print(settings_line())
    path = grid_file(args.grid)
    grid = load_grid(path)
    grid.seeds = grid.seeds[:1]
    with tempfile.TemporaryDirectory() as name:
        out = Path(name)
        teachers, cells = plan(grid, path, out)
        for run in teachers:
            train(run.cfg, progress=False)
        rows, totals = [], dict.fromkeys(KINDS, 0.0)
        for run in cells:
            if args.cells and run.cell not in args.cells:
                continue
            run.cfg.eval.attacks = ["clean", "pgd20"]
            trained = timed(lambda cfg=run.cfg: train(cfg, progress=False))
            times = {kind: [] for kind in KINDS}
            for r in range(args.repeats):
                for kind in KINDS if r % 2 == 0 else reversed(KINDS):
                    spent = timed(lambda o=KINDS[kind], folder=run.folder: evaluate(folder, [o], progress=False))
                    times[kind].append(spent)
            median = {kind: statistics.median(t) for kind, t in times.items()}
            grid_time = {kind: trained - median["pgd"] + median[kind] for kind in KINDS}
            for kind in KINDS:
                totals[kind] += grid_time[kind]
            rows.append(
                [run.cell, f"{trained:.1f}"]
                + [f"{median[kind]:.1f}" for kind in KINDS]
                + [f"{grid_time[kind] / trained:.2f}" for kind in ("fast", "autoattack")]
            )
    print(f"grid {args.grid}, seed 0 of every cell, {args.repeats} timed evaluations of each kind per run")
    header = ["cell", "training + PGD-20 evaluation s", "evaluation s: PGD-20", "+ AutoAttack (fast)"]
    header += ["+ AutoAttack (standard)", "ratio fast", "ratio standard"]
    print_table(header, rows)
    alone = duration(totals["pgd"])
    for kind, name in (("fast", "AutoAttack (fast)"), ("autoattack", "AutoAttack (standard)")):
        ratio = totals[kind] / totals["pgd"]
        print(f"grid with {name}: {duration(totals[kind])} per seed, with PGD-20 alone {alone}: {ratio:.2f}x")
    print(f"({len(rows)} cells; one intra-op thread per run, as the recipes pin it)")


if __name__ == "__main__":
    main()
