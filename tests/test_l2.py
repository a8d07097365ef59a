"""The L2 threat model: PGD-L2's step, projection and random start by hand; every attack in the L2
ball; the configs, the evaluation and its checks under L2; PGD-L2 and AutoAttack-L2 verdicts against
an independent implementation (the Adversarial Robustness Toolbox) on a digits model."""

import json
import math

import pytest
import torch
from torch import nn

from robustdistill.attacks import FGSM, PGD, AttackConfig, EvalSettings, sample_noise
from robustdistill.attacks.pgd import l2_norms, l2_start, project
from robustdistill.core.errors import ConfigError
from robustdistill.core.threat import ThreatModel
from robustdistill.evaluation.config import EvalConfig
from robustdistill.evaluation.suite import evaluate_model
from robustdistill.methods import METHODS, Context, base, create_method
from robustdistill.models import ModelSpec, create_model
from robustdistill.training.config import load_config


class Linear2(nn.Module):
    """Two logits, (0, w . x): the CW margin of class 0 is w . x, its gradient w."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w).view(1, -1), requires_grad=False)

    def forward(self, x):
        second = (x.flatten(1) * self.w).sum(1)
        return torch.stack([torch.zeros_like(second), second], dim=1)


def _pgd(model, eps, step, steps, **kw):
    return PGD(model, eps, step, steps, loss="cw", start="none", fold_batchnorm=False, norm="L2", **kw)


def test_a_pgd_l2_step_by_hand():
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.tensor([0])
    model = Linear2([3.0, 4.0, 0.0, 0.0])  # the gradient's direction: (0.6, 0.8, 0, 0)
    # inside the ball: one step of 0.1 along the unit gradient
    out = _pgd(model, eps=1.0, step=0.1, steps=1)(x, y)
    assert torch.allclose(out.flatten(), torch.tensor([0.56, 0.58, 0.5, 0.5]))
    # beyond it: the step of length 0.1 is scaled back onto the sphere of radius 0.05
    out = _pgd(model, eps=0.05, step=0.1, steps=1)(x, y)
    assert torch.allclose(out.flatten(), torch.tensor([0.53, 0.54, 0.5, 0.5]))
    # three steps of 0.02 along the same direction: 0.06 long, projected to 0.05
    out = _pgd(model, eps=0.05, step=0.02, steps=3)(x, y)
    assert torch.allclose(out.flatten(), torch.tensor([0.53, 0.54, 0.5, 0.5]))
    # the L-inf PGD of the same budget steps along the sign instead: (0.05, 0.05, 0, 0)
    linf = PGD(model, 0.05, 0.1, 1, loss="cw", start="none", fold_batchnorm=False)(x, y)
    assert torch.allclose(linf.flatten(), torch.tensor([0.55, 0.55, 0.5, 0.5]))


def test_the_l2_projection_by_hand():
    x = torch.tensor([[0.5, 0.5]])
    # (0.3, 0.4) is 0.5 long: onto the radius-0.25 sphere, (0.15, 0.2); inside the ball, unchanged
    assert torch.allclose(project(x + torch.tensor([[0.3, 0.4]]), x, 0.25, "L2"), torch.tensor([[0.65, 0.7]]))
    assert torch.allclose(project(x + torch.tensor([[0.03, 0.04]]), x, 0.25, "L2"), torch.tensor([[0.53, 0.54]]))
    # then onto [0, 1]: (0.9, 0) from (0.5, 0.5) at radius 0.6 is 0.6 long, its tip clipped to 1
    assert torch.allclose(project(torch.tensor([[1.4, 0.5]]), x, 0.6, "L2"), torch.tensor([[1.0, 0.5]]))
    # one radius per sample
    twice = torch.tensor([[0.3, 0.4], [0.3, 0.4]])
    out = project(torch.full((2, 2), 0.5) + twice, torch.full((2, 2), 0.5), torch.tensor([[0.25], [1.0]]), "L2")
    assert torch.allclose(out, torch.tensor([[0.65, 0.7], [0.8, 0.9]]))
    assert torch.allclose(l2_norms(torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])).flatten(), torch.tensor([5.0, 1.0]))


def test_the_l2_random_start_is_uniform_in_radius_and_direction_and_a_function_of_the_noise():
    noise = sample_noise(torch.arange(4000), (1, 4, 4), seed=3)
    start = l2_start(noise, 0.5)
    radius = l2_norms(start).flatten() / 0.5
    assert radius.max() <= 1 + 1e-6
    # a radius uniform in [0, eps]: its mean 1/2 and quartiles 1/4, 3/4 (standard errors < 0.01)
    assert abs(radius.mean().item() - 0.5) < 0.03
    assert abs((radius < 0.25).float().mean().item() - 0.25) < 0.03
    assert abs((radius < 0.75).float().mean().item() - 0.75) < 0.03
    # a direction uniform on the sphere: every coordinate of the unit vectors averages 0
    unit = start.flatten(1) / l2_norms(start).view(-1, 1)
    assert unit.mean(0).abs().max() < 0.05
    assert torch.equal(l2_start(noise[:7], 0.5), start[:7])  # a sample's start is its own noise's


@pytest.mark.parametrize("eps", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("loss, start", [("ce", "uniform"), ("ce", "gaussian"), ("cw", "uniform"), ("kl", "none")])
def test_every_l2_attack_stays_in_the_l2_ball_and_the_image_range(eps, loss, start):
    torch.manual_seed(0)
    model = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    x = torch.rand(16, 1, 8, 8)
    x[:4], x[4:8] = 0.0, 1.0
    y = torch.randint(0, 10, (16,))
    target = torch.softmax(torch.randn(16, 10), dim=1)
    attacks = [PGD(model, eps, eps / 4 + 1e-3, 5, loss, start, norm="L2"), FGSM(model, eps, loss, norm="L2")]
    for attack in attacks:
        x_adv = attack(x, y, target=target if loss == "kl" else None)
        assert l2_norms(x_adv - x).max() <= eps * (1 + 1e-5) + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        if eps == 0.0:
            assert torch.equal(x_adv, x)
    # per-sample budgets: each sample in its own ball
    budgets = torch.linspace(0.0, 1.0, 16)
    x_adv = PGD(model, budgets, budgets / 4, 5, "ce", "uniform", norm="L2")(x, y)
    assert (l2_norms(x_adv - x).flatten() <= budgets * (1 + 1e-5) + 1e-6).all()


def test_fgsm_l2_moves_each_sample_by_eps_along_its_gradient():
    x = torch.full((3, 1, 2, 2), 0.5)
    model = Linear2([1.0, -2.0, 2.0, 0.0])
    out = FGSM(model, 0.3, loss="cw", norm="L2")(x, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(l2_norms(out - x).flatten(), torch.full((3,), 0.3))
    assert torch.allclose((out - x)[0].flatten(), torch.tensor([0.1, -0.2, 0.2, 0.0]))


def test_configs_take_the_norm_with_its_own_budget_rules():
    a = AttackConfig(eps=0.5, norm="l2", steps=10)
    a.validate()
    assert a.threat == ThreatModel(0.5, "L2") and a.step == pytest.approx(0.125)  # 2.5 eps / steps
    assert AttackConfig(eps=8 / 255).step == pytest.approx(2 / 255)
    with pytest.raises(ConfigError, match="unknown norm 'l1'; use one of linf, l2"):
        AttackConfig(norm="l1").validate()
    with pytest.raises(ConfigError, match="attack.eps is an L2 budget on images in \\[0, 1\\].*128 looks like 0-255"):
        AttackConfig(eps=128, norm="l2").validate()
    with pytest.raises(ConfigError, match="attack.eps must be in \\[0, 1\\]"):
        AttackConfig(eps=0.5 * 3, norm="linf").validate()
    run = ThreatModel(8 / 255)
    settings = EvalConfig(norm="l2", eps=0.5).resolve(run)
    assert settings.threat == ThreatModel(0.5, "L2") and settings.step_size == 0.125 and settings.large_eps is None
    assert EvalConfig().resolve(ThreatModel(0.5, "L2")).threat.norm == "L2"  # the run's norm by default
    with pytest.raises(ConfigError, match="eval.norm=l2 is not the model's threat model \\(L-inf, eps 8/255\\)"):
        EvalConfig(norm="l2").resolve(run)
    with pytest.raises(ConfigError, match="eval.eps must be in \\[0, 1\\]"):
        EvalConfig(eps=0.5 * 3).resolve(run)
    with pytest.raises(ConfigError, match="eval.step_size must be in \\(0, 1\\] under L-inf, eps 8/255"):
        EvalConfig(step_size=2).resolve(run)
    assert ThreatModel(0.5, "L2").describe() == "L2, eps 0.5" and run.describe() == "L-inf, eps 8/255"
    assert ThreatModel(0.2).describe() == "L-inf, eps 0.2" and ThreatModel(4 / 255).describe() == "L-inf, eps 4/255"


def _l2_settings(attacks, eps=0.5, **kw):
    return EvalSettings(
        **{"threat": ThreatModel(eps, "L2"), "step_size": eps / 4, "attacks": tuple(attacks), "checks": True}
        | {"checks_subset": 120, "square_queries": 300, "large_eps": None}
        | kw
    )


def test_the_evaluation_and_its_checks_hold_in_the_l2_ball(natural_model, digits):
    test = digits.test.take(slice(0, 120))
    out = evaluate_model(natural_model, test, _l2_settings(["clean", "fgsm", "pgd20", "cw20", "square"]), 10)
    status = {c["name"]: c for c in out["checks"]}
    assert all(c["status"] in ("passed", "skipped") for c in status.values()), status
    assert status["perturbation"]["status"] == "passed" and status["large_eps"]["status"] == "passed"
    assert out["settings"]["common"]["norm"] == "L2" and out["settings"]["common"]["eps"] == 0.5
    acc = {k: v["accuracy"] for k, v in out["attacks"].items()}
    assert acc["pgd20"] <= acc["fgsm"] < acc["clean"]
    assert out["settings"]["common"]["large_eps"] is None and status["large_eps"]["numbers"]["eps"] == 8.0
    # the L-inf ball of radius eps / 8 lies inside the L2 ball of radius eps around 8x8 images
    # (|d|_2 <= 8 |d|_inf): PGD-L2 finds at least as much, up to an attack's imperfection
    linf = EvalSettings(ThreatModel(0.5 / 8), step_size=0.5 / 32, attacks=("clean", "pgd20"))
    assert acc["pgd20"] <= evaluate_model(natural_model, test, linf, 10)["attacks"]["pgd20"]["accuracy"] - 0.1


def _art_classifier(model):
    from art.estimators import classification as art

    return art.PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0)
    )


def test_pgd_l2_agrees_with_an_independent_implementation(natural_model, digits):
    """ART's PGD-L2 (normalised gradient step, scaling onto the ball; it clips to [0, 1] before
    projecting, this tool after: the same point unless a pixel leaves [0, 1]), from x itself."""
    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    test = digits.test.take(slice(0, 200))
    eps, step, steps = 0.5, 0.125, 10
    ours = PGD(natural_model, eps, step, steps, "ce", "none", fold_batchnorm=False, norm="L2")(test.x, test.y)
    attack = ProjectedGradientDescentPyTorch(
        _art_classifier(natural_model), norm=2, eps=eps, eps_step=step, max_iter=steps, num_random_init=0,
        batch_size=200, verbose=False,
    )  # fmt: skip
    theirs = torch.from_numpy(attack.generate(test.x.numpy(), test.y.numpy()))
    assert l2_norms(theirs - test.x).max() <= eps + 1e-4
    with torch.no_grad():
        right_ours = natural_model(ours).argmax(1) == test.y
        right_theirs = natural_model(theirs).argmax(1) == test.y
        clean = (natural_model(test.x).argmax(1) == test.y).float().mean().item()
    assert right_ours.float().mean() < clean - 0.2  # an attack that bites, else agreement says little
    assert (right_ours == right_theirs).float().mean() >= 0.97
    assert abs(right_ours.float().mean() - right_theirs.float().mean()) <= 0.02
    # where no pixel can reach 0 or 1 (images in [0.4, 0.6], eps 0.1), step for step the same points
    x = 0.4 + 0.2 * torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = PGD(natural_model, 0.1, 0.03, steps, "ce", "none", fold_batchnorm=False, norm="L2")(x, test.y[:64])
    attack = ProjectedGradientDescentPyTorch(
        _art_classifier(natural_model), norm=2, eps=0.1, eps_step=0.03, max_iter=steps, num_random_init=0,
        batch_size=64, verbose=False,
    )  # fmt: skip
    theirs = torch.from_numpy(attack.generate(x.numpy(), test.y[:64].numpy()))
    assert (l2_norms(ours - x).flatten() > 0.099).float().mean() > 0.5  # most reach the sphere
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_autoattack_l2_agrees_with_an_independent_implementation(natural_model, digits):
    """AutoAttack-L2 (pyautoattack, norm L2) against ART's APGD-CE and APGD-DLR at the same budget:
    APGD-CE then APGD-T (AutoAttack's gradient part) is at most their worst case plus a few
    samples, and APGD-CE alone agrees with ART's APGD-CE."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    test = digits.test.take(slice(0, 200))
    eps = 0.5
    attacks = ["clean", "apgd_ce", "autoattack_fast"]  # the whole ensemble's FAB-T and Square add a minute
    out = evaluate_model(natural_model, test, _l2_settings(attacks, eps, checks=False), 10)
    classifier = _art_classifier(natural_model)
    right = {}
    for loss in ("cross_entropy", "difference_logits_ratio"):
        attack = AutoProjectedGradientDescent(
            classifier, norm=2, eps=eps, eps_step=2 * eps, max_iter=100, nb_random_init=1, batch_size=200,
            loss_type=loss, verbose=False,
        )  # fmt: skip
        torch.manual_seed(0)
        x_adv = torch.from_numpy(attack.generate(test.x.numpy(), test.y.numpy()))
        assert l2_norms(x_adv - test.x).max() <= eps + 1e-4
        with torch.no_grad():
            right[loss] = natural_model(x_adv).argmax(1) == test.y
    art_ce = right["cross_entropy"].float().mean().item()
    art_worst = (right["cross_entropy"] & right["difference_logits_ratio"]).float().mean().item()
    acc = {k: v["accuracy"] for k, v in out["attacks"].items()}
    assert acc["clean"] - art_worst > 0.2  # the budget bites
    assert acc["autoattack_fast"] <= art_worst + 0.02
    assert abs(acc["apgd_ce"] - art_ce) <= 0.04
    assert math.isclose(out["settings"]["common"]["eps"], eps) and out["settings"]["common"]["norm"] == "L2"


@pytest.mark.parametrize("name", METHODS.names())
def test_every_methods_inner_maximisation_runs_in_the_l2_ball(name, monkeypatch):
    seen = []

    class Recorded(PGD):
        def run(self, x, y=None, target=None, noise=None):
            found = super().run(x, y, target, noise)
            eps = self.eps.max().item() if isinstance(self.eps, torch.Tensor) else self.eps
            seen.append((self.norm, l2_norms(found.x_adv - x).max().item(), eps))
            return found

    monkeypatch.setattr(base, "PGD", Recorded)
    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    teacher = create_model(ModelSpec("small_cnn", 10, 1, {"width": 8})).eval()
    attack = AttackConfig(eps=0.5, norm="l2", steps=3)
    method = create_method(load_config(None, [f"method={name}"]).method, Context(student, student, 10, attack, {
        "robust": teacher, "clean": teacher}))  # fmt: skip
    student.train()
    loss, _ = method.loss(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert torch.isfinite(loss)
    if name != "natural":
        assert seen and all(norm == "L2" and moved <= eps * (1 + 1e-5) + 1e-6 for norm, moved, eps in seen), seen
        assert max(moved for _, moved, _ in seen) > 0.5 / 8  # it moved: not a zero-budget attack


@pytest.mark.slow
def test_an_l2_student_trains_and_is_evaluated_under_l2_through_the_cli(
    tmp_path, monkeypatch, capsys, natural_model, digits
):
    """Digits, end to end as a user runs it: TRADES in the L2 ball learns L2 robustness that the
    natural model lacks; the run's evaluations default to its threat model and every report says it."""
    from robustdistill.cli import main

    monkeypatch.chdir(tmp_path)
    train = ["train", "trades", "attack.norm=l2", "attack.eps=0.5", "train.epochs=6", "eval.attacks=[clean,pgd20]"]
    assert main([*train, "name=l2"]) == 0
    assert "threat model: L2, eps 0.5\n" in capsys.readouterr().out
    report = json.loads((tmp_path / "runs/l2/report.json").read_text())
    assert report["settings"]["common"]["norm"] == "L2" and report["settings"]["common"]["eps"] == 0.5
    assert "- threat model: L2, eps 0.5," in (tmp_path / "runs/l2/report.md").read_text()
    assert main(["eval", "runs/l2", "--attacks", "clean,pgd20,square", "--subset", "120", "--out", "e"]) == 0
    out = json.loads((tmp_path / "e/report.json").read_text())
    assert out["settings"]["common"]["norm"] == "L2"
    assert all(c["status"] != "failed" for c in out["checks"]), out["checks"]
    bounds = next(c for c in out["checks"] if c["name"] == "perturbation")["numbers"]
    assert all(b["max_l2"] <= 0.5 + 1e-5 for b in bounds.values())
    assert bounds["square"]["max_linf"] > 0.0625  # an L2 search: beyond eps / sqrt(64) in a pixel
    learned = out["attacks"]["pgd20"]["accuracy"]
    settings = _l2_settings(["clean", "pgd20"], checks=False)
    natural = evaluate_model(natural_model, digits.test.take(slice(0, 120)), settings, 10)["attacks"]["pgd20"][
        "accuracy"
    ]
    assert learned >= natural + 0.2, (learned, natural)
    # the same model under L-inf needs its budget; given one, the report says which threat model it ran
    assert main(["eval", "runs/l2", "--norm", "linf", "--out", "f"]) == 2
    assert "give its budget too" in capsys.readouterr().err and not (tmp_path / "f").exists()
    assert (
        main(["eval", "runs/l2", "--norm", "linf", "--eps", "0.1", "--subset", "60", "--no-checks", "--out", "f"]) == 0
    )
    assert "threat model: L-inf, eps 0.1" in capsys.readouterr().out


def test_a_comparison_says_its_threat_model_and_warns_when_the_runs_differ():
    from robustdistill.studies.figures import threat_words
    from robustdistill.studies.render import _threat_lines

    one = {"L2, eps 0.5": ["a", "b"]}
    assert _threat_lines(one) == ["", "Threat model: L2, eps 0.5 (every run)."]
    assert threat_words({"threat_models": one}) == "L2, eps 0.5"
    two = {"L2, eps 0.5": ["b"], "L-inf, eps 8/255": ["a"]}
    lines = _threat_lines(two)
    assert "do not compare" in lines[1] and lines[2:] == ["- L2, eps 0.5: b", "- L-inf, eps 8/255: a"]
    assert threat_words({"threat_models": two}) == "threat models differ"


def test_the_cifar10_l2_recipes_train_and_evaluate_at_robustbenchs_l2_budget():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[1] / "configs" / "cifar10").glob("*_l2.yaml"))
    assert {p.stem for p in paths} >= {"trades_wrn34_10_l2", "absld_resnet18_l2", "bmtard_resnet18_l2"}
    for path in paths:
        cfg = load_config(path)
        assert cfg.threat == ThreatModel(0.5, "L2") and cfg.attack.step == pytest.approx(0.125), path
        assert cfg.eval.resolve(cfg.threat).threat == ThreatModel(0.5, "L2") and "autoattack" in cfg.eval.attacks
