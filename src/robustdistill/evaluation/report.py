"""Reports: `report.json` (machine-readable) and `report.md` / terminal tables (for people).

report.json schema (version 1):
    schema_version: 1
    created: ISO-8601 UTC time
    versions: {robustdistill, torch, numpy, python, pyautoattack}
    machine: {cpu, cpu_capability, gpu (when there is one)}: the hardware the float rounding came from
    threads: intra-op CPU threads of the evaluating process (on CPU the attacks' float rounding, so a
             verdict at the edge, can depend on it)
    model: ModelSpec of the evaluated model;  checkpoint: path
    data: {name, split, num_samples, class_names, train_class_counts, extra (when the model was trained
           with data.extra: {source, root, fraction, epoch (what train.epochs counts), images and
           labels (the count, and whether they have labels, when they were read)}), read (how the reader
           read the data, when it says: arrays gives {layout: NHWC | NCHW | NHW, layout_from: inferred |
           data.layout, in_file: the splits read from their files a batch at a time})}
    corruptions (with eval.corruptions): {folder, images, accuracy: {corruption: [severity 1..5]}, mean,
           class_accuracy, per_image (when every severity holds the same images): {hits: each image's
           count of corrupted versions classified right, variants: how many it has, labels}, both
           packed as 2-byte little-endian hex}
    seed: int
    settings: {common: {eps, norm (Linf | L2; absent in reports older than L2: Linf), step_size,
               restarts, square_queries, batch_size, seed, checks, checks_subset, large_eps (null
               under L2: the image diagonal), fold_batchnorm}, <attack>: {its own settings, label}}
              (an attack's name says its steps: pgd20, cw30; label adds the restarts: pgd20x5;
               reports written before the steps were in the names have common.pgd_steps/cw_steps
               and the key cw)
    attacks: {<attack>: {accuracy, accuracy_interval [lo, hi], class_accuracy[C], class_interval[C] [lo, hi],
                         worst_class_accuracy, best_class_accuracy, nsd, verdicts}}
             intervals: 95 % Wilson score intervals over the test images (null for an absent class);
             verdicts: per-sample correctness, hex of numpy.packbits in sample order
             (`metrics.unpack_verdicts(text, num_samples)` reads it back)
    robust_to_all: {attacks: [...], accuracy, class_accuracy, ...}   (two or more attacks run)
    w_robust: {value, definition, attack}          (clean + robust) / 2 under the strongest attack that ran
    autoattack_flags: {<an attack of the AutoAttack family>: [warnings pyautoattack's own checks logged]}   (when run)
    autoattack_parts: {<an attack of the AutoAttack family>: {clean, apgd-ce, apgd-t, ...: accuracy after that part}}
             (the family: autoattack, autoattack_fast, autoattack_rand, and the parts alone apgd_ce, apgd_t, fab_t)
    checks: [{id, name, status: passed|failed|skipped, numbers: {...}, message}]   (sanity checks 1-9)
    notes: [what a reader must not miss: PGD above AutoAttack by more than 3 points]
    selection: {metric, split, best_epoch, best_score}   (reports written by training only)
Accuracies are fractions in [0, 1]; class_accuracy[c] is null for a class absent from the split;
nsd is null when the mean class accuracy is 0.
"""

from __future__ import annotations

import datetime
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

import numpy
import torch

from ..core import __version__
from ..core.errors import UserError
from ..core.threat import ThreatModel
from ..storage.files import atomic_write
from .corruptions import check_corruptions, corruption_table
from .metrics import strongest_attack, unpack_verdicts

SCHEMA_VERSION = 1


def build_report(summary: dict[str, Any], spec, checkpoint, dataset, split: str, n: int, seed: int) -> dict[str, Any]:
    """The report.json document (schema above) from an `evaluate` summary."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": now(),
        "versions": versions(),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "model": spec.to_dict(),
        "checkpoint": str(checkpoint),
        "data": {
            "name": dataset.name,
            "split": split,
            "num_samples": n,
            "class_names": dataset.class_names,
            "train_class_counts": torch.bincount(dataset.train.y.cpu(), minlength=dataset.num_classes).tolist(),
            **({"extra": dataset.extra_info} if dataset.extra_info else {}),
            **({"read": dataset.info} if dataset.info else {}),
        },
        "seed": seed,
        **summary,
        "notes": attack_notes(summary.get("attacks", {})),
    }


CHECKS_OFF = "not run (eval.checks=false, --no-checks): nothing here was checked for gradient masking"
GAP_POINTS = 3.0  # PGD above AutoAttack by more than this many points: said in the report


def attack_notes(attacks: dict[str, Any]) -> list[str]:
    """What a reader must not miss in the numbers: a PGD attack that AutoAttack beats by more than
    `GAP_POINTS` points overestimates robustness (AutoAttack is the number to quote)."""
    notes = []
    for strong in ("autoattack", "autoattack_fast"):
        if strong not in attacks:
            continue
        for name, result in attacks.items():
            if name.startswith("pgd") and name[3:].isdigit():
                gap = 100 * (result["accuracy"] - attacks[strong]["accuracy"])
                if gap > GAP_POINTS:
                    notes.append(
                        f"{name} overestimates robustness by {gap:.1f} points against {strong} "
                        f"({100 * result['accuracy']:.2f} % vs {100 * attacks[strong]['accuracy']:.2f} %): "
                        f"quote {strong}"
                    )
        break
    return notes


def check_lines(report: dict[str, Any]) -> list[str]:
    """The sanity checks in a few lines: the counts, then each skipped one with its reason, and the
    report's notes (a printed evaluation and report.md say the same)."""
    checks = report.get("checks", [])
    lines = []
    if checks:
        counts = {k: sum(c["status"] == k for c in checks) for k in ("passed", "failed", "skipped")}
        lines.append("sanity checks: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
        lines += [f"  skipped {c['id']} {c['name']}: {c['message']}" for c in checks if c["status"] == "skipped"]
    elif not report.get("settings", {}).get("common", {}).get("checks", True):
        lines.append(f"sanity checks: {CHECKS_OFF}")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return lines


def versions() -> dict[str, str]:
    try:
        autoattack = version("pyautoattack")
    except PackageNotFoundError:
        autoattack = None
    return {
        "robustdistill": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "pyautoattack": autoattack,
    }


def setup_line(versions: dict[str, Optional[str]], machine: dict[str, str]) -> str:
    """Software versions and machine in one line, as reports and the README's tables quote them."""
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v) + "; " + ", ".join(f"{v}" for v in machine.values())


def machine() -> dict[str, str]:
    """What a result's float rounding depends on beyond the code: the CPU (its model and the vector
    instructions torch's kernels dispatch to; the same config gave other bits on an AMD EPYC than on
    an Intel Xeon) and the GPU where one is used."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    out = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _nsd(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def attack_table(report: dict[str, Any]) -> str:
    """One row per attack (and the per-sample worst case): accuracy, worst and best class, NSD."""
    settings = report.get("settings", {})
    rows = {settings.get(name, {}).get("label", name): m for name, m in report["attacks"].items()}
    if "robust_to_all" in report:
        rows["robust to all"] = report["robust_to_all"]
    rows = [
        [name, _pct(m["accuracy"]), _pct(m["worst_class_accuracy"]), _pct(m["best_class_accuracy"]), _nsd(m["nsd"])]
        for name, m in rows.items()
    ]
    return markdown_table(["attack", "acc %", "worst class %", "best class %", "NSD"], rows)


def checks_table(report: dict[str, Any]) -> str:
    def numbers(c):
        return ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in c["numbers"].items()
            if not isinstance(v, (dict, str))
        )

    rows = [
        [str(c["id"]), c["name"], c["status"].upper() if c["status"] == "failed" else c["status"], numbers(c)]
        for c in report.get("checks", [])
    ]
    return markdown_table(["#", "check", "status", "numbers"], rows)


def class_table(report: dict[str, Any]) -> str:
    names = report.get("data", {}).get("class_names") or []
    attacks = list(report["attacks"])
    count = len(next(iter(report["attacks"].values()))["class_accuracy"]) if attacks else 0
    names = names if len(names) == count else [str(i) for i in range(count)]
    trained = report.get("data", {}).get("train_class_counts") or []
    trained = [str(n) for n in trained] if len(trained) == count else []
    rows = [
        [names[c], *trained[c : c + 1]] + [_pct(report["attacks"][a]["class_accuracy"][c]) for a in attacks]
        for c in range(count)
    ]
    return markdown_table(["class", *(["training images"] if trained else [])] + [f"{a} %" for a in attacks], rows)


def _with_interval(value: Optional[float], interval: Optional[list[float]]) -> str:
    if value is None or not interval:
        return _pct(value)
    return f"{_pct(value)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _worst_class_interval(metrics: dict[str, Any]) -> Optional[list[float]]:
    """The Wilson interval of the class with the lowest accuracy (None in reports without intervals)."""
    accs, intervals = metrics.get("class_accuracy", []), metrics.get("class_interval")
    present = [(a, i) for a, i in zip(accs, intervals or []) if a is not None]
    return min(present, key=lambda p: p[0])[1] if present else None


def quoted_attack(named_reports: list[tuple[str, dict[str, Any]]]) -> Optional[str]:
    """The attack the reports' robustness is quoted under: the strongest they all ran (the lowest mean
    accuracy; `metrics.strongest_attack`), None when they share none besides clean."""
    shared = [a for a in named_reports[0][1]["attacks"] if all(a in rep["attacks"] for _, rep in named_reports)]
    mean = {a: sum(rep["attacks"][a]["accuracy"] for _, rep in named_reports) / len(named_reports) for a in shared}
    return strongest_attack(mean)


def comparison_table(named_reports: list[tuple[str, dict[str, Any]]], robust: Optional[str] = None) -> str:
    """One row per run: clean accuracy and every attack the reports share, each with its 95 % Wilson
    interval over the test images (where the report has one); under `robust` (default: the strongest
    shared attack, `metrics.strongest_attack` of the mean accuracies) the worst class with its
    interval, NSD and W-Robust Acc. Below the table, a note for each run on which another attack
    beats `robust` beyond its interval (the row's robust columns overstate that run)."""
    shared = [a for a in named_reports[0][1]["attacks"] if all(a in rep["attacks"] for _, rep in named_reports)]
    robust = robust or quoted_attack(named_reports)
    if robust is None:
        raise UserError("the reports share no attack besides clean accuracy: nothing to quote robustness under")
    others = [a for a in shared if a not in ("clean", robust)]
    rows, notes = [], []
    for name, rep in named_reports:
        attacks = rep["attacks"]
        clean, adv = attacks.get("clean", {}), attacks.get(robust, {})
        w = (clean["accuracy"] + adv["accuracy"]) / 2 if "accuracy" in clean and "accuracy" in adv else None
        row = [name, _with_interval(clean.get("accuracy"), clean.get("accuracy_interval"))]
        row += [_with_interval(attacks[a].get("accuracy"), attacks[a].get("accuracy_interval")) for a in others]
        row += [_with_interval(adv.get("accuracy"), adv.get("accuracy_interval"))]
        row += [_with_interval(adv.get("worst_class_accuracy"), _worst_class_interval(adv)), _nsd(adv.get("nsd"))]
        rows.append(row + [_pct(w)])
        low = (adv.get("accuracy_interval") or [adv.get("accuracy")])[0]
        notes += [
            f"note: {name}: {a} ({_pct(attacks[a]['accuracy'])} %) is below the interval of {robust}; quote {a} for it"
            for a in others
            if low is not None and attacks[a]["accuracy"] < low
        ]
    header = ["run", "clean % [95% CI]", *[f"{a} % [95% CI]" for a in others], f"{robust} % [95% CI]"]
    header += [f"worst-class {robust} % [95% CI]", f"NSD ({robust})", f"W-Robust ({robust}) %"]
    return "\n".join([markdown_table(header, rows), *notes])


def extra_description(extra: dict[str, Any]) -> str:
    """`data.extra` as a report names it: "1797 extra images (arrays, /data/x.npz), 50 % of every batch"."""
    share = f"{100 * extra['fraction']:.0f} %"
    return f"{_extra_count(extra)}extra images ({extra['source']}, {extra['root']}), {share} of every batch"


def extra_cell(extra: dict[str, Any]) -> str:
    """`data.extra` in a comparison table's cell: "1797 at 50 %" (images, when read; share of a batch)."""
    return f"{_extra_count(extra)}at {100 * extra['fraction']:.0f} %"


def _extra_count(extra: dict[str, Any]) -> str:
    """ "1797 ", "1797 unlabeled " (when they were read and counted), or ""."""
    images = f"{extra['images']} " if "images" in extra else ""
    return images + ("unlabeled " if extra.get("labels") is False else "")


def _extra_line(extra: Optional[dict[str, Any]]) -> list[str]:
    return [f"- trained with {extra_description(extra)}"] if extra else []


def report_threat(report: dict[str, Any]) -> ThreatModel:
    """The threat model a report was evaluated under (reports written before L2 existed are L-inf)."""
    return ThreatModel.from_mapping(report["settings"]["common"])


def to_markdown(report: dict[str, Any], title: str = "Evaluation") -> str:
    data = report.get("data", {})
    parts = [
        f"# {title}",
        "",
        f"- model: `{report.get('model', {}).get('name', '?')}` from `{report.get('checkpoint', '?')}`",
        f"- data: {data.get('name', '?')} / {data.get('split', '?')} ({data.get('num_samples', '?')} images), "
        f"seed {report.get('seed')}",
        f"- threat model: {report_threat(report).describe()}, created {report.get('created')}",
        *_extra_line(data.get("extra")),
        "",
        attack_table(report),
        "",
    ]
    if "w_robust" in report:
        w = report["w_robust"]
        parts += [f"W-Robust Acc: {_pct(w['value'])} % (definition: {w['definition']})", ""]
    if report.get("robust_to_all"):
        parts += [
            "robust to all: a sample counts only if it survives every attack "
            f"({', '.join(report['robust_to_all']['attacks'])}).",
            "",
        ]
    if report.get("corruptions"):
        parts += [*corruption_table(report["corruptions"], report.get("data", {}).get("class_names")), ""]
    if report.get("notes"):
        parts += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    if not report.get("checks") and not report.get("settings", {}).get("common", {}).get("checks", True):
        parts += ["## Sanity checks", "", f"{CHECKS_OFF[0].upper()}{CHECKS_OFF[1:]}.", ""]
    if report.get("checks"):
        parts += ["## Sanity checks", "", checks_table(report), ""]
        parts += [
            f"- **FAILED {c['id']} {c['name']}**: {c['message']}" for c in report["checks"] if c["status"] == "failed"
        ]
        parts += [
            f"- skipped {c['id']} {c['name']}: {c['message']}" for c in report["checks"] if c["status"] == "skipped"
        ]
        parts += [""]
    parts += ["## Class-wise accuracy", "", class_table(report), ""]
    return "\n".join(parts)


def write_report(folder: str | Path, report: dict[str, Any], title: str = "Evaluation") -> None:
    folder = Path(folder)
    atomic_write(folder / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    atomic_write(folder / "report.md", lambda tmp: Path(tmp).write_text(to_markdown(report, title)))


def read_report(path: str | Path) -> dict[str, Any]:
    """A report.json, or one error line when it is not one (truncated, edited, another file)."""
    try:
        report = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable report ({exc}); evaluate the run again to rewrite it") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(report, dict) or not isinstance(report.get("attacks"), dict):
        raise UserError(f"{path} is not a report of this tool (no attacks); evaluate the run again to rewrite it")
    _check_against_verdicts(report, path)
    if isinstance(report.get("corruptions"), dict):
        try:
            check_corruptions(report["corruptions"])
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(
                f"{path} was edited or damaged: {exc} (corruptions); evaluate the run again to rewrite it"
            ) from None
    return report


def _check_against_verdicts(report: dict[str, Any], path: str | Path) -> None:
    """Each accuracy must be what the report's own per-sample verdicts give: a number edited by hand
    (or a damaged file) is refused, never shown."""
    n = report.get("data", {}).get("num_samples")
    entries = {**report["attacks"], **({"robust to all": report["robust_to_all"]} if "robust_to_all" in report else {})}
    for name, entry in entries.items():
        if not isinstance(n, int) or not isinstance(entry, dict) or "verdicts" not in entry:
            continue  # reports written before the verdicts were kept
        try:
            measured = float(unpack_verdicts(entry["verdicts"], n).mean()) if n else 0.0
            claimed = float(entry["accuracy"])
        except (ValueError, TypeError, KeyError):
            raise UserError(f"{path} has a damaged {name} entry; evaluate the run again to rewrite it") from None
        if abs(measured - claimed) > 1e-9:
            raise UserError(
                f"{path} was edited: its {name} accuracy {100 * claimed:.2f} % is not what its own per-sample "
                f"verdicts give ({100 * measured:.2f} %); evaluate the run again to rewrite it"
            )


def write_section(path: str | Path, name: str, body: Optional[str] = None) -> None:
    """Replace what lies between the lines `<!-- NAME:begin -->` and `<!-- NAME:end -->` of the
    markdown file `path` with `body` (atomically; the rest of the file as it was). Without `body`,
    only check the markers are there: call it before the work whose result goes there."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = Path(path).read_text() if Path(path).is_file() else ""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise UserError(f"--into {path}: it needs one line {begin} and, after it, one line {end}")
    if body is None:
        return
    head, rest = text.split(begin)
    atomic_write(path, lambda tmp: Path(tmp).write_text(f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"))
