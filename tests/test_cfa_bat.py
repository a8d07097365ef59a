"""CFA and BAT: their class-wise calibrations and losses against hand computations or per-sample
re-derivations, PGD's early stopping against a per-sample loop, and the loop's weight average."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import digits_config
from robustdistill.attacks import PGD, AttackConfig
from robustdistill.methods import Context, Progress, create_method, update_average
from robustdistill.methods.cfa import calibrated_beta, calibrated_eps, weighted_trades
from robustdistill.models.checkpoint import load_model
from robustdistill.training.config import load_config


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def _per_sample_early_stop(model, x, y, eps, alpha, steps, rule, tau=0):
    """The early-stopping PGD one sample at a time, written from the rule's definition."""

    def step(xi, yi, x0):
        xi = xi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi[None]), yi[None]), xi)
        return torch.min(torch.max(xi.detach() + alpha * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)

    out = []
    for x0, yi in zip(x, y):
        xi, previous, budget, result = x0.clone(), x0.clone(), tau, None
        for _ in range(steps):
            wrong = model(xi[None]).argmax().item() != yi.item()
            if wrong and rule == "last_clean":
                result = previous
                break
            if wrong and budget == 0:
                result = xi
                break
            budget -= wrong
            previous, xi = xi, step(xi, yi, x0)
        out.append(xi if result is None else result)
    return torch.stack(out)


@pytest.mark.parametrize("rule,tau", [("first_adversarial", 0), ("first_adversarial", 1), ("last_clean", 0)])
def test_pgd_early_stop_matches_a_per_sample_loop(rule, tau):
    model = _mlp()
    torch.manual_seed(0)
    x = torch.rand(64, 4)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[:8] = (y[:8] + 1) % 3  # some samples are misclassified from the start
    attack = PGD(model, eps=0.3, step_size=0.05, steps=10, start="none", early_stop=rule, tau=tau)
    got = attack(x, y)
    expected = _per_sample_early_stop(model, x, y, 0.3, 0.05, 10, rule, tau)
    torch.testing.assert_close(got, expected)
    plain = PGD(model, eps=0.3, step_size=0.05, steps=10, start="none")(x, y)
    stopped = (got - plain).abs().amax(dim=1) > 0
    assert 0 < stopped.sum() < len(x)  # some samples stopped early, some ran every step
    with torch.no_grad():
        right = model(got).argmax(dim=1) == y
    if rule == "last_clean":  # every sample that did not start misclassified ends on the right side
        assert right[8:].float().mean() > right[:8].float().mean()


def test_pgd_early_stop_needs_labels_and_a_known_rule():
    model = _mlp()
    with pytest.raises(ValueError, match="early_stop"):
        PGD(model, 0.1, 0.01, 3, early_stop="sometimes")
    with pytest.raises(ValueError, match="labels"):
        PGD(model, 0.1, 0.01, 3, loss="kl", early_stop="last_clean")(torch.rand(2, 4), target=torch.ones(2, 3) / 3)


def test_cfa_calibration_by_hand():
    robust = torch.tensor([0.2, 0.8])
    # eps_c = (0.5 + r_c) * 8/255; beta_c = b / (1 + b) with b = (0.5 + r_c) * 6 = 4.2 and 7.8
    assert calibrated_eps(robust, 0.5, 8 / 255).tolist() == pytest.approx([0.7 * 8 / 255, 1.3 * 8 / 255])
    assert calibrated_beta(robust, 0.5, 6.0).tolist() == pytest.approx([4.2 / 5.2, 7.8 / 8.8])


def test_cfa_loss_without_calibration_is_trades_divided_by_one_plus_beta():
    torch.manual_seed(0)
    logits_nat, logits_adv, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    loss, _, _ = weighted_trades(logits_nat, logits_adv, y, torch.full((3,), 6 / 7))
    p, q = (F.softmax(z.double(), dim=1).numpy() for z in (logits_nat, logits_adv))
    ce = -np.log(p[np.arange(5), y.numpy()]).mean()
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1).mean()
    assert loss.item() == pytest.approx((ce + 6 * kl) / 7, rel=1e-5)
    # class-wise: sample i's terms weighed by (1 - beta_{y_i}) and beta_{y_i}
    beta = torch.tensor([0.1, 0.5, 0.9])
    loss, _, _ = weighted_trades(logits_nat, logits_adv, y, beta)
    b = beta.numpy()[y.numpy()]
    ce_i = -np.log(p[np.arange(5), y.numpy()])
    kl_i = (p * (np.log(p) - np.log(q))).sum(axis=1)
    assert loss.item() == pytest.approx(((1 - b) * ce_i + b * kl_i).mean(), rel=1e-5)


class _Constant(nn.Module):
    """Predicts class 0 whatever the input (with a parameter, so that there is a gradient)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0, 0.0, -1.0]))

    def forward(self, x):
        return self.bias.expand(len(x), 3) + 0 * x.flatten(1).sum(dim=1, keepdim=True)


def test_cfa_counts_class_robustness_and_calibrates_from_begin():
    student = _Constant()
    ctx = Context(student, student, 3, AttackConfig(eps=0.1, step_size=0.025, steps=2))
    method = create_method(load_config(None, ["method=cfa", "method.begin=1"]).method, ctx)
    method.on_epoch_start(Progress(epoch=0))
    assert method.class_eps.tolist() == pytest.approx([0.1] * 3)  # before `begin`: eps and beta / (1 + beta)
    assert method.class_beta.tolist() == pytest.approx([6 / 7] * 3)
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 0, 1, 2])
    method.loss(x, y)  # class 0: 2 of 2 right under attack, classes 1 and 2: 0 of 1
    method.on_epoch_end(Progress(epoch=0))
    assert method.robust.tolist() == [1.0, 0.0, 0.0]
    method.on_epoch_start(Progress(epoch=1))
    assert method.class_eps.tolist() == pytest.approx([0.15, 0.05, 0.05])
    assert method.class_beta.tolist() == pytest.approx([9 / 10, 3 / 4, 3 / 4])
    assert method.log_state()["class_eps"] == method.class_eps.tolist()


def test_cfa_attacks_each_sample_in_its_class_ball(monkeypatch):
    student = _Constant()
    ctx = Context(student, student, 3, AttackConfig(eps=0.1, step_size=0.025, steps=2))
    method = create_method(load_config(None, ["method=cfa", "method.base=at", "method.ccr=false"]).method, ctx)
    method.class_eps = torch.tensor([0.02, 0.05, 0.08])
    seen = {}
    original = method.attack

    def spy(loss, eps=None, step_size=None):
        seen["eps"] = eps
        return original(loss, eps=eps, step_size=step_size)

    monkeypatch.setattr(method, "attack", spy)
    method.loss(torch.rand(3, 1, 2, 2), torch.tensor([2, 0, 1]))
    assert seen["eps"].tolist() == pytest.approx([0.08, 0.02, 0.05])


def test_cfa_refuses_ccr_without_trades():
    from robustdistill.core.errors import ConfigError

    with pytest.raises(ConfigError, match="ccr"):
        load_config(None, ["method=cfa", "method.base=at"])


def test_update_average_by_hand():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    b.train()(torch.randn(8, 2))  # b's running statistics and batch counter move
    expected = {k: 0.88 * v + 0.12 * b.state_dict()[k] for k, v in a.state_dict().items() if v.is_floating_point()}
    update_average(a, b, 0.88)
    for key, value in a.state_dict().items():
        if key in expected:
            torch.testing.assert_close(value, expected[key])
        else:  # the integer batch counter is copied
            assert value.item() == b.state_dict()[key].item() == 1


def _weights(path):
    model, _ = load_model(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_cfa_weight_average_through_the_loop_and_resume(tmp_path):
    from robustdistill.training.loop import train

    cfg = digits_config(tmp_path, "cfa", train__epochs=1, method__fawa_threshold=0.0, eval__attacks="[clean]")
    run = train(cfg)
    ckpt = run / "checkpoints"
    first = _weights(ckpt / "last.safetensors")
    for key, value in _weights(ckpt / "average.safetensors").items():  # the first update copies the student
        torch.testing.assert_close(value, first[key])
    cfg = digits_config(tmp_path, "cfa", train__epochs=2, method__fawa_threshold=0.0, eval__attacks="[clean]")
    train(cfg, resume=True)
    second, average = _weights(ckpt / "last.safetensors"), _weights(ckpt / "average.safetensors")
    for key, value in average.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.88 * first[key] + 0.12 * second[key])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["average_updated"] for r in epochs] == [True, True]
    assert all("val_average_pgd20_acc" in r for r in epochs)
    # the selected checkpoint is an average: the best epoch's average equals best.safetensors
    best = json.loads((run / "report.json").read_text())["selection"]["best_epoch"]
    for key, value in _weights(ckpt / "best.safetensors").items():  # epoch 1's average is the first student
        torch.testing.assert_close(value, (average if best == 2 else first)[key])


@pytest.mark.slow
def test_cfa_without_a_qualifying_epoch_keeps_no_average(tmp_path):
    from robustdistill.training.loop import train

    run = train(digits_config(tmp_path, "cfa", train__epochs=1, method__fawa_threshold=1.0, eval__attacks="[clean]"))
    assert not (run / "checkpoints" / "average.safetensors").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in records if r["type"] == "epoch"]
    assert epoch["average_updated"] is False and "val_average_pgd20_acc" not in epoch


def test_bat_loss_against_its_equations():
    from robustdistill.methods.bat import bat_loss, kl_to_uniform

    torch.manual_seed(0)
    lc, fa, nat, y = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    loss, natural, robust, uniform = bat_loss(lc, fa, nat, y, beta=6.0, gamma=0.5)
    p_lc, p_fa, p_nat = (F.softmax(z.double(), dim=1).numpy() for z in (lc, fa, nat))
    ce = -np.log(p_lc[np.arange(4), y.numpy()]).mean()
    kl = (p_nat * np.log(p_nat / p_fa)).sum(axis=1).mean()
    to_uniform = ((p_lc * np.log(p_lc * 3)).sum(axis=1) + (p_fa * np.log(p_fa * 3)).sum(axis=1)).mean()
    assert (natural.item(), robust.item(), uniform.item()) == pytest.approx((ce, kl, to_uniform), rel=1e-5)
    assert loss.item() == pytest.approx(ce + 6 * kl + 0.5 * to_uniform, rel=1e-5)
    # zero at the uniform prediction, log C at a one-hot one
    assert kl_to_uniform(torch.zeros(2, 5)).abs().max() < 1e-6
    assert kl_to_uniform(torch.tensor([[100.0, 0.0, 0.0, 0.0]])).item() == pytest.approx(np.log(4), rel=1e-5)


def test_bat_trains_on_the_last_clean_and_first_adversarial_iterates():
    from robustdistill.models import ModelSpec, create_model

    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    ctx = Context(student, student, 10, AttackConfig(eps=0.3, step_size=0.05, steps=5))
    method = create_method(load_config(None, ["method=bat", "method.tau=2"]).method, ctx)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    seen, before = [], {k: v.clone() for k, v in student.state_dict().items()}
    hook = student.register_forward_hook(lambda m, args, out: seen.append((m.training, args[0].detach().clone())))
    torch.manual_seed(1)
    method.loss(x, y)
    hook.remove()
    trained = [inp for training, inp in seen if training]  # the three training passes, in order
    assert len(trained) == 3
    student.load_state_dict(before)  # the training passes moved the BatchNorm statistics
    with torch.no_grad():
        target = F.softmax(student.eval()(x), dim=1)
    torch.manual_seed(1)
    pgd = dict(eps=0.3, step_size=0.05, steps=5, loss="kl", start="gaussian")
    expected_lc = PGD(student, early_stop="last_clean", **pgd)(x, y, target=target)
    expected_fa = PGD(student, early_stop="first_adversarial", tau=2, **pgd)(x, y, target=target)
    torch.testing.assert_close(trained[0], expected_lc)
    torch.testing.assert_close(trained[1], expected_fa)
    torch.testing.assert_close(trained[2], x)
