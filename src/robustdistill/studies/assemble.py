"""A grid's comparison report, assembled from its run folders alone: each finished cell's per-sample
verdicts (its report.json), bootstrapped over seeds and test images per group (`stats`), the paired
differences, written as `report.json`, `report.md`, `cells.csv` and the figures.

    document = write_comparison(grid, grid_path, out, cells, failed, command)

Only the run folders are read, so a grid finished by the local executor, by SLURM jobs, or by
both in turns gives the same report; wall times (a measurement, not a result) go to report.md only,
so report.json and cells.csv come out bit for bit the same after an interruption.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..core.errors import UserError
from ..data import load_dataset, subset_of
from ..evaluation.checks import CHECKS
from ..evaluation.corruptions import per_image_scores
from ..evaluation.metrics import strongest_attack, unpack_verdicts
from ..evaluation.report import (
    extra_cell,
    extra_description,
    machine,
    read_report,
    report_threat,
    versions,
    write_section,
)
from ..recipes import is_shipped
from ..storage.files import atomic_write
from ..storage.runs import read_metrics
from .figures import plot_comparison
from .grid import Grid, GridRun, groups, status
from .render import cells_csv, comparison_markdown
from .stats import HOW, bootstrap, differences, interval, metric_names, run_metrics

log = logging.getLogger("robustdistill")


def publish(grid, grid_path: Path, out: Path, cells: list[GridRun], failed: dict[str, str], command: str, into) -> None:
    """The report of the finished cells into `out`, and into the markdown file `into` if given."""
    write_comparison(grid, grid_path, out, cells, failed, command)
    if into is not None:  # headings two levels down
        body = "\n".join(
            "##" + line if line.startswith("#") else line for line in (out / "report.md").read_text().splitlines()
        )
        write_section(into, f"compare:{grid_path.stem}", body)


def write_comparison(
    grid: Grid, grid_path: Path, out: Path, cells: list[GridRun], failed: dict[str, str], command: str
) -> dict[str, Any]:
    """report.json, report.md, cells.csv and the figures of the finished cells, per group; returns
    report.json's document."""
    done = [r for r in cells if status(r) == "finished" and r.name not in failed]
    if not done:
        raise UserError(f"no cell of {grid_path} finished; nothing to compare (failed: {', '.join(failed) or 'none'})")
    results = _Results(done)
    groups_out, rows_csv, seconds = [], [], {}
    for index, group in enumerate(groups(grid)):
        summary, rows, seconds[index] = _group(grid, group, [r for r in cells if r.group == index], results)
        groups_out.append(summary)
        rows_csv += rows
    dataset = results.dataset
    document = {
        "grid": f"{grid_path.stem} (shipped with robustdistill)" if is_shipped(grid_path) else str(grid_path),
        "command": command,
        "versions": versions(),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "run_threads": sorted({r.cfg.train.threads for r in done}, key=lambda t: (t is None, t or 0)),
        "data": {"name": dataset.name, "split": "test", "num_samples": results.n, "classes": dataset.class_names},
        "attacks": results.attacks,
        "focus": results.focus,  # the attack of the class-wise intervals and the figures' robust accuracy
        "metrics": results.names + results.corruption_names,
        "intervals": HOW,
        "draws": grid.draws,
        "groups": groups_out,
        "failed": failed,
        "checks": results.checks,
        "threat_models": results.threats,
        "extra": results.extra,
        "corruptions": results.corruption_info,
        "published": grid.published,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(document, indent=1) + "\n"))
    markdown = comparison_markdown(document, grid_path, seconds)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(markdown))
    atomic_write(out / "cells.csv", lambda tmp: Path(tmp).write_text(cells_csv(rows_csv, list(grid.axes))))
    try:
        plot_comparison(document, out)
    except UserError as exc:  # matplotlib missing (a dependency, but an install may lack it)
        log.info("compare: no figures: %s", exc)
    return document


class _Results:
    """The finished runs' reports, read and unpacked once: the attacks every report has, the metric
    names, the focus attack, each run's verdicts; the test labels loaded once per data config.
    `dataset` / `labels`: those of the last group with finished cells (the report's `data`)."""

    def __init__(self, done: list[GridRun]):
        reports = {r.name: read_report(r.folder / "report.json") for r in done}
        first = reports[done[0].name]
        self.attacks = [a for a in first["attacks"] if all(a in rep["attacks"] for rep in reports.values())]
        self.verdicts = {name: _verdicts(report, self.attacks) for name, report in reports.items()}
        self.checks = failed_checks(reports)
        # the threat model each run was evaluated under: {"L-inf, eps 8/255": runs}
        self.threats: dict[str, list[str]] = {}
        for name, report in reports.items():
            self.threats.setdefault(report_threat(report).describe(), []).append(name)
        # extra training data (data.extra) as the runs' reports name it: {description: runs}
        self.extra: dict[str, list[str]] = {}
        self.extra_of: dict[str, str] = {}  # run: its extra data in a table cell's words
        for name, report in reports.items():
            if report["data"].get("extra"):
                self.extra.setdefault(extra_description(report["data"]["extra"]), []).append(name)
                self.extra_of[name] = extra_cell(report["data"]["extra"])
        # robustness is quoted under the strongest attack: the lowest accuracy over every run
        mean = {a: float(np.mean([v[a].mean() for v in self.verdicts.values()])) for a in self.attacks}
        self.focus = strongest_attack(mean) or self.attacks[0]
        self.names = metric_names(self.attacks, self.focus if self.focus != "clean" else None)
        # corruption accuracy (eval.corruptions): columns of their own when every run has it per image
        self.corruptions, self.corruption_info = _corruptions(reports)
        self.corruption_names = ["corruptions", "worst corruptions"] if self.corruptions else []
        self.done = {r.name for r in done}
        self._loaded: dict[str, tuple] = {}
        self.dataset, self.labels = self.labels_of(done[0])

    @property
    def n(self) -> int:
        return len(self.labels)

    def labels_of(self, run: GridRun):
        """The dataset and the labels of the test images a run was evaluated on."""
        key = f"{run.cfg.data}|{run.cfg.eval.subset}"
        if key not in self._loaded:
            dataset = load_dataset(run.cfg.data, extra=False)
            labels = subset_of(dataset.test, run.cfg.eval.subset, "the test split", "eval.subset").y.numpy()
            self._loaded[key] = dataset, labels
        return self._loaded[key]


def _group(grid: Grid, group, in_group: list[GridRun], results: _Results):
    """One group's report entry, its cells.csv rows and its cells' training seconds."""
    complete, missing = {}, {}
    for cell in grid.cells:
        runs = [r for r in in_group if r.cell == cell]
        absent = [r.name for r in runs if r.name not in results.done]
        if absent:
            missing[cell] = absent
        else:
            complete[cell] = runs
    if complete:  # an axis may change the data (data.test_fraction, ...): each group's own test images
        results.dataset, results.labels = results.labels_of(next(iter(complete.values()))[0])
    dataset, labels = results.dataset, results.labels
    names, focus = results.names, results.focus
    verdicts = {c: [results.verdicts[r.name] for r in runs] for c, runs in complete.items()}
    boot = bootstrap(verdicts, labels, dataset.num_classes, names, grid.draws) if complete else {}
    if complete and results.corruptions:  # their own images: bootstrapped apart, over the same seeds
        labels_c, scores = results.corruptions
        per_run = {c: [{"corruptions": scores[r.name]} for r in runs] for c, runs in complete.items()}
        more = bootstrap(per_run, labels_c, dataset.num_classes, results.corruption_names, grid.draws, seed=1)
        boot = {c: np.hstack([boot[c], more[c]]) for c in boot}
        names = names + results.corruption_names
    # the class-wise accuracies under the focus attack, from the same resampling draws
    by_class = [f"class {k} {focus}" for k in range(dataset.num_classes)]
    classes = bootstrap(verdicts, labels, dataset.num_classes, by_class, grid.draws) if complete else {}
    summary = {
        cell: {
            "seeds": [r.seed for r in complete[cell]],
            "metrics": {m: list(map(_number, interval(boot[cell], j))) for j, m in enumerate(names)},
            "classwise": [list(map(_number, interval(classes[cell], k))) for k in range(len(by_class))],
            **_extra_entry([results.extra_of.get(r.name) for r in complete[cell]]),
        }
        for cell in complete
    }
    entry = {
        "axes": dict(group),
        "num_samples": len(labels),
        "cells": summary,
        "differences": [_difference(d) for d in differences(boot, _pairs(grid), names)],
        "missing": missing,
        "notes": _weaker_focus(summary, results),
    }
    rows = [
        {**dict(group), "cell": run.cell, "seed": run.seed, "metric": metric, "value": value}
        for run in [r for runs in complete.values() for r in runs]
        for metric, value in _run_values(results, run.name, labels, dataset.num_classes)
    ]
    seconds = {cell: sum(_seconds(r) for r in runs) for cell, runs in complete.items()}
    return entry, rows, seconds


def _extra_entry(described: list[Optional[str]]) -> dict[str, str]:
    """A cell's `extra` (its runs' extra training data, when they had some): one text, or "differs"."""
    if not any(described):
        return {}
    return {"extra": described[0] if len(set(described)) == 1 else "differs between seeds"}


def _run_values(results: _Results, name: str, labels: np.ndarray, num_classes: int) -> list[tuple[str, float]]:
    """One run's metrics, its corruption accuracy among them, for cells.csv."""
    values = list(zip(results.names, run_metrics(results.verdicts[name], labels, num_classes, results.names)))
    if results.corruptions:
        labels_c, scores = results.corruptions
        more = run_metrics({"corruptions": scores[name]}, labels_c, num_classes, results.corruption_names)
        values += list(zip(results.corruption_names, more))
    return values


def _corruptions(reports: dict[str, dict[str, Any]]) -> tuple[Optional[tuple], Optional[dict[str, Any]]]:
    """((labels, {run: per-image score}), what the report says of them) when every run was evaluated
    on the same corrupted images with their per-image record; else (None, why not, or None when no
    run was evaluated on corruptions)."""
    entries = {name: report.get("corruptions") for name, report in reports.items()}
    if not any(entries.values()):
        return None, None
    lacking = sorted(name for name, entry in entries.items() if not entry or "per_image" not in entry)
    if lacking:
        why = f"not compared: {', '.join(lacking)} have no per-image corruption record (evaluate with --corruptions)"
        return None, {"note": why}
    scored = {name: per_image_scores(entry) for name, entry in entries.items()}
    labels = next(iter(scored.values()))[1]
    if any(len(y) != len(labels) or not np.array_equal(y, labels) for _, y in scored.values()):
        return None, {"note": "not compared: the runs were evaluated on different corrupted images"}
    first = next(iter(entries.values()))
    info = {
        "folders": sorted({entry["folder"] for entry in entries.values()}),
        "images": int(first["images"]),
        "variants": int(first["per_image"]["variants"]),
        "how": "each image scores the share of its corrupted versions (every corruption and severity) classified "
        "right; the intervals resample the seeds and these images within each class, apart from the attacks' draws",
    }
    return (labels, {name: scores for name, (scores, _) in scored.items()}), info


def _weaker_focus(summary: dict[str, Any], results: _Results) -> list[str]:
    """Where another attack beats the focus attack (the strongest over all runs) on a cell by more than
    the focus's interval: said, since the table's robust columns would overstate that cell."""
    focus, notes = results.focus, []
    for cell, entry in summary.items():
        lo = entry["metrics"].get(focus, [None, None])[1]
        for attack in (a for a in results.attacks if a not in ("clean", focus)):
            estimate = entry["metrics"][attack][0]
            if lo is not None and estimate is not None and estimate < lo:
                notes.append(
                    f"{cell}: {attack} ({estimate:.1f} %) is below the interval of {focus} (from {lo:.1f} %); "
                    f"quote {attack} for this cell"
                )
    return notes


def _pairs(grid: Grid) -> list[tuple[str, str]]:
    """The compared pairs: every cell against the reference (if any), then the grid's pairs."""
    pairs = [tuple(p) for p in grid.pairs]
    if grid.reference is not None:
        pairs = [(c, grid.reference) for c in grid.cells if c != grid.reference] + pairs
    return pairs


def _difference(d) -> dict[str, Any]:
    return {
        "a": d.a,
        "b": d.b,
        "metric": d.metric,
        "estimate": _number(d.estimate),
        "interval": [_number(d.lo), _number(d.hi)],
        "significant": bool(d.significant),
    }


def failed_checks(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sanity checks that failed in the runs' own reports: per check ("<id> <name>"), what it
    asserts and the runs it failed in; with the number of runs read and of those that ran checks."""
    failed: dict[str, dict[str, Any]] = {}
    checked = 0
    for name, report in reports.items():
        ran = [c for c in report.get("checks", []) if c.get("status") in ("passed", "failed")]
        checked += bool(ran)
        for check in (c for c in ran if c["status"] == "failed"):
            what = CHECKS.get(check["name"]).asserts if check["name"] in CHECKS.names() else check["name"]
            failed.setdefault(f"{check['id']} {check['name']}", {"asserts": what, "runs": []})["runs"].append(name)
    ordered = dict(sorted(failed.items(), key=lambda kv: int(kv[0].split()[0])))
    return {"runs": len(reports), "checked": checked, "failed": ordered}


def _verdicts(report: dict[str, Any], attacks: list[str]) -> dict[str, np.ndarray]:
    n = report["data"]["num_samples"]
    return {a: unpack_verdicts(report["attacks"][a]["verdicts"], n) for a in attacks}


def _seconds(run: GridRun) -> float:
    return sum(r.get("seconds", 0.0) for r in read_metrics(run.folder) if r["type"] == "epoch")


def _number(value: float) -> Optional[float]:
    """A float for JSON; NaN (an NSD with no accuracy to divide by) as null."""
    return None if math.isnan(value) else float(value)
