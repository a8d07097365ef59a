"""A comparison report for people (`report.md`) and for spreadsheets (`cells.csv`), rendered from
report.json's document (`assemble`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

from ..core.timing import duration
from ..evaluation.report import markdown_table, setup_line
from .stats import is_ratio


def cells_csv(rows: list[dict[str, Any]], axes: list[str]) -> str:
    """One row per run and metric: the axes' values, cell, seed, metric, value."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*axes, "cell", "seed", "metric", "value"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def comparison_markdown(document: dict[str, Any], grid_path: Path, seconds: dict[int, dict[str, float]]) -> str:
    """The report for people: per group, the cells with intervals, the paired differences, what is
    missing; the cells' training time (all seeds, from their metrics.jsonl)."""
    lines = [
        f"# Comparison: {grid_path.name}",
        "",
        f"`{document['command'] or 'robustdistill compare ' + str(grid_path)}`; {document['data']['name']} test split, "
        f"{document['data']['num_samples']} images; "
        + setup_line(document["versions"], document["machine"])
        + _threads_note(document),
        "",
        "Each cell: mean over seeds [95 % interval]. " + document["intervals"],
        *_threat_lines(document.get("threat_models")),
        *_few_seeds(document),
        *[f"Trained with {what}: {', '.join(sorted(runs))}." for what, runs in document.get("extra", {}).items()],
        *_corruption_lines(document.get("corruptions")),
    ]
    for index, group in enumerate(document["groups"]):
        lines += _group_lines(group, document["metrics"], seconds[index])
    if document.get("checks"):
        lines += ["", "## Sanity checks", "", *checks_summary(document["checks"])]
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


def _threat_lines(threats: Optional[dict[str, list[str]]]) -> list[str]:
    """The threat model the runs were evaluated under; where they differ, which run had which, and
    that their robust accuracies do not compare."""
    if not threats:
        return []
    if len(threats) == 1:
        return ["", f"Threat model: {next(iter(threats))} (every run)."]
    return [
        "",
        "**The runs were evaluated under different threat models; their robust accuracies do not compare "
        "across them** (set eval.norm and eval.eps in the grid's base to evaluate every run under one):",
        *[f"- {threat}: {', '.join(sorted(runs))}" for threat, runs in threats.items()],
    ]


def _corruption_lines(info: Optional[dict[str, Any]]) -> list[str]:
    """What the corruption columns are (or why there are none although runs were evaluated on them)."""
    if not info:
        return []
    if "note" in info:
        return ["", f"Corruption accuracy {info['note']}."]
    return [
        "",
        f"Corruptions: accuracy on {info['images']} images x {info['variants']} corrupted versions "
        f"({', '.join(info['folders'])}), no attack; {info['how']}.",
    ]


def _group_lines(group: dict[str, Any], names: list[str], seconds: dict[str, float]) -> list[str]:
    """One group: its cells' table, its paired differences, the cells it misses."""
    title = ", ".join(f"{k} = {v}" for k, v in group["axes"].items()) or "all cells"
    header = ["cell", "seeds", *[m if is_ratio(m) else f"{m} %" for m in names], "training"]
    rows = [
        [cell, str(len(s["seeds"])), *[_with_interval(m, *s["metrics"][m]) for m in names], duration(seconds[cell])]
        for cell, s in group["cells"].items()
    ]
    if any("extra" in s for s in group["cells"].values()):  # the extra images, beside the cell's name
        header.insert(2, "extra images")
        for row, s in zip(rows, group["cells"].values()):
            row.insert(2, s.get("extra", "none"))
    lines = ["", f"## {title}", "", markdown_table(header, rows)]
    if group["differences"]:
        diff_rows: dict[str, list[str]] = {}
        for d in group["differences"]:
            mark = "*" if d["significant"] else ""
            diff_rows.setdefault(f"{d['a']} - {d['b']}", []).append(
                _with_interval(d["metric"], d["estimate"], *d["interval"]) + mark
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
    lines += [f"\nNote: {note}" for note in group.get("notes", [])]
    return lines


def checks_summary(checks: dict[str, Any]) -> list[str]:
    """The sanity checks of the runs' own evaluations (`failed_checks`): how many runs passed them
    all, and each check that failed somewhere with its runs (a failure: that run's numbers may
    overestimate its robustness; its report.md says why)."""
    failed, runs, checked = checks["failed"], checks["runs"], checks["checked"]
    if not checked:
        return [f"None of the {runs} runs ran the sanity checks (eval.checks: false)."]
    bad = {r for entry in failed.values() for r in entry["runs"]}
    line = f"{checked - len(bad)} of {runs} runs passed every sanity check"
    line += f" ({runs - checked} ran none: eval.checks false)." if checked < runs else "."
    if not failed:
        return [line]
    line += " A failed check says that a run's numbers may overestimate its robustness; its report.md says by how much."
    return [line, "", *[f"- check {c} ({e['asserts']}): {', '.join(sorted(e['runs']))}" for c, e in failed.items()]]


def _few_seeds(document: dict[str, Any]) -> list[str]:
    """A warning when the intervals rest on fewer than three seeds: the spread between training
    seeds is then barely estimated (one seed: not at all, the intervals cover the test images only)."""
    counts = [len(cell["seeds"]) for group in document["groups"] for cell in group["cells"].values()]
    fewest = min(counts, default=3)
    if fewest >= 3:
        return []
    if fewest == 1:
        why = "one seed: they cover the test images only, not the variation between trainings"
    else:
        why = f"{fewest} seeds: the variation between trainings is barely estimated"
    return ["", f"**These intervals rest on {why}; run 3 or more seeds (`seeds:`) before drawing conclusions.**"]


def _with_interval(metric: str, value: Optional[float], lo: Optional[float], hi: Optional[float]) -> str:
    return f"{_fmt(metric, value)} [{_fmt(metric, lo)}, {_fmt(metric, hi)}]"


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
