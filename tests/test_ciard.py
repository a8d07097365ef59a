"""CIARD (method `ciard`): compared step by step with the official training step (eminentgu/CIARD,
CIARD.py) on identical inputs over epochs of its schedules (the student's and the online robust
teacher's weights, the temperatures, the loss), its pieces by hand, its state through a resume,
and its options refused in one line."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import digits_config
from robustdistill.attacks import AttackConfig
from robustdistill.cli import main
from robustdistill.core.errors import ConfigError
from robustdistill.methods import Context, Progress, create_method
from robustdistill.methods.ciard import magnitude_factor, push_terms
from robustdistill.models import ModelSpec, create_model
from robustdistill.training.builders import cosine_exp_factor
from robustdistill.training.config import load_config

# --- the official code, rewritten (CIARD.py's helpers and one step of its loop)


def _kl_loss(a, b):
    return -a * b + torch.log(b + 1e-5) * b


def _entropy_value(a):
    return torch.log(a + 1e-5) * a


def _scale_to_magnitude(a, b, c):
    a, b, c = (v + 1e-7 if math.isclose(v, 0, rel_tol=1e-9) else v for v in (a, b, c))
    target = min(math.floor(math.log10(abs(a))), math.floor(math.log10(abs(b))))
    return 10 ** (target - math.floor(math.log10(abs(c))))


def _push_loss(teacher_logits, students_logits, labels, T=5):
    diff = (torch.argmax(teacher_logits, dim=1) != labels).nonzero(as_tuple=True)[0]
    return _kl_loss(F.log_softmax(students_logits[diff] / T, dim=1), F.softmax(teacher_logits[diff].detach(), dim=1))


class _Official:
    """The script's state between steps and its step, with the schedule's constants as arguments."""

    def __init__(self, student, teacher, teacher_nat, lr, teacher_lr, teacher_from, epochs, decay_epochs, temp_lr):
        self.student, self.teacher, self.teacher_nat = student, teacher, teacher_nat
        self.optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=2e-4)
        self.teacher_optimizer = torch.optim.SGD(teacher.parameters(), lr=0.0, momentum=0.1, weight_decay=2e-4)
        self.base_teacher_lr, self.teacher_from, self.epochs = teacher_lr, teacher_from, epochs
        self.decay_epochs, self.temp_learn_rate, self.weight_learn_rate = decay_epochs, temp_lr, 0.025
        self.temp_adv = self.temp_nat = 1

    def step(self, x, y, x_adv, epoch):
        student, teacher, teacher_nat = self.student, self.teacher, self.teacher_nat
        student.train(), teacher.train()
        self.optimizer.zero_grad(), self.teacher_optimizer.zero_grad()
        student_nat_logits = student(x)
        with torch.no_grad():
            teacher_nat_logits = teacher_nat(x)
            teacher(x)  # adv_teacher_nat: unused
        teacher_nat.eval()
        student_adv_logits, teacher_adv_logits, nat_adv_logits = student(x_adv), teacher(x_adv), teacher_nat(x_adv)
        kl1 = torch.mean(
            _kl_loss(
                F.log_softmax(student_adv_logits, dim=1), F.softmax(teacher_adv_logits.detach() / self.temp_adv, 1)
            )
        )
        kl2 = torch.mean(
            _kl_loss(
                F.log_softmax(student_nat_logits, dim=1), F.softmax(teacher_nat_logits.detach() / self.temp_nat, 1)
            )
        )
        ent_adv = torch.mean(_entropy_value(F.softmax(teacher_adv_logits.detach() / self.temp_adv, dim=1)))
        ent_nat = torch.mean(_entropy_value(F.softmax(teacher_nat_logits.detach() / self.temp_nat, dim=1)))
        self.temp_adv = self.temp_adv - self.temp_learn_rate * torch.sign(ent_adv / ent_nat - 1).item()
        self.temp_nat = self.temp_nat - self.temp_learn_rate * torch.sign(ent_nat / ent_adv - 1).item()
        self.temp_adv, self.temp_nat = max(min(10, self.temp_adv), 1), max(min(10, self.temp_nat), 1)
        total = 1 * kl1 + 1 * kl2
        kl3 = _push_loss(nat_adv_logits, student_adv_logits, y)
        if torch.isnan(kl3).any() or kl3.numel() == 0:
            kl3 = torch.tensor(0.0)
        else:
            kl3 = torch.mean(kl3)
            total = total - _scale_to_magnitude(float(kl1.item()), float(kl2.item()), float(kl3.item())) * kl3
        if epoch < self.teacher_from:
            teacher_lr = 0
        else:
            span = self.epochs - self.teacher_from
            cosine = 0.5 + 0.5 * np.cos(np.pi * (epoch - self.teacher_from) / span)
            teacher_lr = self.base_teacher_lr * cosine * np.exp(-0.01 * (epoch - self.teacher_from) ** 2 / span**2)
        for group in self.teacher_optimizer.param_groups:
            group["lr"] = teacher_lr
        if epoch in self.decay_epochs:
            self.weight_learn_rate *= 0.1
            self.temp_learn_rate *= 0.1
        total.backward()
        self.optimizer.step()
        F.cross_entropy(teacher_adv_logits, y).backward()
        if epoch > self.teacher_from:
            self.teacher_optimizer.step()
        return total.detach()


def _models():
    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    robust = create_model(ModelSpec("small_cnn", 10, 1, {"width": 8})).eval()
    clean = create_model(ModelSpec("small_cnn", 10, 1, {"width": 6})).eval()
    return student, robust, clean


def _ciard(overrides=(), models=None):
    student, robust, clean = models or _models()
    cfg = load_config(None, ["method=ciard", *overrides])
    ctx = Context(
        student, student, 10, AttackConfig(eps=0.1, step_size=0.025, steps=3), {"robust": robust, "clean": clean}
    )
    return create_method(cfg.method, ctx), student, robust, clean


def _fixed_attack(method, x_adv):
    method.attack = lambda *args, **kwargs: lambda x, *a, **k: x_adv


# --- by hand


def test_the_magnitude_factor_and_the_push_terms_by_hand():
    t = torch.tensor
    assert magnitude_factor(t(0.034), t(0.2), t(0.0051)).item() == 10.0  # 10^(min(-2, -1) - (-3))
    assert magnitude_factor(t(3.0), t(40.0), t(0.5)).item() == 10.0  # 10^(0 - (-1))
    assert magnitude_factor(t(0.0), t(5.0), t(0.02)).item() == pytest.approx(1e-5)  # 0 taken as 1e-7
    for a, b, c in [(0.034, 0.2, 0.0051), (1.7, 0.0009, 123.0)]:
        assert magnitude_factor(t(a), t(b), t(c)).item() == pytest.approx(_scale_to_magnitude(a, b, c))
    clean = t([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])  # predicts 0, 1, 0
    student = t([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    total, count = push_terms(clean, student, t([0, 0, 0]), temperature=5.0)
    assert count.item() == 2  # only the second sample is misclassified: its 2 terms
    q, log_p = F.softmax(clean[1], 0), F.log_softmax(student[1] / 5, 0)
    assert total.item() == pytest.approx((q * (torch.log(q + 1e-5) - log_p)).sum().item(), rel=1e-6)
    total, count = push_terms(clean, student, t([0, 1, 0]), temperature=5.0)
    assert count.item() == 0 and total.item() == 0.0


def test_the_cosine_exp_schedule_is_the_scripts():
    for epoch in (0, 148, 149, 150, 200, 299):  # 0-based; the script's 1-based e = epoch + 1
        e = epoch + 1
        expected = (
            1.0 if e < 150 else (0.5 + 0.5 * np.cos(np.pi * (e - 150) / 150)) * np.exp(-0.01 * (e - 150) ** 2 / 150**2)
        )
        assert cosine_exp_factor(epoch, 149, 300) == pytest.approx(expected, abs=1e-12)
    assert cosine_exp_factor(299, 149, 300) == pytest.approx(0.0, abs=1e-12)  # the script's last epoch trains at 0


def test_the_teacher_lr_is_the_scripts():
    method, *_ = _ciard()
    for epoch, expected in [(0, 0.0), (48, 0.0), (49, 1e-4), (174, 1e-4 * 0.5 * math.exp(-0.0025))]:
        method.on_epoch_start(Progress(epoch=epoch, epochs=300))
        assert method.teacher_lr() == pytest.approx(expected, rel=1e-9, abs=1e-15)


# --- against the official step


@pytest.mark.parametrize("every_step", [True, False])
def test_the_training_step_follows_the_official_one_over_epochs_of_its_schedules(every_step):
    """Two steps per epoch of a 5-epoch run whose teacher learns from epoch 2 on and whose rates decay
    in epoch 3: epoch 1 without the teacher's step, epoch 2 at its lr but without its step (as the
    script: it steps after its start epoch), then both; the script decays at every step of epoch 3."""
    models = _models()
    official = _Official(
        copy.deepcopy(models[0]), copy.deepcopy(models[1]), models[2], 0.1, 0.05, 2, 5, [3] if every_step else [], 0.2
    )
    overrides = [
        "method.teacher_lr=0.05",
        "method.teacher_from=2",
        "method.temperature_lr=0.2",
        "method.rate_decay_epochs=[3]",
        f"method.rate_decay_every_step={str(every_step).lower()}",
    ]
    method, student, robust, _ = _ciard(overrides, models)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    g = torch.Generator().manual_seed(1)
    for epoch in range(4):
        progress = Progress(epoch=epoch, epochs=5)
        method.on_epoch_start(progress)
        for step in range(2):
            if not every_step and epoch == 2 and step == 0:  # the decay once, from the epoch's start
                official.temp_learn_rate *= 0.1
            x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
            x_adv = (x + 0.1 * torch.randn(x.shape, generator=g).sign()).clamp(0, 1)
            _fixed_attack(method, x_adv)
            student.train()
            loss, stats = method.loss(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.on_step_end(progress)
            theirs = official.step(x, y, x_adv, epoch + 1)
            where = f"epoch {epoch + 1} step {step + 1}"
            assert loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6), where
            assert stats["loss_push"] > 0, where
            assert method.entropy.tau.tolist() == pytest.approx([official.temp_adv, official.temp_nat], abs=1e-6)
            for ours, their in zip(student.state_dict().values(), official.student.state_dict().values()):
                assert torch.allclose(ours.float(), their.float(), atol=1e-5), where
            for ours, their in zip(method.robust.parameters(), official.teacher.parameters()):
                assert torch.allclose(ours, their, atol=1e-6), where
    moved = [not torch.equal(a, b) for a, b in zip(method.robust.parameters(), robust.parameters())]
    assert any(moved)  # the teacher learned, on a copy: the given teacher is unchanged
    assert all(not p.requires_grad for p in robust.parameters()) or not any(
        p.grad is not None for p in robust.parameters()
    )


def test_the_state_round_trips():
    method, *_ = _ciard(["method.teacher_from=1", "method.teacher_lr=0.05", "method.nlb=true"])
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    _fixed_attack(method, (x + 0.05).clamp(0, 1))
    method.on_epoch_start(Progress(epoch=2, epochs=5))
    method.loss(x, y)
    method.on_step_end(method.progress)
    state = copy.deepcopy(method.state_dict())
    again, *_ = _ciard(["method.teacher_from=1", "method.teacher_lr=0.05", "method.nlb=true"])
    again.load_state_dict(state)
    for a, b in zip(again.robust.state_dict().values(), method.robust.state_dict().values()):
        assert torch.equal(a, b)
    assert again.log_state() == method.log_state() and "weight_adv" in method.log_state()
    assert again.robust_optimizer.state_dict()["state"].keys() == method.robust_optimizer.state_dict()["state"].keys()


@pytest.mark.slow
def test_ciard_resumes_its_online_teacher_to_the_uninterrupted_run(tmp_path, trained_runs, monkeypatch):
    """Interrupted in its third epoch (its schedules read the run's epochs, so the run keeps them) and
    resumed: the student and the robust teacher bit for bit those of the run never interrupted."""
    from robustdistill.methods.ciard import CIARD
    from robustdistill.training.loop import train

    teachers = {"teachers.robust.path": str(trained_runs["trades"])}
    teachers["teachers.clean.path"] = str(trained_runs["natural"])
    common = dict(train__epochs=3, method__teacher_from=1, train__decay_from=0, eval__attacks="[clean]", **teachers)
    whole = train(digits_config(tmp_path / "whole", "ciard", **common))
    original = CIARD.loss

    def interrupted(self, x, y):
        if self.progress.epoch == 2:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(CIARD, "loss", interrupted)
    cfg = digits_config(tmp_path / "split", "ciard", **common)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(CIARD, "loss", original)
    split = train(cfg, resume=True)
    a = torch.load(whole / "checkpoints" / "train_state.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "train_state.pt", weights_only=True)
    for key, value in a["method"]["robust_teacher"].items():
        assert torch.equal(value, b["method"]["robust_teacher"][key]), key
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss_teacher", 0) > 0 for r in records if r["type"] == "step")


# --- bad input


def test_ciard_options_are_refused_in_one_line(capsys, tmp_path):
    with pytest.raises(ConfigError, match="push"):
        load_config(None, ["method=ciard", "method.push_temperature=0"])
    with pytest.raises(ConfigError, match="teacher_from"):
        load_config(None, ["method=ciard", "method.teacher_from=0"])
    with pytest.raises(ConfigError, match="milestones"):
        load_config(None, ["method=ciard", "train.schedule=cosine_exp", "train.milestones=[10]"])
    with pytest.raises(ConfigError, match="decay_from"):
        load_config(None, ["train.schedule=cosine_exp", "train.milestones=[]", "train.epochs=10", "train.decay_from=9"])
    assert main(["train", "pgd_at", "method.push=1", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "push" in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["saad"],
        ["ciard", "teachers.robust.path={other}", "teachers.clean.path={three}"],
        ["absld", "method.saad=true"],
        ["rslad", "method.igdm=1"],
    ],
)
def test_a_teacher_of_another_dataset_or_number_of_classes_is_refused_in_one_line(args, tmp_path, capsys):
    """IGDM, SAAD and CIARD read their teachers as every distillation does: a teacher with 3 outputs
    for digits' 10 classes, or one trained on another dataset, stops the run before anything is written."""
    from robustdistill.models.checkpoint import ModelMeta, save_model

    spec = ModelSpec("small_cnn", 3, 1, {"width": 4})
    save_model(tmp_path / "three.safetensors", create_model(spec), spec)
    other = ModelSpec("small_cnn", 10, 1, {"width": 4})
    save_model(tmp_path / "other.safetensors", create_model(other), ModelMeta(other, data={"name": "svhn"}))
    paths = {"three": tmp_path / "three.safetensors", "other": tmp_path / "other.safetensors"}
    name, *rest = args
    rest = [a.format(**paths) for a in rest]
    if not any(a.startswith("teachers.robust") for a in rest):
        rest.append(f"teachers.robust.path={paths['three']}")
    out = tmp_path / "runs"
    assert main(["train", name, *rest, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("3 outputs" in err or "svhn" in err), err
    assert not out.exists()


def test_the_estimate_times_the_steps_where_the_teacher_learns(tmp_path, monkeypatch):
    """CIARD's steps cost more once its robust teacher learns: `--estimate` times them there (the
    epoch after teacher_from), not in the first epoch, where the teacher only predicts."""
    from robustdistill.methods.ciard import CIARD
    from robustdistill.models.checkpoint import save_model
    from robustdistill.training.estimate import estimate

    spec = ModelSpec("small_cnn", 10, 1, {"width": 4})
    save_model(tmp_path / "teacher.safetensors", create_model(spec), spec)
    teacher = str(tmp_path / "teacher.safetensors")
    timed = []
    original = CIARD.loss

    def watched(self, x, y):
        loss, stats = original(self, x, y)
        timed.append((self.progress.epoch, "loss_teacher" in stats))
        return loss, stats

    monkeypatch.setattr(CIARD, "loss", watched)
    cfg = digits_config(
        tmp_path,
        "ciard",
        train__epochs=10,
        method__teacher_from=4,
        train__decay_from=5,
        attack__steps=1,
        **{"teachers.robust.path": teacher, "teachers.clean.path": teacher},
    )
    estimate(cfg, steps=1, warmup=0)
    assert timed == [(4, True)]  # 0-based epoch 4: the 1-based epoch 5, after teacher_from
    assert CIARD.costliest_epoch(cfg.method, 3) == 0  # a teacher that never learns: the first epoch
