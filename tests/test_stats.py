"""The comparison statistics: metrics by hand, the bootstrap's estimate row, a known difference found
and a null one not, and the intervals' coverage on simulated seeds and test sets near 95 %."""

import numpy as np
import pytest

from robustdistill.studies.stats import bootstrap, differences, interval, metric_names, run_metrics


def test_metric_names_follow_the_attacks():
    assert metric_names(["clean", "pgd20"]) == ["clean", "pgd20", "worst pgd20", "NSD pgd20", "W-Robust pgd20"]
    # with several attacks, the class-wise numbers and W-Robust Acc are those of the one quoted
    names = metric_names(["clean", "pgd20", "autoattack"], "autoattack")
    assert names == ["clean", "pgd20", "autoattack", "worst autoattack", "NSD autoattack", "W-Robust autoattack"]
    assert metric_names(["pgd20"]) == ["pgd20", "worst pgd20", "NSD pgd20"]  # no clean accuracy: no W-Robust
    with pytest.raises(ValueError, match="not among"):
        metric_names(["clean", "pgd20"], "autoattack")


def test_run_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    verdicts = {"clean": np.array([1, 1, 1, 0, 1], bool), "pgd20": np.array([1, 0, 0, 0, 1], bool)}
    names = metric_names(["clean", "pgd20"])
    # pgd20 by class: 1/2, 0, 1 -> mean 1/2, population std sqrt(1/6); W-Robust = (80 + 40) / 2
    expected = [80.0, 40.0, 0.0, np.sqrt(1 / 6) / 0.5, 60.0]
    np.testing.assert_allclose(run_metrics(verdicts, labels, 4, names), expected)  # class 3 absent: ignored
    nothing = {"clean": verdicts["clean"], "pgd20": np.zeros(5, bool)}
    assert np.isnan(run_metrics(nothing, labels, 3, names)[3])  # NSD of an all-zero accuracy is undefined


def _runs(rng, p, n_images=400, seeds=3, spread=0.02):
    """Seeds of one method: per-sample verdicts with accuracy p (plus a seed effect)."""
    labels = np.arange(n_images) % 10
    return labels, [
        {"clean": rng.random(n_images) < 0.9, "pgd20": rng.random(n_images) < p + rng.normal(0, spread)}
        for _ in range(seeds)
    ]


def test_bootstrap_row_zero_is_the_seed_mean_and_methods_need_the_same_seeds():
    rng = np.random.default_rng(0)
    labels, runs = _runs(rng, 0.5)
    names = metric_names(["clean", "pgd20"])
    boot = bootstrap({"a": runs}, labels, 10, names, draws=50)
    np.testing.assert_allclose(boot["a"][0], np.mean([run_metrics(r, labels, 10, names) for r in runs], axis=0))
    assert boot["a"].shape == (51, len(names))
    with pytest.raises(ValueError, match="same number of runs"):
        bootstrap({"a": runs, "b": runs[:2]}, labels, 10, names, draws=5)


def test_a_known_difference_is_found_and_a_null_one_is_not():
    rng = np.random.default_rng(1)
    labels, strong = _runs(rng, 0.7)
    _, weak = _runs(rng, 0.5)
    _, same = _runs(rng, 0.7)
    names = metric_names(["clean", "pgd20"])
    boot = bootstrap({"strong": strong, "weak": weak, "same": same}, labels, 10, names, draws=400)
    found = {(d.a, d.b, d.metric): d for d in differences(boot, [("strong", "weak"), ("same", "strong")], names)}
    real = found[("strong", "weak", "pgd20")]
    assert real.significant and 15 < real.estimate < 25 and real.lo > 0
    assert not found[("same", "strong", "pgd20")].significant
    assert not found[("strong", "weak", "clean")].significant  # both 90 % clean
    assert ("strong", "missing", "pgd20") not in {
        (d.a, d.b, d.metric) for d in differences(boot, [("strong", "missing")], names)
    }


def test_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    """Simulated experiments: a population of test images of varying difficulty and of training
    seeds that shift the accuracy; each experiment draws 200 images and 4 seeds and makes the
    interval of PGD-20 accuracy. The true value (the population mean) must be covered in close to
    95 % of the experiments, erring wide rather than narrow (98 % here: the two-level resampling
    counts each run's sampling noise again; stats.HOW says so)."""
    rng = np.random.default_rng(2)
    names, covered, experiments = ["pgd20"], 0, 120
    for _ in range(experiments):
        difficulty = rng.beta(3, 3, 200)  # per-image probability of surviving, population mean 0.5
        labels = np.arange(200) % 10
        runs = [{"pgd20": rng.random(200) < np.clip(difficulty + shift, 0, 1)} for shift in rng.normal(0, 0.03, 4)]
        _, lo, hi = interval(bootstrap({"m": runs}, labels, 10, names, draws=300, seed=int(rng.integers(1e9)))["m"], 0)
        covered += lo <= 50.0 <= hi
    assert 0.93 <= covered / experiments <= 0.995, covered / experiments


def test_class_wise_accuracies_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    verdicts = {"pgd20": np.array([1, 0, 0, 0, 1], bool)}
    names = [f"class {k} pgd20" for k in range(4)]
    np.testing.assert_allclose(run_metrics(verdicts, labels, 4, names), [50.0, 0.0, 100.0, np.nan])
