"""The figures of a comparison (`robustdistill compare`), drawn from its report.json document alone:
per group, clean vs robust accuracy with W-Robust Acc iso-lines (`tradeoff`), worst-class vs mean
robust accuracy (`fairness`), class-wise robust accuracy per cell (`classwise`) and a forest plot of
the paired differences (`differences`); every point with its 95 % interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..evaluation.plots import pyplot

MARKERS = "osD^v<>"  # 7 markers against matplotlib's 10 colours: 70 series before a pair repeats


def threat_words(document: dict[str, Any]) -> str:
    """The threat model of the runs' evaluations, in words ("L-inf, eps 8/255"), or that they differ."""
    threats = document.get("threat_models") or {}
    return next(iter(threats)) if len(threats) == 1 else "threat models differ"


def plot_comparison(document: dict[str, Any], out: Path) -> list[Path]:
    """Every figure of every group with cells (files suffixed _1, _2, ... when there are groups)."""
    plt = pyplot()
    written = []
    for index, group in enumerate(document["groups"]):
        if not group["cells"]:
            continue
        suffix = f"_{index + 1}" if len(document["groups"]) > 1 else ""
        where = ", ".join([*(f"{k} = {v}" for k, v in group["axes"].items()), threat_words(document)])
        figure = _Figure(plt, document, group, f" ({where})", out, suffix)
        written += [path for path in (figure.tradeoff(), figure.fairness(), figure.classwise()) if path]
        if group["differences"]:
            written.append(figure.differences())
    return written


class _Figure:
    """The figures of one group: its cells' metrics ([estimate, lo, hi] per cell), its title."""

    def __init__(self, plt, document: dict[str, Any], group: dict[str, Any], title: str, out: Path, suffix: str):
        self.plt, self.document, self.group, self.title, self.out, self.suffix = (
            plt,
            document,
            group,
            title,
            out,
            suffix,
        )
        self.focus = document["focus"]
        self.names = list(group["cells"])
        self.metric = {m: [group["cells"][c]["metrics"][m] for c in self.names] for m in document["metrics"]}

    def _save(self, fig, name: str) -> Path:
        path = self.out / f"{name}{self.suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=150)
        self.plt.close(fig)
        return path

    def _legend(self, ax) -> None:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))

    def _points(self, ax, x: list[list[float]], y: list[list[float]]) -> None:
        """One labelled point per cell at the estimates of x and y, with both intervals."""
        for i, name in enumerate(self.names):
            _mark(ax, x[i][0], y[i][0], f"C{i % 10}", MARKERS[i % len(MARKERS)], name, xint=x[i][1:], yint=y[i][1:])

    def tradeoff(self) -> Optional[Path]:
        """Clean against robust accuracy; dashed lines of equal W-Robust Acc, labelled where they enter."""
        focus, metric = self.focus, self.metric
        if "clean" not in metric or focus not in metric:
            return None
        fig, ax = self.plt.subplots(figsize=(7.5, 6))
        x, y = metric["clean"], metric[focus]
        self._points(ax, x, y)
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
            title=f"accuracy and robustness{self.title}\n(dashed: equal W-Robust Acc, its value where it enters; "
            "bars: 95 % intervals)",
        )
        ax.grid(alpha=0.3)
        self._legend(ax)
        return self._save(fig, "tradeoff")

    def fairness(self) -> Optional[Path]:
        """Mean against worst-class robust accuracy."""
        focus, worst = self.focus, f"worst {self.focus}"
        if worst not in self.metric:
            return None
        fig, ax = self.plt.subplots(figsize=(7.5, 6))
        self._points(ax, self.metric[focus], self.metric[worst])
        ax.set(
            xlabel=f"mean {focus} accuracy (%)",
            ylabel=f"worst-class {focus} accuracy (%)",
            title=f"robustness and its fairness{self.title}\n(up and right is better; bars: 95 % intervals)",
        )
        ax.grid(alpha=0.3)
        self._legend(ax)
        return self._save(fig, "fairness")

    def classwise(self) -> Path:
        """Each cell's robust accuracy per class, side by side within a class."""
        classes, names, cells = self.document["data"]["classes"], self.names, self.group["cells"]
        fig, ax = self.plt.subplots(figsize=(max(8, 0.9 * len(classes) + 0.06 * len(classes) * len(names)), 5))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
            for j, (k, v) in enumerate((k, v) for k, v in enumerate(cells[name]["classwise"]) if v[0] is not None):
                at = k - 0.4 + (i + 0.5) * width
                _mark(ax, at, v[0], color, marker, name if j == 0 else None, 3, yint=v[1:])
        ax.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 10 else 0, fontsize=8)
        ax.set(
            xlabel="class",
            ylabel=f"{self.focus} accuracy (%)",
            title=f"class-wise {self.focus} accuracy{self.title} (bars: 95 % intervals)",
        )
        ax.grid(alpha=0.3, axis="y")
        self._legend(ax)
        return self._save(fig, "classwise")

    def differences(self) -> Path:
        """A forest plot of the paired differences, one panel per metric; red: the interval excludes 0."""
        diffs = self.group["differences"]
        metrics = list(dict.fromkeys(d["metric"] for d in diffs))
        pairs = list(dict.fromkeys(f"{d['a']} - {d['b']}" for d in diffs))
        fig, axes = self.plt.subplots(
            1, len(metrics), figsize=(3.2 * len(metrics), 0.32 * len(pairs) + 1.6), sharey=True, squeeze=False
        )
        for ax, m in zip(axes[0], metrics):
            for d in (d for d in diffs if d["metric"] == m):
                row = pairs.index(f"{d['a']} - {d['b']}")
                _mark(ax, d["estimate"], row, "C3" if d["significant"] else "0.4", size=3, xint=d["interval"])
            ax.axvline(0, color="0.2", lw=0.8)
            ax.set_title(m, fontsize=9)
            ax.set_xlabel("difference" + ("" if m.startswith("NSD") else " (points)"), fontsize=8)
            ax.grid(alpha=0.3, axis="x")
        axes[0][0].set_yticks(range(len(pairs)), pairs, fontsize=7)
        axes[0][0].invert_yaxis()
        fig.suptitle(f"paired differences{self.title} (95 % intervals; red: excludes 0)", fontsize=10)
        return self._save(fig, "differences")


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
