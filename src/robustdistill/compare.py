"""`robustdistill compare GRID.yaml`: a method comparison as one command.

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

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .config import RESUMABLE, config_changes, load_config
from .data import load_dataset, subset_of
from .errors import ConfigError, UserError
from .estimate import estimate
from .files import atomic_write
from .grid import GRIDS, Grid, GridRun, grid_file, groups, load_grid, plan, status
from .metrics import ROBUST_ATTACK, unpack_verdicts
from .plots import plot_comparison
from .report import machine, markdown_table, read_report, setup_line, versions, write_section
from .runs import MARKER, read_metrics
from .stats import HOW, bootstrap, differences, interval, is_ratio, metric_names, run_metrics
from .timing import duration
from .train import train

log = logging.getLogger("robustdistill")


def _train(run: GridRun) -> None:
    """Train or finish one run. A finished run whose config changed since only in keys a resume may
    change (`config.RESUMABLE`: the evaluation's, more epochs) is resumed, so re-evaluated (and its
    config_history.jsonl records it); any other change is refused."""
    state = status(run)
    if state == "finished":
        changes = finished_changes(run)
        if changes:
            log.info("compare: %s: %s changed: resumed, evaluated again", run.name, ", ".join(changes))
            train(run.cfg, resume=True)
        return
    if state == "partial":
        train(run.cfg, resume=True)
    else:  # a folder with nothing to resume from (killed before its first checkpoint) is replaced
        train(run.cfg, force=(run.folder / MARKER).is_file())


def finished_changes(run: GridRun) -> dict[str, tuple[Any, Any]]:
    """What changed in a finished run's config since it ran: only keys a resume may change
    (`config.RESUMABLE`), else a ConfigError naming the others."""
    changes = config_changes(load_config(run.folder / "config.yaml"), run.cfg)
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE}
    if refused:
        keys = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:4])
        raise ConfigError(f"{run.folder} was trained with another config ({keys}); move it away to train it again")
    return changes


def run_grid(
    grid_path: str | Path,
    out: Optional[str | Path] = None,
    dry_run: bool = False,
    command: str = "",
    jobs: int = 1,
    into: Optional[str | Path] = None,
) -> Path:
    """Train what is missing, `jobs` runs at a time, and write the comparison into `out` (default:
    comparisons/<grid name>); `into`: also into that markdown file, between its markers
    `<!-- compare:<grid name>:begin -->` and `<!-- compare:<grid name>:end -->`."""
    grid, grid_path, out, teachers, cells = prepare(grid_path, out, into)
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if dry_run:
        print(dry_run_table(teachers, cells, jobs))
        return out
    _warn_oversubscribed(teachers + cells, jobs)
    failed: dict[str, str] = {}
    _run_all(teachers, jobs, failed)
    if failed:  # every cell needs its teachers
        raise UserError("; ".join(f"teacher {name} failed: {why}" for name, why in failed.items()))
    _run_all(cells, jobs, failed)
    publish(grid, grid_path, out, cells, failed, command, into)
    return out


def prepare(grid_path: str | Path, out: Optional[str | Path], into: Optional[str | Path] = None, slurm: list[str] = ()):
    """The grid (its `slurm:` section with the `KEY=VALUE` overrides `slurm`), its file, its folder
    (default comparisons/<grid name>) and its runs, all checked; `into`'s markers checked too."""
    grid_path = grid_file(grid_path)
    grid = load_grid(grid_path, slurm)
    out = Path(out) if out is not None else Path("comparisons") / grid_path.stem
    teachers, cells = plan(grid, grid_path, out)
    if into is not None:
        write_section(into, f"compare:{grid_path.stem}")  # the markers are there, before anything runs
    return grid, grid_path, out, teachers, cells


def publish(grid, grid_path: Path, out: Path, cells: list[GridRun], failed: dict[str, str], command: str, into) -> None:
    """The report of the finished cells into `out`, and into the markdown file `into` if given."""
    write_report(grid, grid_path, out, cells, failed, command)
    if into is not None:  # headings two levels down
        body = "\n".join(
            "##" + line if line.startswith("#") else line for line in (out / "report.md").read_text().splitlines()
        )
        write_section(into, f"compare:{grid_path.stem}", body)


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


def _run_all(runs: list[GridRun], jobs: int, failed: dict[str, str]) -> None:
    """Train the runs that are not finished, `jobs` at a time (each in its own process when more
    than one), recording failures in `failed`; a finished run is checked against its config (and
    evaluated again when only its evaluation changed, see `_train`)."""
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
            _record(run, _outcome(run), failed)
            progress(run)
        return
    gpus = torch.cuda.device_count()
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for k in range(jobs):
        slots.put(str(k % gpus) if gpus else None)
    log.info("compare: %d runs to train, %d at a time", len(todo), jobs)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker, initargs=(slots,)) as pool:
        futures = {pool.submit(_outcome, run): run for run in todo}
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


def _outcome(run: GridRun) -> Optional[str]:
    """Train (or check) one run; the one-line error of a run that failed on the user's side, else None."""
    try:
        _train(run)
    except UserError as exc:
        return str(exc)
    return None


def _record(run: GridRun, outcome: Optional[str], failed: dict[str, str]) -> None:
    if outcome is not None:
        failed[run.name] = outcome
        log.warning("compare: %s failed: %s", run.name, outcome)


def dry_run_table(teachers: list[GridRun], cells: list[GridRun], jobs: int = 1) -> str:
    """Each run, its status and, for runs still to train, the estimated training time."""
    rows, total = [], 0.0
    known: dict[str, float] = {}
    for run in teachers + cells:
        state, seconds = status(run), None
        if state != "finished":
            key = f"{run.cell or run.name}/{run.group}"  # one estimate per cell and group: seeds cost the same
            if key not in known:
                try:
                    known[key] = estimate(run.cfg, force=True, resume=state == "partial").total
                except UserError as exc:
                    log.info("compare: no estimate for %s: %s", run.name, exc)
                    known[key] = math.nan
            seconds = known[key]
            total += seconds if math.isfinite(seconds) else 0.0
        shown = "-" if seconds is None else duration(seconds) if math.isfinite(seconds) else "unknown (teachers?)"
        rows.append([run.name, "teacher" if run.cell is None else run.cell, state, shown])
    unknown = any(math.isnan(v) for v in known.values())
    tail = (
        f"at least {duration(total)} one run at a time (runs whose teachers are not trained yet not counted)"
        if unknown
        else f"about {duration(total)} one run at a time"
    )
    if jobs > 1:  # each estimate was measured alone: side by side, only the cores' share is gained
        tail += f"; with --jobs {jobs}, down to about {duration(total / jobs)} where the cores allow (train.threads)"
    return markdown_table(["run", "cell", "status", "training time"], rows) + f"\n\nto train: {tail}"


def _verdicts(report: dict[str, Any], attacks: list[str]) -> dict[str, np.ndarray]:
    n = report["data"]["num_samples"]
    return {a: unpack_verdicts(report["attacks"][a]["verdicts"], n) for a in attacks}


def _test_labels(run: GridRun):
    """The dataset and the labels of the test images a run was evaluated on."""
    dataset = load_dataset(run.cfg.data)
    return dataset, subset_of(dataset.test, run.cfg.eval.subset, "the test split", "eval.subset").y.numpy()


def _seconds(run: GridRun) -> float:
    return sum(r.get("seconds", 0.0) for r in read_metrics(run.folder) if r["type"] == "epoch")


def write_report(grid: Grid, grid_path: Path, out: Path, cells: list[GridRun], failed: dict[str, str], command: str):
    """report.json, report.md and cells.csv of the finished cells, per group."""
    done = [r for r in cells if status(r) == "finished" and r.name not in failed]
    if not done:
        raise UserError(f"no cell of {grid_path} finished; nothing to compare (failed: {', '.join(failed) or 'none'})")
    reports = {r.name: read_report(r.folder / "report.json") for r in done}
    attacks = [a for a in reports[done[0].name]["attacks"] if all(a in rep["attacks"] for rep in reports.values())]
    names = metric_names(attacks)
    focus = ROBUST_ATTACK if ROBUST_ATTACK in attacks else next((a for a in attacks if a != "clean"), attacks[0])
    verdicts = {name: _verdicts(report, attacks) for name, report in reports.items()}
    loaded: dict[str, tuple] = {}

    def labels_of(run: GridRun):  # each data config's test images loaded once, whatever the groups
        key = f"{run.cfg.data}|{run.cfg.eval.subset}"
        if key not in loaded:
            loaded[key] = _test_labels(run)
        return loaded[key]

    dataset, labels = labels_of(done[0])
    pairs = [tuple(p) for p in grid.pairs]
    if grid.reference is not None:
        pairs = [(c, grid.reference) for c in grid.cells if c != grid.reference] + pairs
    groups_out, rows_csv, seconds = [], [], {}
    for index, group in enumerate(groups(grid)):
        in_group = [r for r in cells if r.group == index]
        complete, missing = {}, {}
        for cell in grid.cells:
            runs = [r for r in in_group if r.cell == cell]
            absent = [r.name for r in runs if r not in done]
            if absent:
                missing[cell] = absent
            else:
                complete[cell] = runs
        if complete:  # an axis may change the data (data.test_fraction, ...): each group's own test images
            dataset, labels = labels_of(next(iter(complete.values()))[0])
        results = {c: [verdicts[r.name] for r in runs] for c, runs in complete.items()}
        boot = bootstrap(results, labels, dataset.num_classes, names, grid.draws) if complete else {}
        # the class-wise accuracies under the focus attack, from the same resampling draws
        by_class = [f"class {k} {focus}" for k in range(dataset.num_classes)]
        classes = bootstrap(results, labels, dataset.num_classes, by_class, grid.draws) if complete else {}
        summary = {
            cell: {
                "seeds": [r.seed for r in complete[cell]],
                "metrics": {m: list(map(_number, interval(boot[cell], j))) for j, m in enumerate(names)},
                "classwise": [list(map(_number, interval(classes[cell], k))) for k in range(len(by_class))],
            }
            for cell in complete
        }
        # wall time is a measurement, not a result: in report.md only, so that report.json and
        # cells.csv come out bit for bit the same after an interruption
        seconds[index] = {cell: sum(_seconds(r) for r in runs) for cell, runs in complete.items()}
        diffs = [
            {
                "a": d.a,
                "b": d.b,
                "metric": d.metric,
                "estimate": _number(d.estimate),
                "interval": [_number(d.lo), _number(d.hi)],
                "significant": bool(d.significant),
            }
            for d in differences(boot, pairs, names)
        ]
        groups_out.append(
            {
                "axes": dict(group),
                "num_samples": len(labels),
                "cells": summary,
                "differences": diffs,
                "missing": missing,
            }
        )
        for run in [r for runs in complete.values() for r in runs]:
            values = run_metrics(verdicts[run.name], labels, dataset.num_classes, names)
            for metric, value in zip(names, values):
                rows_csv.append({**dict(group), "cell": run.cell, "seed": run.seed, "metric": metric, "value": value})
    shipped = str(grid_path).startswith(str(GRIDS))
    document = {
        "grid": f"{grid_path.stem} (shipped with robustdistill)" if shipped else str(grid_path),
        "command": command,
        "versions": versions(),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "run_threads": sorted({r.cfg.train.threads for r in done}, key=lambda t: (t is None, t or 0)),
        "data": {"name": dataset.name, "split": "test", "num_samples": len(labels), "classes": dataset.class_names},
        "attacks": attacks,
        "focus": focus,  # the attack of the class-wise intervals and the figures' robust accuracy
        "metrics": names,
        "intervals": HOW,
        "draws": grid.draws,
        "groups": groups_out,
        "failed": failed,
        "published": grid.published,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(document, indent=1) + "\n"))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(to_markdown(document, grid_path, seconds)))
    atomic_write(out / "cells.csv", lambda tmp: Path(tmp).write_text(_csv(rows_csv, list(grid.axes))))
    try:
        plot_comparison(document, out)
    except UserError as exc:  # matplotlib is the `plot` extra
        log.info("compare: no figures: %s", exc)
    return document


def _number(value: float) -> Optional[float]:
    """A float for JSON; NaN (an NSD with no accuracy to divide by) as null."""
    return None if math.isnan(value) else float(value)


def _csv(rows: list[dict[str, Any]], axes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*axes, "cell", "seed", "metric", "value"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _fmt(metric: str, value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if is_ratio(metric) else f"{value:.1f}"


def _threads_note(document: dict[str, Any]) -> str:
    """How many intra-op threads the runs trained with (their bits depend on it)."""
    used = document.get("run_threads", [])
    if len(used) == 1 and used[0] is not None:
        return f"; every run on {used[0]} intra-op thread{'s' if used[0] > 1 else ''} (train.threads)."
    return f" ({document['threads']} threads unless a run set train.threads)."


def to_markdown(document: dict[str, Any], grid_path: Path, seconds: dict[int, dict[str, float]]) -> str:
    """The report for people: per group, the cells with intervals, the paired differences, what is
    missing; the cells' training time (all seeds, from their metrics.jsonl)."""
    names = document["metrics"]
    lines = [
        f"# Comparison: {grid_path.name}",
        "",
        f"`{document['command'] or 'robustdistill compare ' + str(grid_path)}`; {document['data']['name']} test split, "
        f"{document['data']['num_samples']} images; "
        + setup_line(document["versions"], document["machine"])
        + _threads_note(document),
        "",
        "Each cell: mean over seeds [95 % interval]. " + document["intervals"],
    ]
    for index, group in enumerate(document["groups"]):
        title = ", ".join(f"{k} = {v}" for k, v in group["axes"].items()) or "all cells"
        header = ["cell", "seeds", *[m if is_ratio(m) else f"{m} %" for m in names], "training"]
        rows = [
            [
                cell,
                str(len(s["seeds"])),
                *[
                    f"{_fmt(m, s['metrics'][m][0])} [{_fmt(m, s['metrics'][m][1])}, {_fmt(m, s['metrics'][m][2])}]"
                    for m in names
                ],
                duration(seconds[index][cell]),
            ]
            for cell, s in group["cells"].items()
        ]
        lines += ["", f"## {title}", "", markdown_table(header, rows)]
        if group["differences"]:
            diff_rows = {}
            for d in group["differences"]:
                lo, hi = d["interval"]
                mark = "*" if d["significant"] else ""
                diff_rows.setdefault(f"{d['a']} - {d['b']}", []).append(
                    f"{_fmt(d['metric'], d['estimate'])} [{_fmt(d['metric'], lo)}, {_fmt(d['metric'], hi)}]{mark}"
                )
            lines += [
                "",
                "Paired differences (same seed, same images); `*`: the 95 % interval excludes 0.",
                "",
                markdown_table(["difference", *names], [[k, *v] for k, v in diff_rows.items()]),
            ]
        if group["missing"]:
            lines += [
                "",
                "Missing (not finished): " + "; ".join(f"{c}: {', '.join(r)}" for c, r in group["missing"].items()),
            ]
    if document["published"]:
        lines += [
            "",
            "## What the papers report",
            "",
            "As given in the grid file (with its source); not measured here.",
            "",
            markdown_table(["cell", "published"], [[c, t] for c, t in document["published"].items()]),
        ]
    if document["failed"]:
        lines += ["", "## Failed cells", ""] + [f"- {name}: {why}" for name, why in document["failed"].items()]
    return "\n".join(lines) + "\n"
