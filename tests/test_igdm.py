"""IGDM (method.igdm): compared step by step with the official training step (HongsinLee/saad,
igdm.py: AdaAD + IGDM) on identical inputs, its schedule by hand, its term added identically to
every host method, and its options refused in one line where they do not belong."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdistill.attacks import AttackConfig
from robustdistill.cli import main
from robustdistill.core.errors import ConfigError
from robustdistill.methods import Context, Progress, create_method
from robustdistill.methods.gradient_matching import IGDMOptions, igdm_loss, igdm_weight
from robustdistill.models import ModelSpec, create_model
from robustdistill.training.config import load_config


def test_the_warm_up_by_hand():
    options = IGDMOptions(igdm=2.0, igdm_epochs=4)
    assert [igdm_weight(options, e, 10) for e in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert igdm_weight(IGDMOptions(igdm=1.0), 49, 200) == 0.25  # E defaults to the run's epochs
    assert igdm_weight(IGDMOptions(), 5, 10) == 0.0


def test_the_loss_by_hand_on_a_linear_student_and_teacher():
    """For linear models t(x) = A x, s(x) = B x: t(x+d) - t(x-d) = 2 A d, so the term is the KL
    between softmax(2 A d) and softmax(2 B d), whatever x."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3, bias=True), nn.Linear(4, 3, bias=True)
    x, d = torch.rand(5, 4), 0.1 * torch.randn(5, 4)
    p, log_q = F.softmax(2 * d @ a.weight.T, 1), F.log_softmax(2 * d @ b.weight.T, 1)
    expected = (p * (p.log() - log_q)).sum() / 5
    assert igdm_loss(b, a, x, x + d).item() == pytest.approx(expected.item(), rel=1e-5)
    assert igdm_loss(a, a, x, x + d).item() == pytest.approx(0.0, abs=1e-6)  # the teacher's own gradient


def _official_igdm_step(student, teacher, X, inputs_adv, optimizer, epoch, epochs, igdm_alpha):
    """One training step of the official igdm.py (AdaAD + IGDM), its inner maximisation's output
    given: the same operations in the same order (batchmean KLDivLoss, the student on X + delta and
    X - delta, the teacher on inputs_adv and X - delta, the weight alpha * epoch / epochs)."""
    kl = nn.KLDivLoss(reduction="batchmean")
    optimizer.zero_grad()
    with torch.no_grad():
        delta = inputs_adv - X
        teacher_plus = teacher(inputs_adv)
        teacher_minus = teacher(X - delta)
    student_plus = student(X + delta)
    student_minus = student(X - delta)
    igdm = kl(F.log_softmax(student_plus - student_minus, dim=1), F.softmax((teacher_plus - teacher_minus).detach(), 1))
    kl_loss = kl(F.log_softmax(student_plus, dim=1), F.softmax(teacher_plus, dim=1))
    loss = kl_loss + igdm_alpha * (epoch / epochs) * igdm
    loss.backward()
    optimizer.step()
    return loss.detach()


def _pair(name="adaad", overrides=()):
    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    teacher = create_model(ModelSpec("small_cnn", 10, 1, {"width": 8})).eval()
    cfg = load_config(None, [f"method={name}", *overrides])
    ctx = Context(student, student, 10, AttackConfig(eps=0.1, step_size=0.025, steps=3), {"robust": teacher})
    ctx.teachers["clean"] = teacher
    return create_method(cfg.method, ctx), student, teacher


def _fixed_attack(method, x_adv):
    """The method's inner maximisation replaced by one that returns `x_adv` (identical inputs)."""
    method.attack = lambda *args, **kwargs: lambda x, *a, **k: x_adv


@pytest.mark.parametrize(
    "name, overrides", [("igdm", ["method.igdm=3"]), ("adaad", ["method.igdm=3", "method.reduction=batchmean"])]
)
def test_adaad_with_igdm_follows_the_official_step_over_epochs_of_its_warm_up(name, overrides):
    method, student, teacher = _pair(name, overrides)
    official = copy.deepcopy(student)
    ours_opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    their_opt = torch.optim.SGD(official.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    student.train(), official.train()
    torch.manual_seed(1)
    for epoch in range(3):  # one step per epoch of a 5-epoch run: the weight grows 3/5, 6/5, 9/5
        x = torch.rand(16, 1, 8, 8)
        x_adv = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)
        _fixed_attack(method, x_adv)
        method.on_epoch_start(Progress(epoch=epoch, epochs=5))
        loss, stats = method.loss(x, torch.randint(0, 10, (16,)))
        ours_opt.zero_grad()
        loss.backward()
        ours_opt.step()
        theirs = _official_igdm_step(official, teacher, x, x_adv, their_opt, epoch + 1, 5, 3.0)
        assert loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
        assert stats["igdm_weight"] == pytest.approx(3.0 * (epoch + 1) / 5)
        for ours, their in zip(student.parameters(), official.parameters()):
            assert torch.allclose(ours, their, atol=1e-5), epoch


@pytest.mark.parametrize("name", ["rslad", "ard", "adaad", "absld", "mtard", "bmtard", "composed"])
def test_each_host_adds_the_same_term_to_its_own_loss(name):
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    x_adv = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)
    losses = {}
    for igdm in (0, 2):
        method, student, teacher = _pair(name, [f"method.igdm={igdm}", "method.igdm_epochs=4"])
        student.train()
        _fixed_attack(method, x_adv)
        method.on_epoch_start(Progress(epoch=1, epochs=10))
        torch.manual_seed(5)
        losses[igdm], stats = method.loss(x, y)
    method, student, teacher = _pair(name)
    student.train()
    term = igdm_loss(student, teacher, x, x_adv)
    assert "loss_igdm" in stats and stats["igdm_weight"] == 1.0  # 2 * min(1, 2 / 4)
    assert losses[2].item() == pytest.approx(losses[0].item() + 1.0 * term.item(), rel=1e-5)


def test_igdm_options_are_refused_in_one_line_where_they_do_not_belong(capsys, tmp_path):
    with pytest.raises(ConfigError, match="method.igdm must be >= 0"):
        load_config(None, ["method=rslad", "method.igdm=-1"])
    with pytest.raises(ConfigError, match="method.igdm_epochs must be >= 1"):
        load_config(None, ["method=adaad", "method.igdm_epochs=0"])
    args = ["train", "pgd_at", f"out_dir={tmp_path}", "method.igdm=1"]  # a method without a teacher
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "igdm" in err and not list(tmp_path.iterdir())
