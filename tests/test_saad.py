"""SAAD (method `saad`, and `method.saad` of the soft-label methods): compared step by step with the
official code (HongsinLee/saad: saad.py and attacks.saad_inner_loss) on identical inputs, its
weights by hand, its weight average against torch's SWA utilities, and its options refused in one
line where they do not belong."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from conftest import digits_config
from robustdistill.attacks import AttackConfig
from robustdistill.cli import main
from robustdistill.core.errors import ConfigError
from robustdistill.methods import Context, Progress, create_method, recompute_batchnorm, update_average
from robustdistill.methods.losses import kl_div, kl_per_sample, soft_targets
from robustdistill.methods.sample_weighting import renyi_entropy, saad_weights
from robustdistill.models import ModelSpec, create_model
from robustdistill.models.checkpoint import load_model
from robustdistill.training.config import load_config

# --- the official code, rewritten (utils.samplewise_*, attacks.saad_inner_loss, one step of saad.py)


def _official_kl(input_logits, target_logits):
    with torch.no_grad():
        p = F.softmax(target_logits, dim=1)
    return F.kl_div(F.log_softmax(input_logits, dim=1), p, reduction="none").sum(dim=1)


def _official_renyi(logits, alpha, eps=1e-12):
    p = F.softmax(logits, dim=1)
    if abs(alpha - 1.0) < 1e-6:
        return -(p * torch.log(p + eps)).sum(dim=1)
    return torch.log((p**alpha).sum(dim=1) + eps) / (1.0 - alpha)


def _official_inner(model, teacher, x, y, step_size, epsilon, steps, beta):
    model.eval()
    x_temp = x.detach()
    x_temp.requires_grad_(True)
    teacher_logits = teacher(x_temp)
    b = len(x)
    (gradient,) = torch.autograd.grad(teacher_logits[torch.arange(b), y].sum(), x_temp)
    x_adv = x.detach() + 0.001 * torch.randn_like(x).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            correction = torch.einsum("bchw,bchw->b", gradient, x_adv - x)
            corrected = teacher_logits.detach().clone()
            corrected[torch.arange(b), y] += beta * correction
            loss = nn.KLDivLoss(reduction="sum")(F.log_softmax(model(x_adv), dim=1), F.softmax(corrected, dim=1))
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp(0.0, 1.0)
    model.train()
    return x_adv


def _official_step(student, teacher, X, inputs_adv, optimizer, epoch, epochs, igdm_alpha, beta, gamma):
    with torch.no_grad():
        teacher_clean = teacher(X)
    optimizer.zero_grad()
    with torch.no_grad():
        delta = inputs_adv - X
        teacher_plus = teacher(inputs_adv)
        teacher_minus = teacher(X - delta)
    student_plus = student(inputs_adv)
    student_minus = student(X - delta)
    student_clean = student(X)
    entropy = _official_renyi(teacher_plus, gamma)
    kl_adv = _official_kl(student_plus, teacher_plus)
    kl_clean = _official_kl(student_clean, teacher_clean)
    igdm = igdm_alpha * (epoch / epochs) * _official_kl(student_plus - student_minus, teacher_plus - teacher_minus)
    w = torch.clamp(5 * (entropy - entropy.min().item()), min=0.0)
    w_norm = (w - w.min()) / (w.max() - w.min() + 1e-8)
    loss = (w * (kl_adv + igdm) + beta * (1 - w_norm) * kl_clean).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


# --- helpers


def _models():
    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    teacher = create_model(ModelSpec("small_cnn", 10, 1, {"width": 8})).eval()
    return student, teacher


def _method(name, overrides=(), attack=None, models=None):
    student, teacher = models or _models()
    cfg = load_config(None, [f"method={name}", *overrides])
    attack = attack or AttackConfig(eps=0.1, step_size=0.025, steps=3)
    ctx = Context(student, student, 10, attack, {"robust": teacher, "clean": teacher})
    return create_method(cfg.method, ctx), student, teacher


def _fixed_attack(method, x_adv):
    method.attack = lambda *args, **kwargs: lambda x, *a, **k: x_adv


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 0.05 + 0.9 * torch.rand(n, 1, 8, 8, generator=g)  # inside (0, 1): the start's clipping plays no part
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


# --- by hand


def test_the_weights_by_hand():
    p = torch.tensor([[0.5, 0.5], [0.8, 0.2], [1.0 - 1e-9, 1e-9]])
    logits = p.log()
    h1 = [math.log(2), -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)), 0.0]
    assert renyi_entropy(logits, 1.0).tolist() == pytest.approx(h1, abs=1e-6)
    assert renyi_entropy(logits, 2.0).tolist() == pytest.approx([math.log(2), -math.log(0.68), 0.0], abs=1e-6)
    w, v = saad_weights(logits, gamma=1.0, scale=5.0)
    assert w.tolist() == pytest.approx([5 * h1[0], 5 * h1[1], 0.0], abs=1e-5)  # the most confident sample: 0
    assert v.tolist() == pytest.approx([1.0, h1[1] / h1[0], 0.0], abs=1e-5)
    w, v = saad_weights(torch.zeros(4, 3))  # all equally unsure: nothing to prefer
    assert w.tolist() == [0.0] * 4 and v.tolist() == [0.0] * 4


@pytest.mark.parametrize("reduction", ["elementwise_mean", "mean", "batchmean"])
def test_the_per_sample_shares_average_to_each_reduction(reduction):
    torch.manual_seed(0)
    q, logits = soft_targets(torch.randn(6, 5)), torch.randn(6, 5)
    shares = kl_per_sample(q, logits, reduction)
    assert shares.shape == (6,) and shares.mean().item() == pytest.approx(kl_div(q, logits, reduction).item(), rel=1e-6)


# --- against the official code


def test_the_inner_maximisation_follows_the_official_one_step_by_step():
    student, teacher = _models()
    attack = AttackConfig(eps=8 / 255, step_size=2 / 255, steps=10, fold_batchnorm=False)
    method, _, _ = _method("saad", ["method.inner_lambda=0.7"], attack, (student, teacher))
    x, y = _batch()
    student.train()
    torch.manual_seed(3)
    theirs = _official_inner(student, teacher, x, y, 2 / 255, 8 / 255, 10, 0.7)
    torch.manual_seed(3)
    from robustdistill.methods.saad import LinearisedTeacher, logits_and_true_class_gradient

    logits, gradient = logits_and_true_class_gradient(teacher, x, y)
    ours = method.attack("kl")(x, target=LinearisedTeacher(logits, gradient, x, y, 0.7))
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert (ours - x).abs().max().item() == pytest.approx(8 / 255, abs=1e-6)  # it did move, to the budget
    assert student.training  # restored


@pytest.mark.parametrize("beta, gamma", [(0.0, 1.0), (0.5, 2.0)])
def test_the_training_step_follows_the_official_one_over_its_warm_up(beta, gamma):
    method, student, teacher = _method("saad", [f"method.beta={beta}", f"method.saad_gamma={gamma}", "method.igdm=3"])
    official = copy.deepcopy(student)
    ours_opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    their_opt = torch.optim.SGD(official.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    student.train(), official.train()
    for epoch in range(3):  # one step per epoch of a 5-epoch run: IGDM's weight grows 3/5, 6/5, 9/5
        x, y = _batch(seed=epoch)
        x_adv = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)
        _fixed_attack(method, x_adv)
        method.on_epoch_start(Progress(epoch=epoch, epochs=5))
        loss, stats = method.loss(x, y)
        ours_opt.zero_grad()
        loss.backward()
        ours_opt.step()
        theirs = _official_step(official, teacher, x, x_adv, their_opt, epoch + 1, 5, 3.0, beta, gamma)
        assert loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
        assert stats["igdm_weight"] == pytest.approx(3.0 * (epoch + 1) / 5)
        for ours, their in zip(student.state_dict().values(), official.state_dict().values()):
            assert torch.allclose(ours.float(), their.float(), atol=1e-5), epoch  # BatchNorm's statistics too


@pytest.mark.parametrize("name", ["rslad", "adaad", "absld", "composed"])
def test_each_host_weighs_its_own_terms_per_sample(name):
    """With SAAD's weights a host's loss is w_adv mean(w l_adv) + w_nat mean((1 - v) l_nat) with its
    own per-sample terms; a teacher equally unsure everywhere gives w = 0: the natural term alone."""
    x, y = _batch(8)
    x_adv = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)
    losses, stats = {}, {}
    for saad in (False, True):
        method, student, teacher = _method(name, [f"method.saad={str(saad).lower()}"])
        student.train()
        _fixed_attack(method, x_adv)
        torch.manual_seed(5)
        losses[saad], stats[saad] = method.loss(x, y)
    assert losses[True].item() != pytest.approx(losses[False].item())
    assert stats[True]["saad_weight_mean"] > 0 and "saad_weight_mean" not in stats[False]

    student, teacher = _models()
    with torch.no_grad():  # a teacher whose output is the same for every input
        last = [m for m in teacher.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.zero_()
    method, student, _ = _method(name, ["method.saad=true"], models=(student, teacher))
    student.train()
    _fixed_attack(method, x_adv)
    loss, st = method.loss(x, y)
    w_nat = {"adaad": 0.0}.get(name, 1 / 6)  # AdaAD's alpha 1: no clean term
    assert st["saad_weight_mean"] == 0.0
    assert loss.item() == pytest.approx(w_nat * st["loss_nat"].item(), rel=1e-5, abs=1e-7)


def test_a_host_with_saad_and_igdm_weighs_the_igdm_term_too():
    from robustdistill.methods.gradient_matching import igdm_loss

    x, y = _batch(8)
    x_adv = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)
    found = {}
    for igdm in (0, 1):
        method, student, teacher = _method("rslad", ["method.saad=true", f"method.igdm={igdm}", "method.igdm_epochs=1"])
        student.train()
        _fixed_attack(method, x_adv)
        found[igdm] = method.loss(x, y)[0]
    with torch.no_grad():
        w, _ = saad_weights(teacher(x_adv))
    term = igdm_loss(student, teacher, x, x_adv, sample_weights=w)
    assert found[1].item() == pytest.approx(found[0].item() + term.item(), rel=1e-5)
    assert term.item() != pytest.approx(igdm_loss(student, teacher, x, x_adv).item())


# --- the weight average (SWA)


def test_the_average_is_torchs_swa_and_its_batchnorm_update_bn():
    method, student, _ = _method("saad", ["method.average_from=2"])
    swa, average = AveragedModel(student), None
    torch.manual_seed(0)
    for epoch in range(4):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.1 * torch.randn_like(p))
        decay = method.average_decay({}, Progress(epoch=epoch, epochs=4))
        assert (decay is None) == (epoch < 1)
        if decay is not None:
            swa.update_parameters(student)
            if average is None:
                average = copy.deepcopy(student)
            else:
                update_average(average, student, decay)
    for ours, theirs in zip(average.parameters(), swa.module.parameters()):
        torch.testing.assert_close(ours, theirs)
    batches = [(torch.rand(8, 1, 8, 8), None) for _ in range(3)]
    recompute_batchnorm(average, batches)
    update_bn([x for x, _ in batches], swa)
    states = zip(average.state_dict().items(), swa.module.state_dict().items())
    checked = 0
    for (key, ours), (_, theirs) in states:
        if "running" in key:
            torch.testing.assert_close(ours, theirs)
            checked += 1
    assert checked and not average.training


@pytest.mark.slow
def test_saad_trains_its_average_through_the_loop_and_resumes_it(tmp_path, trained_runs):
    from robustdistill.training.loop import train

    teacher = {"teachers.robust.path": str(trained_runs["trades"])}
    cfg = digits_config(tmp_path, "saad", train__epochs=1, method__average_from=1, eval__attacks="[clean]", **teacher)
    run = train(cfg)
    ckpt = run / "checkpoints"
    first = load_model(ckpt / "last.safetensors")[0].state_dict()
    again = digits_config(tmp_path, "saad", train__epochs=2, method__average_from=1, eval__attacks="[clean]", **teacher)
    train(again, resume=True)
    second = load_model(ckpt / "last.safetensors")[0].state_dict()
    average = load_model(ckpt / "average.safetensors")[0].state_dict()
    for key, value in average.items():
        if "running" in key:  # recomputed over the epoch's batches: not the students' mean
            assert not torch.allclose(value, (first[key] + second[key]) / 2), key
        elif value.is_floating_point():
            torch.testing.assert_close(value, (first[key] + second[key]) / 2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["average_updated"] for r in epochs] == [True, True]
    steps = [r for r in records if r["type"] == "step"]
    assert steps and all(r["saad_weight_mean"] > 0 for r in steps)


# --- bad input


def test_saad_options_are_refused_in_one_line_where_they_do_not_belong(capsys, tmp_path):
    with pytest.raises(ConfigError, match="saad_gamma"):
        load_config(None, ["method=absld", "method.saad=true", "method.saad_gamma=0"])
    with pytest.raises(ConfigError, match="saad_scale"):
        load_config(None, ["method=rslad", "method.saad_scale=-1"])
    with pytest.raises(ConfigError, match="average_from"):
        load_config(None, ["method=saad", "method.average_from=0"])
    with pytest.raises(ConfigError, match="beta"):
        load_config(None, ["method=saad", "method.beta=-1"])
    for args in (["train", "pgd_at", "method.saad=true"], ["train", "mart", "method.saad_gamma=2"]):
        assert main([*args, f"out_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "saad" in err and not list(tmp_path.iterdir())
