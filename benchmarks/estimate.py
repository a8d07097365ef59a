"""Benchmark: how close `robustdistill train --estimate` comes to the training time it predicts.

For each digits recipe: the estimate (10 timed steps after 2 warm-up steps, one validation), then
the run itself, timed from the end of its setup to the start of its final evaluation (what the
estimate covers: every epoch's steps, validations and checkpoint writes), `repeats` times in
alternating order; the ratio estimate / measured (below 1: the estimate is short of the run).

    python -m benchmarks.estimate                           # rslad, absld, bmtard, pgd_at; 3 rounds
    python -m benchmarks.estimate --recipes trades --repeats 5 --epochs 10

The teachers (the natural and TRADES recipes, a few epochs: their accuracy does not change the
time) are trained once in a temporary folder first.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, settings_line
from robustdistill.recipes import recipe
from robustdistill.studies.demo import TEACHERS
from robustdistill.training.config import from_dict
from robustdistill.training.estimate import estimate
from robustdistill.training.loop import finish, fit, setup, train


def config(name: str, out: Path, epochs: int, run_name: str):
    raw = recipe(name, {role: out / teacher for role, teacher in TEACHERS.items()})
    extra = [f"out_dir={out}", f"name={run_name}"] + (
        [f"train.epochs={epochs}", "train.milestones=[]"] if epochs else []
    )
    return from_dict(raw, extra)


def measured_training(cfg) -> float:
    """Seconds from the end of `train`'s setup to the start of its final evaluation: `train`'s
    three phases called one by one, the middle one timed."""
    run = setup(cfg, force=True, resume=False)
    start = time.perf_counter()
    fit(run)
    seconds = time.perf_counter() - start
    finish(run)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["rslad", "absld", "bmtard", "pgd_at"])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (estimate, run) per recipe")
    parser.add_argument("--epochs", type=int, default=0, help="train.epochs (default: the recipe's)")
    args = parser.parse_args()
    logging.getLogger("robustdistill").setLevel(logging.WARNING)
    print(settings_line())
    header = ["recipe", "epochs", "estimate s [range]", "measured s [range]", "estimate / measured [range]"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        out = Path(tmp_name)
        for name in TEACHERS.values():
            train(config(name, out, 3, name))
        for name in args.recipes:
            cfg = config(name, out, args.epochs, f"{name}_timed")
            estimates, runs = [], []
            for r in range(args.repeats):
                for what in ("estimate", "run") if r % 2 == 0 else ("run", "estimate"):
                    if what == "estimate":
                        estimates.append(estimate(cfg, force=True).total)
                    else:
                        runs.append(measured_training(cfg))
            ratios = [e / m for e, m in zip(estimates, runs)]
            rows.append(
                [
                    name,
                    str(cfg.train.epochs),
                    f"{statistics.median(estimates):.1f} [{min(estimates):.1f}, {max(estimates):.1f}]",
                    f"{statistics.median(runs):.1f} [{min(runs):.1f}, {max(runs):.1f}]",
                    f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    print()
    print_table(header, rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
