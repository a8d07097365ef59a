"""The baselines the seed papers compare against: each loss against an independent re-derivation
on tiny tensors, and a short digits run that beats an untrained model under PGD-20."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import digits_config
from robustdistill.attacks import PGD, EvalSettings
from robustdistill.core.threat import ThreatModel
from robustdistill.evaluation.metrics import wilson_interval
from robustdistill.evaluation.suite import evaluate_model
from robustdistill.methods.ard import ard_kl
from robustdistill.methods.fair_ard import class_weights, weighted_distillation
from robustdistill.methods.iad import iad_loss
from robustdistill.methods.mart import mart_loss
from robustdistill.models import ModelSpec, create_model


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_mart_loss_against_its_equations():
    logits_nat = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    logits_adv = torch.tensor([[0.5, 1.5, -0.5], [1.0, -2.0, 0.0]])
    y = torch.tensor([0, 2])
    boosted, robust = mart_loss(logits_nat, logits_adv, y, beta=6.0)
    p_nat, p_adv, yy = (
        _softmax(logits_nat.numpy().astype(np.float64)),
        _softmax(logits_adv.numpy().astype(np.float64)),
        y.numpy(),
    )
    rows = np.arange(2)
    masked = p_adv.copy()
    masked[rows, yy] = -1
    wrong = masked.argmax(axis=1)  # the most likely wrong class: 1 for the first sample, 0 for the second
    assert wrong.tolist() == [1, 0]
    expected_boosted = np.mean(-np.log(p_adv[rows, yy])) + np.mean(-np.log(1.0001 - p_adv[rows, wrong] + 1e-12))
    kl = (p_nat * (np.log(p_nat) - np.log(p_adv + 1e-12))).sum(axis=1)
    expected_robust = np.mean(kl * (1.0000001 - p_nat[rows, yy]))
    assert boosted.item() == pytest.approx(expected_boosted, rel=1e-5)
    assert robust.item() == pytest.approx(expected_robust, rel=1e-5)


def test_ard_kl_by_hand():
    # teacher softmax [1/4, 3/4], student [1/2, 1/2]: KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; the mean
    # over the B x C = 2 entries halves it; the temperature leaves the distributions (logits scaled with it)
    # and multiplies by tau^2
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert ard_kl(torch.tensor([[0.0, math.log(3)]]), torch.zeros(1, 2), 1.0).item() == pytest.approx(kl / 2, rel=1e-6)
    assert ard_kl(torch.tensor([[0.0, 2 * math.log(3)]]), torch.zeros(1, 2), 2.0).item() == pytest.approx(
        4 * kl / 2, rel=1e-6
    )


def test_iad_loss_against_its_equations():
    torch.manual_seed(0)
    t_clean, t_adv, s_clean, s_adv = (torch.randn(4, 5) for _ in range(4))
    y = torch.tensor([0, 1, 2, 3])
    d, intro, ce, trust = iad_loss(t_clean, t_adv, s_clean, s_adv, y, temperature=2.0, beta=0.1, introspect=True)
    tc, ta, sc, sa = (
        _softmax(z.numpy().astype(np.float64) / tau)
        for z, tau in [(t_clean, 2.0), (t_adv, 1.0), (s_clean, 1.0), (s_adv, 1.0)]
    )
    sa_t = _softmax(s_adv.numpy().astype(np.float64) / 2.0)
    rows = np.arange(4)
    expected_trust = ta[rows, y.numpy()] ** 0.1
    assert trust.numpy() == pytest.approx(expected_trust, rel=1e-5)
    assert d.item() == pytest.approx(4 * np.mean((tc * np.log(tc / sa_t)).sum(axis=1)), rel=1e-5)
    assert intro.item() == pytest.approx(np.mean((sc * np.log(sc / sa)).sum(axis=1) * (1 - expected_trust)), rel=1e-5)
    assert ce.item() == pytest.approx(np.mean(-np.log(sc[rows, y.numpy()])), rel=1e-5)
    # before `begin_epoch` the teacher is trusted everywhere: no introspection term
    _, intro, _, trust = iad_loss(t_clean, t_adv, s_clean, s_adv, y, temperature=2.0, beta=0.1, introspect=False)
    assert intro.item() == 0.0 and torch.all(trust == 1)


def test_adaad_inner_maximisation_differentiates_through_teacher_and_student():
    """One full step from x: the sign of the gradient of sum KL(softmax(t(x)) || softmax(s(x))) with
    the teacher's path included (the authors' code does not detach the teacher)."""
    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4})).eval()
    teacher = create_model(ModelSpec("small_cnn", 10, 1, {"width": 8})).eval().requires_grad_(False)
    x = torch.rand(6, 1, 8, 8) * 0.8 + 0.1
    x_req = x.clone().requires_grad_(True)
    q = torch.softmax(teacher(x_req), dim=1)
    kl = (q * (torch.log(q) - torch.log_softmax(student(x_req), dim=1))).sum()
    (grad,) = torch.autograd.grad(kl, x_req)
    expected = (x + 0.05 * grad.sign()).clamp(0, 1)
    got = PGD(student, 0.05, 0.05, 1, loss="kl", start="none")(x, target=teacher)
    assert torch.allclose(got, expected, atol=1e-6)
    # the teacher's path matters: without it the step differs somewhere
    q_fixed = q.detach()
    kl_fixed = (q_fixed * (torch.log(q_fixed) - torch.log_softmax(student(x_req), dim=1))).sum()
    (grad_fixed,) = torch.autograd.grad(kl_fixed, x_req)
    assert not torch.equal(grad.sign(), grad_fixed.sign())


def test_fair_ard_class_weights_by_hand():
    # kappa [1, 2, 4], beta 2: (1/kappa)^2 = [1, 1/4, 1/16], rescaled to sum 3: [2.2857, 0.5714, 0.1429],
    # clipped to [5/6, 5/2]
    w = class_weights(torch.tensor([1.0, 2.0, 4.0]), beta=2.0)
    assert w.tolist() == pytest.approx([48 / 21, 5 / 6, 5 / 6], rel=1e-4)
    assert class_weights(torch.full((4,), 3.0), beta=2.0).tolist() == pytest.approx([1.0] * 4)  # equal classes: 1


def test_fair_ard_loss_against_its_equations():
    torch.manual_seed(0)
    t, s_adv, s_clean = (torch.randn(4, 3) for _ in range(3))
    y, weight = torch.tensor([0, 1, 2, 1]), torch.tensor([2.0, 1.0, 0.5])
    distill, natural = weighted_distillation(t, s_adv, s_clean, y, weight, temperature=4.0)
    q, p = _softmax(t.numpy().astype(np.float64) / 4), _softmax(s_adv.numpy().astype(np.float64) / 4)
    w = weight.numpy()[y.numpy()]
    assert distill.item() == pytest.approx(16 * np.mean(w * (q * np.log(q / p)).mean(axis=1)), rel=1e-5)
    pc = _softmax(s_clean.numpy().astype(np.float64))
    assert natural.item() == pytest.approx(np.mean(w * -np.log(pc[np.arange(4), y.numpy()])), rel=1e-5)


def test_pgd_counts_the_iterates_each_sample_survives():
    torch.manual_seed(0)
    model = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4})).eval()
    x = torch.rand(6, 1, 8, 8)
    predicted = model(x).argmax(dim=1).detach()
    y = torch.where(torch.arange(6) < 3, predicted, (predicted + 1) % 10)  # three right, three wrong
    found = PGD(model, 0.0, 0.0, 4, start="none", count_correct=True).run(x, y)  # eps 0: every iterate is x
    assert found.correct.tolist() == [4, 4, 4, 0, 0, 0] and torch.equal(found.x_adv, x)
    assert PGD(model, 0.0, 0.0, 4, start="none").run(x, y).correct is None  # counted only when asked


def test_fair_ard_reweights_the_less_robust_class_after_an_epoch():
    from robustdistill.attacks import AttackConfig
    from robustdistill.methods import Context, Progress, create_method
    from robustdistill.training.config import load_config

    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 3, 1, {"width": 4}))
    teacher = create_model(ModelSpec("small_cnn", 3, 1, {"width": 4})).eval()
    ctx = Context(student, student, 3, AttackConfig(eps=0.0, step_size=0.01, steps=4), {"robust": teacher})
    method = create_method(load_config(None, ["method=fair_ard"]).method, ctx)
    x = torch.rand(9, 1, 8, 8)
    predicted = student.eval()(x).argmax(dim=1).detach()
    student.train()
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    method.loss(x, y)
    method.on_epoch_end(Progress())
    # eps 0: a sample survives all 4 iterates if the student predicts its label, none otherwise
    right = (predicted == y).float().view(3, 3).mean(dim=1) * 4
    assert method.kappa.tolist() == pytest.approx(right.tolist())
    assert method.weight.tolist() == pytest.approx(class_weights(right, 2.0).tolist())
    assert method.log_state()["class_weight"] == method.weight.tolist()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["mart", "ard", "iad", "adaad", "igdm", "saad", "ciard", "fair_ard", "frl", "cfa", "bat"]
)
def test_a_short_digits_run_beats_an_untrained_model(name, tmp_path, trained_runs, digits):
    from robustdistill.training.loop import train

    # 13 epochs at the recipe's first lr; validated once at the end, except where the method adapts
    # to the validation split (FRL, CFA) or averages its weights (SAAD) every epoch
    validated = {} if name in ("frl", "cfa", "saad") else {"train__eval_every": 13}
    if name == "saad":  # its weight average from epoch 7
        validated["method__average_from"] = 7
    if name == "ciard":  # its teacher learns from epoch 3, its lr decays from epoch 7; the clean teacher
        validated.update(method__teacher_from=3, train__decay_from=6)
        validated["teachers.clean.path"] = str(trained_runs["natural"])
    cfg = digits_config(
        tmp_path,
        name,
        train__epochs=13,
        train__milestones="[]",
        eval__checks="false",
        **validated,
        **({} if name in ("mart", "frl", "cfa", "bat") else {"teachers.robust.path": str(trained_runs["trades"])}),
    )
    run = train(cfg)
    trained = json.loads((run / "report.json").read_text())["attacks"]["pgd20"]["accuracy"]
    torch.manual_seed(0)
    untrained = create_model(ModelSpec("small_cnn", 10, 1, {"width": 16})).eval()
    settings = EvalSettings(ThreatModel(cfg.attack.eps), step_size=cfg.attack.eps / 4, attacks=("pgd20",))
    baseline = evaluate_model(untrained, digits.test, settings, 10)["attacks"]["pgd20"]["accuracy"]
    n = len(digits.test)
    # beyond the test set's noise: the 95 % Wilson intervals (359 images) do not overlap
    assert wilson_interval(trained * n, n)[0] > wilson_interval(baseline * n, n)[1], (trained, baseline)


def test_class_wise_state_is_drawn(tmp_path):
    from robustdistill.evaluation.plots import plot_class_state

    records = [{"type": "epoch", "epoch": e, "class_weight": [1.0, 1.0 + e / 10], "loss": 1.0} for e in range(1, 4)]
    assert plot_class_state(records, tmp_path / "s.png") and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_class_state([{"type": "epoch", "epoch": 1, "loss": 1.0}], tmp_path / "none.png")


def test_frl_multiplier_helpers_by_hand():
    from robustdistill.methods.frl import cost_weights, normalize_multipliers

    lam = normalize_multipliers(torch.tensor([0.3, -0.1, 0.4]), 0.5)  # clip at 0, then the sum 0.7 scaled to 0.5
    assert lam.tolist() == pytest.approx([0.3 * 5 / 7, 0.0, 0.4 * 5 / 7])
    assert normalize_multipliers(torch.tensor([0.1, 0.2]), 0.5).tolist() == pytest.approx([0.1, 0.2])  # under the limit
    w = cost_weights(torch.tensor([0.2, 0.0, 0.1]))  # 1/3 + lam - 0.3/3
    assert w.tolist() == pytest.approx([1 / 3 + 0.1, 1 / 3 - 0.1, 1 / 3]) and w.sum().item() == pytest.approx(1.0)


def _frl(*overrides, num_classes=3):
    from robustdistill.attacks import AttackConfig
    from robustdistill.methods import Context, create_method
    from robustdistill.training.config import load_config

    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", num_classes, 1, {"width": 4}))
    ctx = Context(student, student, num_classes, AttackConfig(eps=0.1, step_size=0.025, steps=2))
    return create_method(load_config(None, ["method=frl", *overrides]).method, ctx)


def _summary(clean, robust):
    return {
        "attacks": {
            "clean": {"accuracy": sum(clean) / len(clean), "class_accuracy": clean},
            "pgd20": {"accuracy": sum(robust) / len(robust), "class_accuracy": robust},
        }
    }


def test_frl_multiplier_update_by_hand():
    from robustdistill.methods import Progress

    # clean errors [0.1, 0.2, 0.6] (mean 0.3), boundary errors 0.3 each (mean 0.3), delta 0.1:
    # gamma_clean = [-0.3, -0.2, 0.2], gamma_bndy = [-0.1] * 3; r = 0.05
    summary = _summary([0.9, 0.8, 0.4], [0.6, 0.5, 0.1])
    method = _frl()
    method.on_validation(summary, Progress(epoch=0))
    assert method.lam[0].tolist() == pytest.approx([0.0, 0.0, 0.01])  # clipped at 0
    assert method.lam[1].tolist() == pytest.approx([0.0, 0.0, 0.0]) and method.lam[2].tolist() == [0.0, 0.0, 0.0]
    w0, w1, scale = method.weights()
    assert w0.tolist() == pytest.approx([1 / 3 - 0.01 / 3, 1 / 3 - 0.01 / 3, 1 / 3 + 0.02 / 3])
    assert scale.tolist() == [1.0, 1.0, 1.0]  # reweight: no remargin
    # remargin (delta 0.07: gamma_bndy = -0.07): lam2 moves by r2 = 0.2 times it: exp(2 * -0.014) = 0.972,
    # clipped at 0.98
    method = _frl("method.variant=remargin")
    method.on_validation(summary, Progress(epoch=0))
    assert method.lam[2].tolist() == pytest.approx([-0.014] * 3)
    assert method.weights()[2].tolist() == pytest.approx([0.98] * 3)
    # r halves at the 40th epoch: the update after (0-based) epoch 38 is the official one before epoch 40
    late = _frl()
    late.on_validation(summary, Progress(epoch=38))
    assert late.lam[0].tolist() == pytest.approx([0.0, 0.0, 0.005])


def test_frl_loss_is_the_weighted_trades_loss():
    method = _frl()
    method.ctx.attack = type(method.ctx.attack)(eps=0.0, step_size=0.01, steps=1)  # x_adv = x: the KL term vanishes
    method.lam[0] = torch.tensor([0.3, 0.0, 0.1])
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    method.student.eval()  # the same logits for every pass
    loss, _ = method.loss(x, y)
    w = method.weights()[0][y]
    ce = F.cross_entropy(method.student(x), y, reduction="none")
    assert loss.item() == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-5)
    remargin = _frl("method.variant=remargin")
    remargin.lam[2] = torch.tensor([0.2, 0.0, -0.1])  # class budgets 0.1 * [1.49, 1, 0.98], step max / 4
    loss, _ = remargin.loss(x, y)
    assert torch.isfinite(loss)


def test_frl_needs_a_validation_every_epoch(tmp_path):
    from robustdistill.core.errors import ConfigError
    from robustdistill.training.loop import train

    for override in ("train__eval_every=2", "train__select_on=test"):
        key, value = override.split("=")
        cfg = digits_config(tmp_path, "frl", **{key: value})
        with pytest.raises(ConfigError, match="needs train.eval_every=1 and train.select_on=val"):
            train(cfg)
    assert not (tmp_path / "runs").exists()
