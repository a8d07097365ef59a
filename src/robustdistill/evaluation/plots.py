"""Plots of a run (matplotlib, PNG): adaptive-state trajectories and class-wise accuracy.

- `temperatures.png` (ABSLD): every class's tau_adv and tau_nat over epochs;
- `balance.png` (MTARD/B-MTARD): the two temperatures and the two loss weights over steps;
- `class_state.png`: any class-wise quantity a method logs per epoch (`class_*`, e.g. Fair-ARD's weights);
- `classwise.png`: class-wise accuracy under each attack of the run's report.
Plots are derived from metrics.jsonl and report.json, so redrawing them loses nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..storage.runs import read_metrics
from .report import read_report


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib (a dependency of robustdistill): pip install matplotlib") from None
    return plt


def plot_temperatures(records: list[dict[str, Any]], path: Path) -> bool:
    epochs = [r for r in records if r.get("type") == "epoch" and isinstance(r.get("temperature_adv"), list)]
    if not epochs:
        return False
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
