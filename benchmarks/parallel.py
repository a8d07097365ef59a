"""Benchmark: digits trainings run side by side, as `robustdistill compare --jobs N` runs them, at
a given intra-op thread count each: the median epoch time against one training alone.

    python -m benchmarks.parallel                         # 1 and 3 runs at 2 threads, 1 and 2 runs at 1 thread
    python -m benchmarks.parallel --layouts 3x2 2x1 --epochs 3

Each layout `RxT` starts R processes at once, each training the RSLAD digits recipe for `epochs`
epochs with train.threads=T (its teacher trained once first); the epoch times come from the runs'
metrics.jsonl, the first epoch left out. The ratio is the median epoch time against that of one
run at the same thread count (above 1: slower side by side).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import print_table, settings_line
from robustdistill.recipes import RECIPES, recipe
from robustdistill.storage.runs import read_metrics
from robustdistill.training.config import from_dict
from robustdistill.training.loop import train


def layout(text: str) -> tuple[int, int]:
    runs, threads = text.lower().split("x")
    return int(runs), int(threads)


def epochs_side_by_side(tmp: Path, runs: int, threads: int, epochs: int, tag: str) -> list[float]:
    """Start `runs` trainings at once; every run's epoch times after its first."""
    teacher = tmp / "teachers" / "trades"
    processes = []
    for k in range(runs):
        overrides = [
            f"out_dir={tmp / tag}",
            f"name=run{k}",
            f"seed={k}",
            f"train.epochs={epochs}",
            "train.milestones=[]",
            f"train.threads={threads}",
            f"teachers.robust.path={teacher}",
            "eval.checks=false",
            "eval.attacks=[clean]",
        ]
        argv = [sys.executable, "-m", "robustdistill", "train", str(tmp / "rslad.yaml"), *overrides]
        processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, err = process.communicate()
        if process.returncode:
            raise SystemExit(err[-2000:])
    return [r["seconds"] for k in range(runs) for r in read_metrics(tmp / tag / f"run{k}")[1:] if r["type"] == "epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", type=layout, default=[(1, 2), (3, 2), (1, 1), (2, 1)])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    print(settings_line())
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        train(from_dict(recipe("trades"), [f"out_dir={tmp / 'teachers'}", "train.epochs=2", "train.milestones=[]"]))
        (tmp / "rslad.yaml").write_text((RECIPES / "rslad.yaml").read_text())
        alone: dict[int, float] = {}
        for runs, threads in sorted(args.layouts, key=lambda rt: (rt[1], rt[0])):
            times = epochs_side_by_side(tmp, runs, threads, args.epochs, f"{runs}x{threads}")
            median = statistics.median(times)
            if runs == 1:
                alone[threads] = median
            ratio = f"{median / alone[threads]:.1f}x" if threads in alone else "-"
            rows.append(
                [
                    f"{runs} x {threads}",
                    f"{median:.2f} [{min(times):.2f}, {max(times):.2f}]",
                    ratio,
                    str(runs * threads),
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    print()
    print_table(["runs x threads", "s/epoch [range]", "against one alone", f"threads on {os.cpu_count()} cores"], rows)


if __name__ == "__main__":
    main()
