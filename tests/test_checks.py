"""The evaluation protocol: the full attack suite, sanity checks that pass on a sound model and
catch a gradient-masked one, AutoAttack resume, comparison reports, RobustBench offline."""

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from robustdistill.attacks import ATTACKS, Attack, AttackEnv, EvalSettings, get_attack
from robustdistill.cli import main
from robustdistill.core.errors import UserError
from robustdistill.core.threat import ThreatModel
from robustdistill.evaluation.checks import CHECKS, CheckContext, Outcome, check, registered
from robustdistill.evaluation.suite import evaluate_model
from robustdistill.models.checkpoint import load_model


def _status(summary):
    return {c["name"]: c["status"] for c in summary["checks"]}


@pytest.fixture()
def robust_model(trained_runs):
    return load_model(trained_runs["trades"] / "checkpoints" / "best.safetensors")[0].eval()


def _settings(attacks, **kw):
    return EvalSettings(
        **(
            {
                "threat": ThreatModel(0.2),
                "step_size": 0.05,
                "square_queries": 300,
                "checks": True,
                "checks_subset": 150,
                "attacks": tuple(attacks),
            }
            | kw
        )
    )


def test_full_suite_and_checks_pass_on_a_sound_model(robust_model, natural_model, digits):
    test = digits.test.take(slice(0, 150))
    before = {k: v.clone() for k, v in robust_model.state_dict().items()}
    attacks = ["clean", "fgsm", "pgd20", "cw30", "autoattack_fast", "square", "transfer"]
    out = evaluate_model(robust_model, test, _settings(attacks), 10, surrogate=natural_model)
    assert _status(out) == {
        name: "passed"
        for name in [
            "eps_zero",
            "monotone",
            "large_eps",
            "worst_case",
            "black_box",
            "perturbation",
            "unchanged",
            "autoattack_flags",
            "gradient",
        ]
    }
    acc = {k: v["accuracy"] for k, v in out["attacks"].items()}
    assert out["robust_to_all"]["accuracy"] <= min(acc.values())
    assert acc["autoattack_fast"] <= acc["pgd20"] < acc["clean"]
    assert all(torch.equal(before[k], v) for k, v in robust_model.state_dict().items())
    assert out["settings"]["square"]["queries"] == 300


class Quantised(nn.Module):
    """Gradient masking by construction: the input is rounded (zero gradient everywhere)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def test_checks_catch_a_gradient_masked_model(natural_model, digits):
    masked = Quantised(natural_model).eval()
    test = digits.test.take(slice(0, 150))
    out = evaluate_model(masked, test, _settings(["clean", "pgd20", "square"], square_queries=500), 10)
    status = _status(out)
    assert status["large_eps"] == "failed"  # PGD cannot move the input: accuracy stays near clean
    assert status["black_box"] == "failed"  # Square, which needs no gradient, breaks what PGD could not
    assert out["attacks"]["square"]["accuracy"] < out["attacks"]["pgd20"]["accuracy"]
    assert status["gradient"] == "failed"  # and the gradient itself is zero: said directly
    assert out["checks"][8]["numbers"]["nonzero_share"] == 0.0


def test_the_gradient_check_catches_nan_weights_and_passes_a_sound_model(natural_model, digits):
    test = digits.test.take(slice(0, 64))
    sound = evaluate_model(natural_model, test, _settings(["clean", "pgd20"]), 10)
    assert _status(sound)["gradient"] == "passed" and sound["checks"][8]["numbers"]["nonzero_share"] > 0.9
    broken = copy.deepcopy(natural_model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    out = evaluate_model(broken, test, _settings(["clean", "pgd20"]), 10)
    assert _status(out)["gradient"] == "failed" and "NaN or infinite gradient" in out["checks"][8]["message"]


def test_eps_zero_check_catches_a_randomised_model(natural_model, digits):
    class Noisy(nn.Module):
        def forward(self, x):
            return natural_model(x) + 30 * torch.randn(len(x), 10)

    out = evaluate_model(Noisy().eval(), digits.test.take(slice(0, 100)), _settings(["clean", "pgd20"]), 10)
    assert _status(out)["eps_zero"] == "failed"


def test_perturbation_check_catches_an_attack_that_leaves_the_ball(natural_model, digits, monkeypatch):
    class Leaky(Attack):
        name = "fgsm"

        def run(self, model, x, y, env):
            return (x + 2 * env.settings.eps).clamp(0, 1), None

    monkeypatch.setitem(ATTACKS._items, "fgsm", Leaky)
    out = evaluate_model(natural_model, digits.test.take(slice(0, 50)), _settings(["clean", "fgsm"]), 10)
    assert _status(out)["perturbation"] == "failed"


def test_unchanged_check_catches_a_model_that_changes(natural_model, digits, monkeypatch):
    net = Quantised(natural_model)
    net.register_buffer("calls", torch.zeros(()))
    original = net.forward

    def counting(x):
        net.calls += 1  # a buffer that moves during evaluation
        return original(x)

    net.forward = counting
    out = evaluate_model(net.eval(), digits.test.take(slice(0, 30)), _settings(["clean"]), 10)
    assert _status(out)["unchanged"] == "failed"


def _context(correct, settings, pgd=None):
    """A CheckContext over `correct` (per-sample verdicts) with no model; `pgd(eps, steps, start)`
    stands in for the checks' extra PGD runs."""
    n = len(next(iter(correct.values())))
    env = AttackEnv(settings, index=torch.arange(n), x_all=torch.zeros(n, 1, 2, 2), y_all=torch.zeros(n).long())

    class Canned(CheckContext):
        def pgd(self, eps, steps, start="uniform"):
            return pgd(eps, steps, start)

    return Canned(None, correct, {}, env, 10, None)


def _verdicts(correct, n=100):
    return torch.arange(n) < correct


def test_monotone_check_fails_when_a_weaker_attack_is_stronger():
    """Check 2 on canned PGD results: a smaller budget (or fewer steps) that lowers accuracy below
    the full attack's fails it; the full attack's accuracy comes from the suite's own pgd20 run."""
    settings = _settings(["clean", "pgd20"], checks_subset=100)
    monotone = CHECKS.get("monotone")
    correct = {"clean": _verdicts(90), "pgd20": _verdicts(50)}
    sound = monotone.evaluate(_context(correct, settings, lambda eps, steps, start: 0.7))
    assert sound["status"] == "passed" and sound["numbers"]["eps"] == 0.5 and sound["numbers"]["eps/2"] == 0.7
    half_stronger = lambda eps, steps, start: 0.3 if eps < settings.eps else 0.7  # noqa: E731
    assert monotone.evaluate(_context(correct, settings, half_stronger))["status"] == "failed"
    few_stronger = lambda eps, steps, start: 0.3 if steps < settings.check_steps else 0.7  # noqa: E731
    out = monotone.evaluate(_context(correct, settings, few_stronger))
    assert out["status"] == "failed" and out["numbers"]["steps=5"] == 0.3
    assert out["message"] == "accuracy must not increase with eps or with the number of steps"


def test_worst_case_check_fails_when_autoattack_is_above_pgd_or_the_worst_case_is_not_lowest():
    settings = _settings(["pgd20", "autoattack_fast"])
    worst_case = CHECKS.get("worst_case")
    fine = {"pgd20": _verdicts(50), "autoattack_fast": _verdicts(45)}
    assert worst_case.evaluate(_context(fine, settings))["status"] == "passed"
    above = {"pgd20": _verdicts(50), "autoattack_fast": _verdicts(60)}  # 10 points above PGD-20: beyond noise
    out = worst_case.evaluate(_context(above, settings))
    assert out["status"] == "failed" and out["numbers"]["autoattack_fast"] == 0.6
    within_noise = {"pgd20": _verdicts(50), "autoattack_fast": _verdicts(50) | (torch.arange(100) == 99)}
    assert worst_case.evaluate(_context(within_noise, settings))["status"] == "passed"  # one sample: tolerated
    one = worst_case.evaluate(_context({"pgd20": _verdicts(50)}, settings))
    assert one["status"] == "skipped" and one["message"] == "needs at least two attacks"


def test_the_checks_are_one_registry_with_unique_ids():
    checks = registered()
    assert [c.id for c in checks] == list(range(1, 10))
    assert [c.name for c in checks][:3] == ["eps_zero", "monotone", "large_eps"]
    assert all(c.asserts for c in checks)
    with pytest.raises(ValueError, match="id 2 is registered twice"):
        check(2, "again", "anything")(lambda c: Outcome(True))
    assert "again" not in CHECKS.names()


def test_list_checks_prints_the_registry(capsys):
    assert main(["list", "checks"]) == 0
    out = capsys.readouterr().out
    for c in registered():
        assert f"{c.id} {c.name}" in " ".join(out.split()) and c.asserts in out


def _aa(model, x, y, settings, state_dir, name="autoattack_fast"):
    return get_attack(name).run(model, x, y, AttackEnv(settings, state_dir=state_dir))


@pytest.mark.slow
def test_autoattack_resumes_to_the_uninterrupted_verdicts_after_every_chunk(
    robust_model, digits, tmp_path, monkeypatch
):
    """Stopped after chunk k, for every k, then resumed: exactly the verdicts of one straight run.
    (Before the candidates were kept in the state, a resume after an APGD-T chunk skipped points.)"""
    import pyautoattack.autoattack as aa_module
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    # 10 APGD iterations instead of 100 keep the test fast; the chunking logic is the same
    monkeypatch.setattr(aa_module, "APGDAttack", lambda *a, **k: APGDAttack(*a, **{**k, "n_iter": 10}))
    monkeypatch.setattr(
        aa_module, "APGDAttack_targeted", lambda *a, **k: APGDAttack_targeted(*a, **{**k, "n_iter": 10})
    )
    x, y = digits.test.images()[:48], digits.test.y[:48]
    settings = EvalSettings(ThreatModel(0.2), step_size=0.05, batch_size=2)  # chunks of 8 images
    real, calls = AutoAttack.run_standard_evaluation, []

    def counted(self, *args, **kwargs):
        calls.append(self.attacks_to_run[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", counted)
    _, straight = _aa(robust_model, x, y, settings, tmp_path / "straight")
    total = len(calls)
    assert calls.count("apgd-t") >= 2 and 0 < straight.sum() < len(y)  # a resume inside APGD-T is exercised
    for k in range(1, total):
        calls.clear()

        def stop_after_k(self, *args, k=k, **kwargs):
            if len(calls) == k:
                raise KeyboardInterrupt
            return counted(self, *args, **kwargs)

        monkeypatch.setattr(AutoAttack, "run_standard_evaluation", stop_after_k)
        with pytest.raises(KeyboardInterrupt):
            _aa(robust_model, x, y, settings, tmp_path / f"k{k}")
        monkeypatch.setattr(AutoAttack, "run_standard_evaluation", counted)
        _, resumed = _aa(robust_model, x, y, settings, tmp_path / f"k{k}")
        assert torch.equal(straight, resumed), f"resumed after chunk {k} of {total}"
        assert len(calls) == total  # no chunk attacked twice, none skipped


@pytest.mark.slow
def test_autoattack_refuses_the_state_of_another_evaluation(robust_model, digits, tmp_path):
    x, y = digits.test.images()[:16], digits.test.y[:16]
    settings = EvalSettings(ThreatModel(0.2), step_size=0.05, batch_size=4)
    _aa(robust_model, x, y, settings, tmp_path / "done")
    state = tmp_path / "done" / "autoattack_fast_state.json"
    changed = copy.deepcopy(robust_model)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    cases = {
        "model": lambda: _aa(changed, x, y, settings, tmp_path / "done"),
        "eps": lambda: _aa(
            robust_model, x, y, dataclasses.replace(settings, threat=ThreatModel(0.1)), tmp_path / "done"
        ),
        "n": lambda: _aa(robust_model, x[:12], y[:12], settings, tmp_path / "done"),  # a different subset
        "data": lambda: _aa(robust_model, x.flip(0), y.flip(0), settings, tmp_path / "done"),
        "seed": lambda: _aa(robust_model, x, y, dataclasses.replace(settings, seed=1), tmp_path / "done"),
    }
    for what, call in cases.items():
        with pytest.raises(UserError, match=rf"different AutoAttack evaluation \(its .*{what}"):
            call()
    (tmp_path / "standard").mkdir()
    (tmp_path / "standard" / "autoattack_state.json").write_text(state.read_text())
    with pytest.raises(UserError, match="attacks"):
        _aa(robust_model, x, y, settings, tmp_path / "standard", name="autoattack")
    edited = json.loads(state.read_text())  # a verdict flipped by hand: the digest no longer matches
    edited["robust"][0] = not edited["robust"][0]
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "autoattack_fast_state.json").write_text(json.dumps(edited))
    with pytest.raises(UserError, match="was changed since this tool wrote it"):
        _aa(robust_model, x, y, settings, tmp_path / "edited")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "autoattack_fast_state.json").write_text("{not json")
    with pytest.raises(UserError, match="not an AutoAttack state"):
        _aa(robust_model, x, y, settings, tmp_path / "junk")


@pytest.mark.slow
def test_autoattack_warnings_become_a_failed_check(natural_model, digits, monkeypatch):
    """pyautoattack's own flags (here: its "Square Attack has decreased the robust accuracy" check,
    fired by a model that masks gradients) are kept in the report and fail check 8."""
    masked = Quantised(natural_model).eval()
    out = evaluate_model(
        masked, digits.test.take(slice(0, 40)), _settings(["clean", "autoattack"], batch_size=20, checks_subset=40), 10
    )
    flags = out["autoattack_flags"]["autoattack"]
    assert any("Square Attack has decreased the robust accuracy" in m for m in flags)
    assert _status(out)["autoattack_flags"] == "failed"


def test_report_command_compares_runs(trained_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["report", str(trained_runs["natural"]), str(trained_runs["trades"]), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "natural" in table and "trades" in table and "worst-class pgd20" in table
    assert (out / "comparison.md").is_file() and (out / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(trained_runs["natural"]), "--out", str(out)]) == 2  # never over an old one
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_eval_strict_turns_failed_checks_into_an_exit_code(trained_runs, tmp_path, monkeypatch, capsys):
    import robustdistill.cli as cli

    real = cli.evaluate

    def with_failure(*args, **kwargs):
        report = real(*args, **kwargs)
        report["checks"][2]["status"] = "failed"
        return report

    monkeypatch.setattr(cli, "evaluate", with_failure)
    args = ["eval", str(trained_runs["natural"]), "--subset", "40", "--out"]
    assert main(args + [str(tmp_path / "lenient")]) == 0
    assert main(args + [str(tmp_path / "strict"), "--strict"]) == 1
    assert "WARNING: sanity check 3 (large_eps) FAILED" in capsys.readouterr().err
    report = json.loads((tmp_path / "strict" / "report.json").read_text())
    assert [c["id"] for c in report["checks"]] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert (tmp_path / "strict" / "classwise.png").is_file() and "FAILED 3 large_eps" in (
        tmp_path / "strict" / "report.md"
    ).read_text()


def test_robustbench_entry_loads_offline_from_the_local_model_dir(tmp_path):
    from robustdistill.core.errors import CheckpointError
    from robustdistill.data import DataConfig, load_dataset
    from robustdistill.models import ModelSpec, create_model
    from robustdistill.models.robustbench import load_robustbench
    from test_data import _fake_cifar10

    _fake_cifar10(tmp_path / "data", n=10)
    dataset = load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "data"), val_fraction=0.1))
    with pytest.raises(CheckpointError, match=r"models/cifar10/Linf/Standard\.pt"):
        load_robustbench("robustbench:Standard", dataset, str(tmp_path / "models"))
    reference = create_model(ModelSpec("wrn34_10", 10, 3, {"depth": 28, "widen_factor": 10}))
    target = tmp_path / "models" / "cifar10" / "Linf" / "Standard.pt"
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.net.state_dict().items()}}, target)
    model, spec, path = load_robustbench("robustbench:Standard", dataset, str(tmp_path / "models"))
    x = dataset.test.images()[:2]
    assert torch.equal(model.eval()(x), reference.eval()(x)) and spec.kwargs["depth"] == 28 and path == target
    with pytest.raises(CheckpointError, match="is not one this tool builds itself"):
        (tmp_path / "models" / "cifar10" / "Linf" / "Unknown2099.pt").write_bytes(b"")
        load_robustbench("robustbench:Unknown2099", dataset, str(tmp_path / "models"))


def test_transfer_surrogate_is_the_runs_teacher_even_a_foreign_state_dict(trained_runs, tmp_path):
    """Training and `eval` resolve the surrogate through the same teacher loader, so a teacher
    given as a plain state dict plus its architecture works in both."""
    from conftest import digits_config
    from robustdistill.api import evaluate
    from robustdistill.training.loop import train

    teacher, _ = load_model(trained_runs["trades"] / "checkpoints" / "best.safetensors")
    torch.save(teacher.net.state_dict(), tmp_path / "foreign_teacher.pt")
    cfg = digits_config(
        tmp_path,
        "rslad",
        train__epochs=1,
        attack__steps=2,
        eval__attacks="[clean,transfer]",
        eval__subset=40,
        eval__checks="false",
        **{
            "teachers.robust.path": str(tmp_path / "foreign_teacher.pt"),
            "teachers.robust.model": "{name: small_cnn, kwargs: {width: 32}}",
        },
    )
    run = train(cfg)
    assert "transfer" in json.loads((run / "report.json").read_text())["attacks"]
    report = evaluate(run, ["eval.subset=40", "eval.checks=false"], progress=False)
    assert report["data"]["num_samples"] == 40 and report["settings"]["common"]["checks"] is False
    trained = json.loads((run / "report.json").read_text())["attacks"]["transfer"]["verdicts"]
    assert report["attacks"]["transfer"]["verdicts"] == trained  # the same teacher as surrogate: the same verdicts


def test_a_pgd_accuracy_autoattack_beats_by_more_than_a_few_points_is_a_note_and_skipped_checks_say_why():
    from robustdistill.evaluation.report import attack_notes, check_lines, to_markdown

    attacks = {"clean": {"accuracy": 0.9}, "pgd20": {"accuracy": 0.55}, "autoattack_fast": {"accuracy": 0.47}}
    notes = attack_notes(attacks)
    assert notes == [
        "pgd20 overestimates robustness by 8.0 points against autoattack_fast (55.00 % vs 47.00 %): "
        "quote autoattack_fast"
    ]
    assert attack_notes({**attacks, "autoattack_fast": {"accuracy": 0.53}}) == []  # 2 points: within what PGD misses
    assert attack_notes({"clean": {"accuracy": 0.9}, "pgd20": {"accuracy": 0.55}}) == []
    checks = [
        {"id": 1, "name": "eps_zero", "status": "passed", "numbers": {}, "message": "x"},
        {"id": 4, "name": "worst_case", "status": "skipped", "numbers": {}, "message": "needs at least two attacks"},
    ]
    report = {"attacks": attacks, "checks": checks, "notes": notes}
    lines = check_lines(report)
    assert lines[0] == "sanity checks: 1 passed, 1 skipped"
    assert lines[1] == "  skipped 4 worst_case: needs at least two attacks" and lines[2] == f"note: {notes[0]}"
    attacks = {
        k: {
            **v,
            "class_accuracy": [v["accuracy"]] * 2,
            "worst_class_accuracy": 0.1,
            "best_class_accuracy": 0.9,
            "nsd": 0.1,
        }
        for k, v in attacks.items()
    }
    full = {**report, "attacks": attacks, "settings": {"common": {"eps": 0.2}}}
    text = to_markdown(full, title="t")
    assert "- skipped 4 worst_case: needs at least two attacks" in text and f"- {notes[0]}" in text


def test_check_5_reads_the_square_of_the_standard_autoattack_when_no_black_box_attack_ran():
    """AutoAttack's Square attacks the points its white-box parts left robust: breaking more of them
    than sampling noise allows is the black-box evidence of gradient masking that check 5 asks for."""
    from types import SimpleNamespace

    from robustdistill.evaluation.checks import CHECKS

    black_box = CHECKS.get("black_box")
    verdicts = torch.tensor([True] * 55 + [False] * 45)
    parts = {"clean": 0.9, "apgd-ce": 0.6, "apgd-t": 0.56, "fab-t": 0.55, "square": 0.55}
    c = SimpleNamespace(correct={"clean": verdicts, "autoattack": verdicts}, env=SimpleNamespace(parts={}), tol=0.01)
    assert black_box.run(c).passed is None  # no black-box attack and no standard AutoAttack: skipped
    c.env.parts["autoattack"] = parts
    sound = black_box.run(c)
    assert sound.passed and sound.numbers == {
        "white:autoattack apgd-ce+apgd-t+fab-t": 0.55,
        "black:autoattack square (after them)": 0.55,
    }
    masked = black_box.run(
        SimpleNamespace(**{**vars(c), "env": SimpleNamespace(parts={"autoattack": parts | {"square": 0.4}})})
    )
    assert masked.passed is False


@pytest.mark.slow
def test_autoattacks_parts_run_alone_and_the_worst_case_is_taken_over_them(robust_model, digits):
    """apgd_ce, apgd_t and fab_t alone: the report's robust-to-all is the per-sample worst case over
    them; no part alone is held below PGD-20 (check 4 compares whole AutoAttacks only); the fast
    AutoAttack, APGD-CE then APGD-T on what it left, lands within a few points of those two's worst case."""
    from robustdistill.evaluation.metrics import unpack_verdicts

    test = digits.test.take(slice(0, 40))
    parts = ("apgd_ce", "apgd_t", "fab_t")
    out = evaluate_model(robust_model, test, _settings(["clean", "pgd20", *parts, "autoattack_fast"]), 10)
    acc = {k: v["accuracy"] for k, v in out["attacks"].items()}
    assert out["robust_to_all"]["accuracy"] <= min(acc.values())
    assert acc["apgd_ce"] < acc["clean"] and acc["apgd_t"] < acc["clean"]
    both = unpack_verdicts(out["attacks"]["apgd_ce"]["verdicts"], 40) & unpack_verdicts(
        out["attacks"]["apgd_t"]["verdicts"], 40
    )
    assert abs(acc["autoattack_fast"] - both.mean()) <= 0.05
    assert _status(out)["worst_case"] == "passed" and out["settings"]["apgd_t"]["attacks"] == ["apgd-t"]
    assert set(out["autoattack_parts"]) >= {"apgd_ce", "apgd_t", "fab_t", "autoattack_fast"}


def test_a_robustbench_entry_is_evaluated_at_its_leaderboards_budget_and_a_corruptions_entry_is_refused(
    tmp_path, capsys
):
    from robustdistill.cli import main
    from robustdistill.core.errors import CheckpointError
    from robustdistill.models.robustbench import zoo_threat

    assert zoo_threat("robustbench:Zhang2019Theoretically", "cifar10").eps == 8 / 255
    assert zoo_threat("robustbench:X", "imagenet").eps == 4 / 255 and zoo_threat("robustbench:X", "svhn") is None
    l2 = zoo_threat("robustbench:Rebuffi2021Fixing_70_16_cutmix_extra@L2", "cifar10")
    assert (l2.norm, l2.eps) == ("L2", 0.5)
    with pytest.raises(CheckpointError, match="evaluates the Linf and L2 threat models only"):
        zoo_threat("robustbench:Hendrycks2020AugMix_WRN@corruptions", "cifar10")
    base = ["eval", "--data", "cifar10", "--model-dir", str(tmp_path / "models"), "--out", str(tmp_path / "e")]
    assert main([base[0], "robustbench:Hendrycks2020AugMix_WRN@corruptions", *base[1:]]) == 2
    assert "would quote a corruptions entry under the wrong one" in capsys.readouterr().err
    assert main([base[0], "robustbench:Zhang2019Theoretically", *base[1:]]) == 2  # no file: said, not "no eps"
    err = capsys.readouterr().err
    assert "no eps known" not in err and "Zhang2019Theoretically.pt" in err and not (tmp_path / "e").exists()
