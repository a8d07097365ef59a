import pytest
import torch

from robustdistill.attacks import AttackConfig
from robustdistill.methods import METHODS, Context, Progress, create_method
from robustdistill.models import ModelSpec, create_model
from robustdistill.training.config import load_config


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


def _moved(name):
    """A method whose adaptive state has moved: a few steps and an epoch end on random data."""
    ctx = _context()
    method = create_method(load_config(None, [f"method={name}"]).method, ctx)
    progress = Progress()
    method.on_epoch_start(progress)
    for _ in range(3):
        # labels the student gets right (in eval mode, where an untrained student predicts one class for
        # every input), so that some survive the attack and state counting them moves too
        x = torch.rand(8, 1, 8, 8)
        with torch.no_grad():
            y = ctx.attacked.eval()(x).argmax(dim=1)
        method.loss(x, y)
        progress.step += 1
        method.on_step_end(progress)
    method.on_epoch_end(progress)
    if method.validates(method.options):  # the per-epoch validation drives its state: a summary with unequal classes
        clean, robust = torch.linspace(0.6, 1.0, 10), torch.linspace(0.1, 0.6, 10)
        summary = {
            "attacks": {
                name: {"accuracy": acc.mean().item(), "class_accuracy": acc.tolist()}
                for name, acc in (("clean", clean), ("pgd20", robust))
            }
        }
        method.on_validation(summary, progress)
    return method


@pytest.mark.parametrize("name", METHODS.names())
def test_every_methods_state_survives_a_round_trip_after_it_moved(name):
    torch.manual_seed(0)
    method = _moved(name)
    fresh = create_method(load_config(None, [f"method={name}"]).method, _context())
    if method.state_dict():  # an adaptive method: its state must have left the initial one
        assert repr(method.state_dict()) != repr(fresh.state_dict()), f"{name}'s state did not move"
    fresh.load_state_dict(method.state_dict())
    assert repr(fresh.state_dict()) == repr(method.state_dict())
    assert fresh.log_state() == method.log_state()


def _peaked_student():
    """A student whose logits are so peaked that its softmax is (numerically) one-hot on its argmax."""
    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4})).eval()
    with torch.no_grad():
        last = [m for m in student.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(1e3)
        last.bias.mul_(1e3)
    return student


# terms that are not zero at a perfect prediction by design, switched off for the zero-loss sweep
NOT_ZERO_AT_TARGETS = {
    "bat": ["method.gamma=0"],  # BAT pulls predictions towards uniform: log C at a one-hot
    "ciard": ["method.teacher_train_mode=false"],  # its robust teacher's copy normalises with batch statistics
}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_methods_loss_is_zero_when_the_student_equals_its_targets(name):
    """Teachers = the student, eps = 0 (the adversarial input is the input) and labels = the
    student's own (peaked) predictions: every method's target is what the student already says."""
    student = _peaked_student()
    ctx = Context(
        student, student, 10, AttackConfig(eps=0.0, step_size=0.01, steps=2), {"robust": student, "clean": student}
    )
    method = create_method(load_config(None, [f"method={name}", *NOT_ZERO_AT_TARGETS.get(name, [])]).method, ctx)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        y = student(x).argmax(dim=1)
    loss, _ = method.loss(x, y)
    # 2e-4: MART's boosted term is -log(1.0001 - p_wrong) = -1e-4 at a perfect prediction (the official constant)
    assert loss.item() == pytest.approx(0.0, abs=2e-4)
    # (no gradient check here: at a saturated softmax TRADES' KL has 0 * log 0 in its gradient, as in
    # the official code; finite gradients on ordinary logits are checked above for every method)


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


def test_mtard_with_the_clean_adversarial_target_is_rslad_with_mtards_two_other_choices():
    """MTARD's investigation option `adversarial_target: clean` is RSLAD's target: with the robust
    teacher in both roles, the Baseline with it equals RSLAD with MTARD's attack and weights."""
    torch.manual_seed(4)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    rslad = ["method=rslad", "method.attack_loss=ce", "method.adv_weight=0.5"]
    baseline = ["method=mtard", "method.ebb=false", "method.nlb=false", "method.adversarial_target=clean"]
    loss_a, grads_a = _loss_and_grads(rslad, x, y)
    loss_b, grads_b = _loss_and_grads(baseline, x, y)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b))
    official, _ = _loss_and_grads(baseline[:-1], x, y)  # t(x_adv): the option is not ignored
    assert official.item() != pytest.approx(loss_b.item(), rel=2e-5)


def test_trades_is_cross_entropy_when_beta_is_zero():
    ctx = _context()
    method = create_method(load_config(None, ["method=trades", "method.beta=0"]).method, ctx)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss, _ = method.loss(x, y)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(ctx.student(x), y).item(), rel=1e-5)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_says_what_it_is(name):
    """`robustdistill list methods` prints this line: the method and its paper."""
    assert METHODS.get(name).summary and METHODS.get(name).Options().name == name
