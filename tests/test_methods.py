import pytest
import torch

from robustdistill.config import AttackConfig, load_config
from robustdistill.methods import METHODS, Context, create_method
from robustdistill.models import ModelSpec, create_model


def _context(teacher_same_as_student=False):
    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    teacher = student if teacher_same_as_student else create_model(ModelSpec("small_cnn", 10, 1, {"width": 8}))
    teachers = {"robust": teacher.eval(), "clean": teacher.eval()}
    return Context(student, student, 10, AttackConfig(eps=0.1, step_size=0.025, steps=3), teachers)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_gives_a_finite_nonnegative_loss_with_gradients(name):
    ctx = _context()
    method = create_method(load_config(None, [f"method={name}"]).method, ctx)
    ctx.student.train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss, stats = method.loss(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss >= 0
    loss.backward()
    assert all(p.grad is not None for p in ctx.student.parameters())
    assert ctx.student.training  # the attack gave the train mode back
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())


@pytest.mark.parametrize("name", METHODS.names())
def test_every_methods_state_survives_a_round_trip(name):
    method = create_method(load_config(None, [f"method={name}"]).method, _context())
    clone = create_method(load_config(None, [f"method={name}"]).method, _context())
    clone.load_state_dict(method.state_dict())
    assert repr(clone.state_dict()) == repr(method.state_dict())


def test_rslad_loss_is_zero_when_the_student_is_its_teacher_on_clean_inputs():
    """With eps = 0 the adversarial input is x and the student equals the teacher."""
    ctx = _context(teacher_same_as_student=True)
    ctx.attack = AttackConfig(eps=0.0, step_size=0.01, steps=2)
    method = create_method(load_config(None, ["method=rslad", "method.reduction=batchmean"]).method, ctx)
    ctx.student.eval()  # the same BN mode for teacher and student
    loss, _ = method.loss(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_rslad_combines_adversarial_and_natural_kl_five_to_one():
    ctx = _context()
    method = create_method(load_config(None, ["method=rslad"]).method, ctx)
    torch.manual_seed(1)
    loss, stats = method.loss(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert loss.item() == pytest.approx(5 / 6 * stats["loss_adv"].item() + 1 / 6 * stats["loss_nat"].item(), rel=1e-6)


def _loss_and_grads(overrides, x, y):
    ctx = _context()
    method = create_method(load_config(None, overrides).method, ctx)
    ctx.student.train()
    torch.manual_seed(3)  # the same attack noise for every method
    loss, _ = method.loss(x, y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in ctx.student.parameters()]


def test_rslad_with_mtards_three_choices_is_mtards_baseline_with_one_teacher():
    """The investigation options take RSLAD to MTARD's Baseline: with the robust teacher in both
    MTARD roles, the losses and the student's gradients are equal on the same inputs and noise."""
    torch.manual_seed(2)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    rslad = ["method=rslad", "method.attack_loss=ce", "method.adversarial_target=adversarial", "method.adv_weight=0.5"]
    baseline = ["method=mtard", "method.ebb=false", "method.nlb=false"]
    loss_a, grads_a = _loss_and_grads(rslad, x, y)
    loss_b, grads_b = _loss_and_grads(baseline, x, y)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b))
    # each choice alone moves RSLAD's loss (so none of the options is ignored)
    plain, _ = _loss_and_grads(["method=rslad"], x, y)
    for option in rslad[1:]:
        changed, _ = _loss_and_grads(["method=rslad", option], x, y)
        assert changed.item() != pytest.approx(plain.item(), rel=2e-5), option


def test_trades_is_cross_entropy_when_beta_is_zero():
    ctx = _context()
    method = create_method(load_config(None, ["method=trades", "method.beta=0"]).method, ctx)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss, _ = method.loss(x, y)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(ctx.student(x), y).item(), rel=1e-5)
