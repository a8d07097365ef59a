"""Plots of a run (matplotlib, PNG): adaptive-state trajectories and class-wise accuracy.

- `temperatures.png` (ABSLD): every class's tau_adv and tau_nat over epochs;
- `balance.png` (MTARD/B-MTARD): the two temperatures and the two loss weights over steps;
- `class_state.png`: any class-wise quantity a method logs per epoch (`class_*`, e.g. Fair-ARD's weights);
- `classwise.png`: class-wise accuracy under each attack of the run's report.
Plots are derived from metrics.jsonl and report.json, so redrawing them loses nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .errors import UserError
from .report import read_report
from .runs import read_metrics


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'robustdistill[plot]'") from None
    return plt


def plot_temperatures(records: list[dict[str, Any]], path: Path) -> bool:
    epochs = [r for r in records if r.get("type") == "epoch" and isinstance(r.get("temperature_adv"), list)]
    if not epochs:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    x = [r["epoch"] for r in epochs]
    for ax, key, title in zip(axes, ("temperature_adv", "temperature_nat"), ("adversarial target", "natural target")):
        for c in range(len(epochs[0][key])):
            ax.plot(x, [r[key][c] for r in epochs], label=f"class {c}")
        ax.set(title=f"tau ({title})", xlabel="epoch")
    axes[0].set_ylabel("temperature")
    axes[1].legend(fontsize=7, ncol=2 if len(epochs[0]["temperature_adv"]) > 10 else 1, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_class_state(records: list[dict[str, Any]], path: Path) -> bool:
    """Every class-wise quantity a method logs per epoch (`class_*` lists: Fair-ARD's weights and
    robustness degrees, ...), one panel each, one line per class."""
    epochs = [r for r in records if r.get("type") == "epoch"]
    keys = sorted({k for r in epochs for k, v in r.items() if k.startswith("class_") and isinstance(v, list)})
    if not keys:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rows = [r for r in epochs if isinstance(r.get(key), list)]
        for c in range(len(rows[0][key])):
            ax.plot([r["epoch"] for r in rows], [r[key][c] for r in rows], label=f"class {c}")
        ax.set(title=key.replace("_", " "), xlabel="epoch")
    axes[0][-1].legend(fontsize=7, ncol=2 if len(rows[0][key]) > 10 else 1, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_balance(records: list[dict[str, Any]], path: Path) -> bool:
    steps = [r for r in records if r.get("type") == "step" and isinstance(r.get("weight_adv"), (int, float))]
    if not steps:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["step"] for r in steps]
    for kind, label in (("adv", "tau_adv (robust teacher)"), ("nat", "tau_nat (clean teacher)")):
        # EBB's scalar: temperature_* for (B-)MTARD, scale_* for `composed` (whose temperature_* are class-wise)
        key = next((k for k in (f"temperature_{kind}", f"scale_{kind}") if isinstance(steps[0].get(k), float)), None)
        if key is not None:
            axes[0].plot(x, [r[key] for r in steps], label=label)
    for key, label in (("weight_adv", "w_adv"), ("weight_nat", "w_nat")):
        axes[1].plot(x, [r[key] for r in steps], label=label)
    axes[0].set(title="teacher temperatures (EBB)", xlabel="step")
    axes[1].set(title="loss weights (NLB)", xlabel="step")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_classwise(report: dict[str, Any], path: Path) -> bool:
    attacks = report.get("attacks", {})
    if not attacks:
        return False
    plt = _pyplot()
    count = len(next(iter(attacks.values()))["class_accuracy"])
    names = report.get("data", {}).get("class_names") or [str(c) for c in range(count)]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * count * len(attacks)), 4))
    width = 0.8 / len(attacks)
    for i, (name, m) in enumerate(attacks.items()):
        values = [100 * (a or 0.0) for a in m["class_accuracy"]]
        ax.bar([c + i * width for c in range(count)], values, width, label=f"{name} (avg {100 * m['accuracy']:.1f})")
    ax.set_xticks([c + 0.4 - width / 2 for c in range(count)], names[:count], rotation=45 if count > 12 else 0)
    ax.set(ylabel="accuracy %", title="class-wise accuracy", ylim=(0, 100))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_scatter(named_reports: list[tuple[str, dict[str, Any]]], path: Path, robust: str = "pgd20") -> bool:
    """Robustness-fairness scatter: average vs worst-class robust accuracy, one point per run."""
    points = [(n, r["attacks"][robust]) for n, r in named_reports if robust in r.get("attacks", {})]
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, m in points:
        ax.scatter(100 * m["accuracy"], 100 * (m["worst_class_accuracy"] or 0.0))
        ax.annotate(
            name,
            (100 * m["accuracy"], 100 * (m["worst_class_accuracy"] or 0.0)),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set(
        xlabel=f"average {robust} accuracy %",
        ylabel=f"worst-class {robust} accuracy %",
        title="robustness vs fairness (up and right is better)",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw every plot the run's records allow; returns the PNG paths written."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    records = read_metrics(run_dir)  # both read (and refused if damaged) before anything is written
    report = read_report(run_dir / "report.json") if (run_dir / "report.json").is_file() else None
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plot_temperatures(records, out / "temperatures.png"):
        written.append(out / "temperatures.png")
    if plot_balance(records, out / "balance.png"):
        written.append(out / "balance.png")
    if plot_class_state(records, out / "class_state.png"):
        written.append(out / "class_state.png")
    if report is not None and plot_classwise(report, out / "classwise.png"):
        written.append(out / "classwise.png")
    return written


def _mark(ax, x, y, color: str, marker: str = "o", label: Optional[str] = None, size: float = 6, **intervals) -> None:
    """A point at (x, y) and its intervals as segments (`xint` / `yint` = (lo, hi), absent or None
    for none). Drawn as lines rather than error bars: a bias-corrected interval need not contain its
    estimate (a worst class at 0 %), and it is shown as it is."""
    if x is None or y is None:
        return
    for key, along in (("xint", True), ("yint", False)):
        lo, hi = intervals.get(key) or (None, None)
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], color=color, lw=1) if along else ax.plot([x, x], [lo, hi], color=color, lw=1)
    ax.plot([x], [y], marker=marker, ms=size, color=color, ls="none", label=label)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


MARKERS = "osD^v<>"  # 7 markers against matplotlib's 10 colours: 70 series before a pair repeats


def _points(ax, names: list[str], x: list[list[float]], y: list[list[float]]) -> None:
    """One labelled point per name at the estimates of x and y ([estimate, lo, hi] each), with both intervals."""
    for i, name in enumerate(names):
        color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        _mark(ax, x[i][0], y[i][0], color, marker, name, xint=x[i][1:], yint=y[i][1:])


def plot_comparison(document: dict[str, Any], out: Path) -> list[Path]:
    """The figures of a `robustdistill compare` report (report.json's document), per group:
    clean vs robust accuracy with W-Robust Acc iso-lines, worst-class vs mean robust accuracy,
    class-wise robust accuracy per cell, and a forest plot of the paired differences; every point
    with its 95 % interval."""
    plt = _pyplot()
    focus, written = document["focus"], []
    for index, group in enumerate(document["groups"]):
        cells = group["cells"]
        if not cells:
            continue
        suffix = f"_{index + 1}" if len(document["groups"]) > 1 else ""
        where = ", ".join(f"{k} = {v}" for k, v in group["axes"].items())
        title = f" ({where})" if where else ""
        names = list(cells)
        metric = {m: [cells[c]["metrics"][m] for c in names] for m in document["metrics"]}
        markers = MARKERS

        if "clean" in metric and focus in metric:
            fig, ax = plt.subplots(figsize=(7.5, 6))
            x, y = metric["clean"], metric[focus]
            _points(ax, names, x, y)
            xlim = (min(v[1] for v in x) - 2, max(v[2] for v in x) + 2)
            ylim = (min(v[1] for v in y) - 2, max(v[2] for v in y) + 2)
            step = 5 if (xlim[1] - xlim[0]) + (ylim[1] - ylim[0]) > 40 else 2
            for w in range(int((xlim[0] + ylim[0]) / 2) // step * step, int((xlim[1] + ylim[1]) / 2) + step, step):
                ax.plot(xlim, [2 * w - v for v in xlim], color="0.75", lw=0.8, ls="--", zorder=0)  # clean + robust = 2w
                top, left = 2 * w - ylim[1], 2 * w - xlim[0]  # where the line enters the plot
                if xlim[0] <= top <= xlim[1]:
                    where = (top, ylim[1])
                elif ylim[0] <= left <= ylim[1]:
                    where = (xlim[0], left)
                else:
                    continue
                ax.annotate(f"{w}", where, xytext=(2, -9), textcoords="offset points", fontsize=7, color="0.5")
            ax.set(
                xlim=xlim,
                ylim=ylim,
                xlabel="clean accuracy (%)",
                ylabel=f"{focus} accuracy (%)",
                title=f"accuracy and robustness{title}\n(dashed: equal W-Robust Acc, its value where it enters; "
                "bars: 95 % intervals)",
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            written.append(_save(fig, plt, out / f"tradeoff{suffix}.png"))

        worst = f"worst {focus}"
        if worst in metric:
            fig, ax = plt.subplots(figsize=(7.5, 6))
            x, y = metric[focus], metric[worst]
            _points(ax, names, x, y)
            ax.set(
                xlabel=f"mean {focus} accuracy (%)",
                ylabel=f"worst-class {focus} accuracy (%)",
                title=f"robustness and its fairness{title}\n(up and right is better; bars: 95 % intervals)",
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            written.append(_save(fig, plt, out / f"fairness{suffix}.png"))

        classes = document["data"]["classes"]
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(classes) + 0.06 * len(classes) * len(names)), 5))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            color, marker = f"C{i % 10}", markers[i % len(markers)]
            for j, (k, v) in enumerate((k, v) for k, v in enumerate(cells[name]["classwise"]) if v[0] is not None):
                at = k - 0.4 + (i + 0.5) * width
                _mark(ax, at, v[0], color, marker, name if j == 0 else None, 3, yint=v[1:])
        ax.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 10 else 0, fontsize=8)
        ax.set(
            xlabel="class",
            ylabel=f"{focus} accuracy (%)",
            title=f"class-wise {focus} accuracy{title} (bars: 95 % intervals)",
        )
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        written.append(_save(fig, plt, out / f"classwise{suffix}.png"))

        diffs = group["differences"]
        if diffs:
            metrics = list(dict.fromkeys(d["metric"] for d in diffs))
            pairs = list(dict.fromkeys(f"{d['a']} - {d['b']}" for d in diffs))
            fig, axes = plt.subplots(
                1, len(metrics), figsize=(3.2 * len(metrics), 0.32 * len(pairs) + 1.6), sharey=True, squeeze=False
            )
            for ax, m in zip(axes[0], metrics):
                rows = [d for d in diffs if d["metric"] == m]
                for d in rows:
                    row = pairs.index(f"{d['a']} - {d['b']}")
                    color = "C3" if d["significant"] else "0.4"
                    _mark(ax, d["estimate"], row, color, size=3, xint=d["interval"])
                ax.axvline(0, color="0.2", lw=0.8)
                ax.set_title(m, fontsize=9)
                ax.set_xlabel("difference" + ("" if m.startswith("NSD") else " (points)"), fontsize=8)
                ax.grid(alpha=0.3, axis="x")
            axes[0][0].set_yticks(range(len(pairs)), pairs, fontsize=7)
            axes[0][0].invert_yaxis()
            fig.suptitle(f"paired differences{title} (95 % intervals; red: excludes 0)", fontsize=10)
            written.append(_save(fig, plt, out / f"differences{suffix}.png"))
    return written
