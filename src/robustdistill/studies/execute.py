"""`robustdistill compare GRID.yaml`: a method comparison as one command. This module runs a grid's
runs here (`--jobs N` processes) under the policy both executors share (`train_run`: train, resume,
evaluate again or refuse); `slurm.py` submits them as jobs instead, `assemble.py` writes the report.

A grid file names the cells (each a method's recipe or config file, with overrides), crossed with
seeds and optional axes (any dotted config key); the teachers the cells share (trained once by the
grid, or given as paths); the evaluation every cell runs; a reference cell and the pairs to compare:

    seeds: [0, 1, 2]
    axes: {model.kwargs.width: [8, 16]}          # optional: every combination is one group
    teachers:
      robust: {recipe: trades}                    # trained by the grid (recipe or config + overrides)
      clean: {path: runs/natural}                 # or given
    cells:
      rslad: {recipe: rslad}
      absld: {recipe: absld}
      bmtard_rt: {recipe: bmtard, teachers: {clean: robust}}   # the robust teacher in the clean role
    eval: {attacks: [clean, pgd20]}               # eval.* keys set for every cell
    reference: rslad
    pairs: [[absld, rslad]]

Every cell is an ordinary run folder under `OUT/runs/`, the teachers under `OUT/teachers/`: a
finished one is reused, an interrupted one resumed (killed at any moment, the same command gives
the same report), one whose config changed since it ran is refused with the keys named, and a cell
that fails is reported while the others go on. The report (`OUT/report.md`, `report.json`,
`cells.csv`) gives each cell's metrics with intervals over seeds and test images and the paired
differences (`stats`), per group.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.errors import ConfigError, UserError
from ..core.progress import shown
from ..core.timing import duration
from ..evaluation.report import markdown_table
from ..storage.runs import MARKER
from ..training.config import TRACKING, config_changes, load_config, resumable
from ..training.estimate import estimate
from ..training.loop import train
from .assemble import publish
from .grid import GridRun, prepare, status

log = logging.getLogger("robustdistill")


def train_run(run: GridRun, progress: bool = True) -> None:
    """Train or finish one run. A finished run whose config changed since only in keys a resume may
    change (`config.resumable`: the evaluation's, more epochs) is resumed, so re-evaluated (and its
    config_history.jsonl records it); any other change is refused."""
    state = status(run)
    if state == "finished":
        changes = finished_changes(run)
        if changes:
            log.info("compare: %s: %s changed: resumed, evaluated again", run.name, ", ".join(changes))
            train(run.cfg, resume=True, progress=progress)
        return
    if state == "partial":
        train(run.cfg, resume=True, progress=progress)
    else:  # a folder with nothing to resume from (killed before its first checkpoint) is replaced
        train(run.cfg, force=(run.folder / MARKER).is_file(), progress=progress)


def finished_changes(run: GridRun) -> dict[str, tuple[Any, Any]]:
    """What changed in a finished run's config since it ran: only keys a resume may change
    (`config.resumable`; the trackers' keys are ignored), else a ConfigError naming the others."""
    changes = config_changes(load_config(run.folder / "config.yaml"), run.cfg)
    # the trackers change nothing measured: a finished run is not trained or evaluated again for them
    changes = {k: v for k, v in changes.items() if not (k == TRACKING or k.startswith(TRACKING + "."))}
    refused = {k: v for k, v in changes.items() if not resumable(k)}
    if refused:
        keys = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:4])
        raise ConfigError(f"{run.folder} was trained with another config ({keys}); move it away to train it again")
    return changes


def compare_locally(
    grid_path: str | Path,
    out: Optional[str | Path] = None,
    dry_run: bool = False,
    command: str = "",
    jobs: int = 1,
    into: Optional[str | Path] = None,
    progress: bool = True,
) -> Path:
    """Train what is missing, `jobs` runs at a time, and write the comparison into `out` (default:
    comparisons/<grid name>); `into`: also into that markdown file, between its markers
    `<!-- compare:<grid name>:begin -->` and `<!-- compare:<grid name>:end -->`. `progress`: log
    lines and progress bars (False: warnings and errors only)."""
    with shown(progress):
        return _compare(grid_path, out, dry_run, command, jobs, into)


def _compare(grid_path, out, dry_run: bool, command: str, jobs: int, into) -> Path:
    grid, grid_path, out, teachers, cells = prepare(grid_path, out, into)
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if dry_run:
        print(dry_run_table(teachers, cells, jobs))
        return out
    _warn_oversubscribed(teachers + cells, jobs)
    failed: dict[str, str] = {}
    run_locally(teachers, jobs, failed)
    if failed:  # every cell needs its teachers
        raise UserError("; ".join(f"teacher {name} failed: {why}" for name, why in failed.items()))
    run_locally(cells, jobs, failed)
    publish(grid, grid_path, out, cells, failed, command, into)
    return out


def _warn_oversubscribed(runs: list[GridRun], jobs: int) -> None:
    threads = max((r.cfg.train.threads or torch.get_num_threads()) for r in runs)
    cores = os.cpu_count() or 1
    if jobs > 1 and jobs * threads > cores:
        log.warning(
            "compare: --jobs %d with up to %d threads each oversubscribes %d cores (runs slow each other down "
            "many times over): set train.threads in the grid (threads: 1) or lower --jobs",
            jobs,
            threads,
            cores,
        )


def run_locally(runs: list[GridRun], jobs: int, failed: dict[str, str]) -> None:
    """Train the runs that are not finished, `jobs` at a time (each in its own process when more
    than one), recording failures in `failed`; a finished run is checked against its config (and
    evaluated again when only its evaluation changed, see `train_run`)."""
    todo = []
    for run in runs:
        if status(run) == "finished":
            _record(run, _outcome(run), failed)
        else:
            todo.append(run)
    started, done = time.perf_counter(), 0
    log.info("compare: %d of %d runs finished, %d to train", len(runs) - len(todo), len(runs), len(todo))

    def progress(run: GridRun) -> None:
        nonlocal done
        done += 1
        left = len(todo) - done
        to_go = (time.perf_counter() - started) / done * left
        log.info(
            "compare: %s done (%d of %d trained, %d left%s)",
            run.name,
            done,
            len(todo),
            left,
            f", about {duration(to_go)} to go" if left else "",
        )

    if jobs == 1 or len(todo) <= 1:
        for run in todo:
            log.info("compare: training %s (%d to train)", run.name, len(todo) - done)
            _record(run, _outcome(run, progress=True), failed)
            progress(run)
        return
    gpus = torch.cuda.device_count()
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for k in range(jobs):
        slots.put(str(k % gpus) if gpus else None)
    log.info("compare: %d runs to train, %d at a time", len(todo), jobs)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker, initargs=(slots,)) as pool:
        futures = {pool.submit(_outcome, run, False): run for run in todo}  # the workers say nothing
        for future in as_completed(futures):
            run = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed worker fails its run, not the grid
                outcome = f"{type(exc).__name__}: {exc}"
            _record(run, outcome, failed)
            progress(run)


def _worker(slots) -> None:
    """A worker process: its own GPU where there are GPUs, warnings only, no progress bars."""
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.environ["TQDM_DISABLE"] = "1"
    log.setLevel(logging.WARNING)


def _outcome(run: GridRun, progress: bool = True) -> Optional[str]:
    """Train (or check) one run; the one-line error of a run that failed on the user's side, else None."""
    try:
        train_run(run, progress)
    except UserError as exc:
        return str(exc)
    return None


def _record(run: GridRun, outcome: Optional[str], failed: dict[str, str]) -> None:
    if outcome is not None:
        failed[run.name] = outcome
        log.warning("compare: %s failed: %s", run.name, outcome)


def dry_run_table(teachers: list[GridRun], cells: list[GridRun], jobs: int = 1) -> str:
    """Each run, what the grid would do with it (as `train_run` decides) and, for runs still to
    train, the estimated training time."""
    rows, total = [], 0.0
    known: dict[str, float] = {}
    for run in teachers + cells:
        state = action = status(run)
        if state == "finished":
            action, state = _finished_action(run)
        seconds = None
        if state != "finished":
            # one estimate per cell, group and kind: seeds cost the same
            key = f"{run.cell or run.name}/{run.group}/{state}"
            if key not in known:
                try:
                    known[key] = estimate(run.cfg, force=True, resume=state != "new").total
                except UserError as exc:
                    log.info("compare: no estimate for %s: %s", run.name, exc)
                    known[key] = math.nan
            seconds = known[key]
            total += seconds if math.isfinite(seconds) else 0.0
        shown = "-" if seconds is None else duration(seconds) if math.isfinite(seconds) else "unknown (teachers?)"
        rows.append([run.name, "teacher" if run.cell is None else run.cell, action, shown])
    unknown = any(math.isnan(v) for v in known.values())
    tail = (
        f"at least {duration(total)} one run at a time (runs whose teachers are not trained yet not counted)"
        if unknown
        else f"about {duration(total)} one run at a time"
    )
    if jobs > 1:  # each estimate was measured alone: side by side, only the cores' share is gained
        tail += f"; with --jobs {jobs}, down to about {duration(total / jobs)} where the cores allow (train.threads)"
    return markdown_table(["run", "cell", "status", "training time"], rows) + f"\n\nto train: {tail}"


def _finished_action(run: GridRun) -> tuple[str, str]:
    """(what the grid does with a finished run, and its state for the estimate): kept as it is, resumed
    for the keys that changed since (a resume trains any new epochs), or refused."""
    try:
        changes = finished_changes(run)
    except ConfigError as exc:
        return f"finished; refused: {exc}", "finished"
    if not changes:
        return "finished", "finished"
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
    more = "train.epochs" in changes
    return f"finished; resumed ({shown}){'' if more else ', evaluated again'}", "partial" if more else "finished"
