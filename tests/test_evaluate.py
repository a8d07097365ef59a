import pytest
import torch

from robustdistill.attacks import EvalSettings
from robustdistill.core.threat import ThreatModel
from robustdistill.evaluation.metrics import (
    class_metrics,
    pack_verdicts,
    selection_score,
    unpack_verdicts,
    wilson_interval,
)
from robustdistill.evaluation.suite import evaluate_model


def test_class_metrics_by_hand():
    m = class_metrics(torch.tensor([5.0, 2.0, 0.0]), torch.tensor([10.0, 4.0, 0.0]))
    assert m["accuracy"] == pytest.approx(7 / 14)
    assert m["class_accuracy"] == [0.5, 0.5, None]  # an absent class is reported as null, not 0
    assert m["worst_class_accuracy"] == 0.5 and m["nsd"] == pytest.approx(0.0)
    m = class_metrics(torch.tensor([9.0, 1.0]), torch.tensor([10.0, 10.0]))
    # class accuracies 0.9 and 0.1: mean 0.5, population std 0.4, NSD 0.8
    assert m["nsd"] == pytest.approx(0.8) and m["best_class_accuracy"] == pytest.approx(0.9)
    # no ties: class accuracies 3/4, 1/5, 2/2, absent, 1/3; worst 0.2 (class 1), best 1.0 (class 2)
    m = class_metrics(torch.tensor([3.0, 1.0, 2.0, 0.0, 1.0]), torch.tensor([4.0, 5.0, 2.0, 0.0, 3.0]))
    assert m["worst_class_accuracy"] == pytest.approx(0.2) and m["best_class_accuracy"] == 1.0
    assert m["accuracy"] == pytest.approx(7 / 14) and m["class_accuracy"][3] is None


def test_wilson_interval_by_hand():
    # 8 of 10: p = 0.8, z = 1.96: center (0.8 + 0.19208) / 1.38415 = 0.71677,
    # half 1.96 * sqrt(0.016 + 0.0096040) / 1.38415 = 0.22657 -> [0.4902, 0.9433]
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 36)[0] == 0.0 and 0.09 < wilson_interval(0, 36)[1] < 0.1  # one class of digits
    assert wilson_interval(5, 0) is None
    m = class_metrics(torch.tensor([5.0, 0.0]), torch.tensor([10.0, 0.0]))
    assert m["class_interval"][1] is None and m["class_interval"][0] == wilson_interval(5, 10)


def test_verdicts_round_trip():
    correct = torch.tensor([True, False, True, True, False, False, True, False, True, True, False])
    assert unpack_verdicts(pack_verdicts(correct), 11).tolist() == correct.tolist()


def test_selection_scores():
    summary = {"attacks": {"clean": {"accuracy": 0.9}, "pgd20": {"accuracy": 0.5, "worst_class_accuracy": 0.2}}}
    assert selection_score(summary, "clean") == 0.9
    assert selection_score(summary, "robust") == 0.5
    assert selection_score(summary, "robust_plus_worst") == pytest.approx(0.7)
    assert selection_score(summary, "w_robust") == pytest.approx(0.7)


def test_evaluate_reports_every_attack_and_leaves_the_model_untouched(natural_model, digits):
    model = natural_model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = EvalSettings(
        ThreatModel(0.1), step_size=0.025, batch_size=64, attacks=("clean", "fgsm", "pgd20", "cw30")
    )
    test = digits.test.take(slice(0, 150))
    out = evaluate_model(model, test, settings, 10)
    acc = {k: v["accuracy"] for k, v in out["attacks"].items()}
    assert acc["clean"] > 0.9 and acc["pgd20"] <= acc["fgsm"] and acc["pgd20"] < acc["clean"]
    strongest = min(("cw30", "fgsm", "pgd20"), key=acc.get)  # the lowest accuracy; a tie: by name
    assert out["w_robust"]["attack"] == strongest and out["w_robust"]["definition"] == f"(clean + {strongest}) / 2"
    assert out["w_robust"]["value"] == pytest.approx((acc["clean"] + acc[strongest]) / 2)
    assert model.training  # the mode is restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(out["attacks"]["clean"]["class_accuracy"]) == 10


def test_evaluate_is_deterministic_under_its_seed(natural_model, digits):
    settings = EvalSettings(ThreatModel(0.1), step_size=0.025, batch_size=64, seed=3, attacks=("pgd20",))
    test = digits.test.take(slice(0, 100))
    runs = [evaluate_model(natural_model, test, settings, 10) for _ in range(2)]
    assert runs[0]["attacks"] == runs[1]["attacks"]


def test_folding_is_recorded_and_moves_a_verdict_at_most_by_rounding(natural_model, digits):
    """The attacks craft on the folded model (eval.fold_batchnorm), verdicts are the model's own: the
    accuracy with and without folding agrees within a sample or two; the report says which ran."""
    from robustdistill.evaluation.metrics import unpack_verdicts

    test = digits.test.take(slice(0, 150))
    out = {
        fold: evaluate_model(
            natural_model,
            test,
            EvalSettings(ThreatModel(0.1), step_size=0.025, attacks=("pgd20",), fold_batchnorm=fold),
            10,
        )
        for fold in (True, False)
    }
    assert [out[f]["settings"]["common"]["fold_batchnorm"] for f in (True, False)] == [True, False]
    verdicts = [unpack_verdicts(out[f]["attacks"]["pgd20"]["verdicts"], 150) for f in (True, False)]
    assert (verdicts[0] != verdicts[1]).sum().item() <= 2
    assert 0 < out[True]["attacks"]["pgd20"]["accuracy"] < 0.9  # the attack did work


def test_eps_zero_attack_equals_clean(natural_model, digits):
    settings = EvalSettings(ThreatModel(0.0), step_size=0.0, batch_size=64, attacks=("clean", "pgd20", "fgsm"))
    out = evaluate_model(natural_model, digits.test, settings, 10)
    assert out["attacks"]["pgd20"] == out["attacks"]["clean"] == out["attacks"]["fgsm"]


def test_comparison_table_shows_the_intervals():
    from robustdistill.evaluation.report import comparison_table

    metrics = class_metrics(torch.tensor([8.0, 3.0]), torch.tensor([10.0, 10.0]))
    report = {"attacks": {"clean": metrics, "pgd20": metrics}, "w_robust": {"value": 0.55}}
    row = comparison_table([("run", report)]).splitlines()[-1]
    lo, hi = wilson_interval(3, 10)  # the worst class: 3 of 10
    assert f"30.00 [{100 * lo:.1f}, {100 * hi:.1f}]" in row and "55.00" in row
    lo, hi = wilson_interval(11, 20)
    assert f"55.00 [{100 * lo:.1f}, {100 * hi:.1f}]" in row


def test_tables_quote_the_strongest_attack_and_say_where_another_beats_it():
    from robustdistill.evaluation.report import comparison_table

    def report(clean, pgd, aa):
        n = torch.tensor([50.0, 50.0])
        attacks = {
            k: class_metrics(torch.tensor(v), n) for k, v in (("clean", clean), ("pgd20", pgd), ("autoattack", aa))
        }
        return {"attacks": attacks}

    table = comparison_table(
        [
            ("a", report([45.0, 45.0], [30.0, 25.0], [25.0, 10.0])),
            ("b", report([40.0, 40.0], [20.0, 20.0], [30.0, 25.0])),
        ]
    )
    header, _, row_a, row_b, *notes = table.splitlines()
    assert (
        "| autoattack % [95% CI] |" in header
        and "worst-class autoattack" in header
        and "W-Robust (autoattack)" in header
    )
    # AutoAttack: 45 % on average against PGD-20's 47.5 %; on run a 35 %, its worst class 20 %
    assert "| 35.00 [26.4, 44.7]" in row_a and "| 20.00 [11.2, 33.0]" in row_a
    # on run b, PGD-20 (40 %) is below AutoAttack's interval (55 %, from about 45 %): said, not hidden
    assert notes == ["note: b: pgd20 (40.00 %) is below the interval of autoattack; quote pgd20 for it"]
