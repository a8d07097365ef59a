"""Comparing trained models over seeds and test images: each run's metrics from its per-sample
verdicts, a hierarchical bootstrap over seeds and images, bias-corrected intervals, and paired
differences between methods.

    names = metric_names(["clean", "pgd20", "autoattack"], "autoattack")  # clean, pgd20, autoattack,
                                      # worst autoattack, NSD autoattack, W-Robust autoattack
    boot = bootstrap({"rslad": [verdicts_seed0, ...], "absld": [...]}, labels, 10, names)
    point, lo, hi = interval(boot["absld"], names.index("pgd20"))
    for d in differences(boot, [("absld", "rslad")], names): print(d.metric, d.estimate, d.significant)

A run's verdicts are {attack: bool array over the test images, in sample order} (report.json's
`verdicts`, read with `metrics.unpack_verdicts`). `HOW` says in words how the intervals are made.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

HOW = (
    "Intervals: a hierarchical bootstrap; each draw resamples the seeds and the test images (within each "
    "class, so class sizes stay fixed; the same images for every method), so an interval covers both the "
    "training seed and the finite test set; the point estimate is the mean over seeds on the full test split. "
    "Worst-class accuracy and NSD are biased under resampling (resampling adds noise between classes: the "
    "minimum drops and the spread grows), so every interval is the 95 % percentile interval of the bootstrap "
    "distribution shifted by its estimated bias (bootstrap mean - estimate). Differences are paired (same "
    "seed, same images) and called significant when their 95 % interval excludes 0. The intervals err on the "
    "wide side: resampling images under every resampled seed counts each run's own sampling noise again, and on "
    "simulated experiments (4 seeds, 200 images) the 95 % interval covered the true accuracy 98 % of the time "
    "(tests/test_stats.py)."
)


def metric_names(attacks: Sequence[str], focus: Optional[str] = None) -> list[str]:
    """The metrics of a comparison over `attacks`: clean accuracy; each other attack's accuracy; under
    `focus`, the attack robustness is quoted under (the strongest; default: the only one besides
    clean), its worst-class accuracy (`worst <focus>`), NSD (`NSD <focus>`) and, with clean accuracy,
    W-Robust Acc (`W-Robust <focus>`, (clean + focus) / 2)."""
    others = [a for a in attacks if a != "clean"]
    if focus is None and len(others) == 1:
        focus = others[0]
    if focus is not None and focus not in others:
        raise ValueError(f"the focus attack {focus} is not among {others}")
    names = (["clean"] if "clean" in attacks else []) + others
    if focus is not None:
        names += [f"worst {focus}", f"NSD {focus}"] + ([f"W-Robust {focus}"] if "clean" in attacks else [])
    return names


def is_ratio(name: str) -> bool:
    """NSD is a ratio; every other metric is a percentage."""
    return name.startswith("NSD ")


def run_metrics(
    verdicts: Mapping[str, np.ndarray], labels: np.ndarray, num_classes: int, names: Sequence[str]
) -> np.ndarray:
    """One run's metrics (percentages; NSD a ratio, nan when the mean class accuracy is 0) from its
    per-sample verdicts on the images whose labels are `labels`; besides those of `metric_names`,
    `class <k> <attack>` is class k's accuracy (nan when the images hold none of class k)."""
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    classes: dict[str, np.ndarray] = {}

    def every_class(attack: str) -> np.ndarray:
        if attack not in classes:
            classes[attack] = np.bincount(labels, weights=verdicts[attack], minlength=num_classes) / np.maximum(
                counts, 1
            )
        return classes[attack]

    def class_accuracy(attack: str) -> np.ndarray:
        return every_class(attack)[present]

    out = []
    for name in names:
        if name.startswith("class "):
            _, k, attack = name.split(" ", 2)
            out.append(100 * every_class(attack)[int(k)] if present[int(k)] else np.nan)
        elif name.startswith("W-Robust "):
            out.append(100 * (verdicts["clean"].mean() + verdicts[name[len("W-Robust ") :]].mean()) / 2)
        elif name.startswith("worst "):
            out.append(100 * class_accuracy(name[len("worst ") :]).min())
        elif is_ratio(name):
            acc = class_accuracy(name[len("NSD ") :])
            out.append(acc.std() / acc.mean() if acc.mean() > 0 else np.nan)
        else:
            out.append(100 * verdicts[name].mean())
    return np.array(out)


def bootstrap(
    results: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    labels: np.ndarray,
    num_classes: int,
    names: Sequence[str],
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per method, its runs' (one per seed, seed i of every method paired) metrics averaged over
    seeds: an array (draws + 1, metrics) whose first row is the estimate on the full data and whose
    other rows resample the seeds and, within each class, the test images (the same for every
    method in a draw)."""
    sizes = {len(runs) for runs in results.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every method needs the same number of runs (one per seed), got {sorted(sizes)}")
    n_seeds = sizes.pop()
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    out = {name: np.empty((draws + 1, len(names))) for name in results}
    for b in range(draws + 1):
        seeds = np.arange(n_seeds) if b == 0 else rng.integers(0, n_seeds, n_seeds)
        images = (
            np.arange(len(labels)) if b == 0 else np.concatenate([rng.choice(i, len(i)) for i in by_class if len(i)])
        )
        for method, runs in results.items():
            values = [
                run_metrics({a: v[images] for a, v in runs[s].items()}, labels[images], num_classes, names)
                for s in seeds
            ]
            with warnings.catch_warnings():  # a metric undefined in every seed (NSD at 0 %) stays nan
                warnings.simplefilter("ignore", RuntimeWarning)
                out[method][b] = np.nanmean(values, axis=0)
    return out


def interval(samples: np.ndarray, column: int) -> tuple[float, float, float]:
    """(estimate, lo, hi): the 95 % percentile interval of the bootstrap draws (`samples[1:]`)
    shifted by their bias (their mean minus the estimate, `samples[0]`)."""
    point, draws = samples[0, column], samples[1:, column]
    if np.isnan(draws).all():
        return point, np.nan, np.nan
    lo, hi = np.nanpercentile(draws - (np.nanmean(draws) - point), [2.5, 97.5])
    return point, lo, hi


@dataclass(frozen=True)
class Difference:
    """A paired difference `a - b` of one metric: its estimate and 95 % interval."""

    a: str
    b: str
    metric: str
    estimate: float
    lo: float
    hi: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.lo > 0 or self.hi < 0


def differences(
    boot: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]], names: Sequence[str]
) -> list[Difference]:
    """Every metric's paired difference for each pair (a, b) of bootstrapped methods, draw by draw
    (same seeds, same images); pairs with a method not in `boot` are left out."""
    out = []
    for a, b in pairs:
        if a in boot and b in boot:
            d = boot[a] - boot[b]
            out += [Difference(a, b, m, *interval(d, j)) for j, m in enumerate(names)]
    return out
