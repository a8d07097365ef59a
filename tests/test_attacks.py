import pytest
import torch

from robustdistill.attacks import FGSM, PGD, cw_margin
from robustdistill.models import ModelSpec, create_model


def _tiny():
    torch.manual_seed(0)
    return create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))


ATTACKS = [
    ("pgd-ce-uniform", lambda m, eps: PGD(m, eps, eps / 4, 5, "ce", "uniform")),
    ("pgd-ce-gaussian", lambda m, eps: PGD(m, eps, eps / 4, 5, "ce", "gaussian")),
    ("pgd-cw", lambda m, eps: PGD(m, eps, eps / 4, 5, "cw", "uniform")),
    ("pgd-kl", lambda m, eps: PGD(m, eps, eps / 4, 5, "kl", "gaussian")),
    ("fgsm", lambda m, eps: FGSM(m, eps)),
]


def _run(attack, x, y):
    target = torch.softmax(torch.randn(len(y), 10), dim=1)
    return attack(x, y, target=target) if attack.loss == "kl" else attack(x, y)


@pytest.mark.parametrize("name, make", ATTACKS, ids=[a[0] for a in ATTACKS])
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3])
def test_every_attack_stays_in_the_ball_and_the_image_range(name, make, eps):
    model = _tiny()
    x = torch.rand(16, 1, 8, 8)
    x[:4] = 0.0
    x[4:8] = 1.0  # pixels at the range's edges
    y = torch.randint(0, 10, (16,))
    x_adv = _run(make(model, eps), x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if eps == 0.0:
        assert torch.equal(x_adv, x)


@pytest.mark.parametrize("name, make", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attacks_restore_mode_and_never_touch_parameters_or_bn(name, make):
    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(make(model, 0.1), torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cw_margin_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert cw_margin(logits, torch.tensor([0, 2])).tolist() == [-1.0, 4.0]


def test_pgd_is_deterministic_under_a_seeded_generator():
    model, x, y = _tiny(), torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    runs = [PGD(model, 0.1, 0.02, 3, generator=torch.Generator().manual_seed(5))(x, y) for _ in range(2)]
    assert torch.equal(*runs)


def test_attacks_lower_the_accuracy_of_a_trained_model(natural_model, digits):
    x, y = digits.test.images()[:200], digits.test.y[:200]
    acc = lambda inputs: (natural_model(inputs).argmax(1) == y).float().mean().item()  # noqa: E731
    clean = acc(x)
    fgsm = acc(FGSM(natural_model, 0.1)(x, y))
    pgd = acc(PGD(natural_model, 0.1, 0.025, 20)(x, y))
    assert clean > 0.9
    assert pgd < fgsm < clean - 0.2  # an iterative attack is stronger than one step
    assert acc(PGD(natural_model, 1.0, 0.1, 20)(x, y)) < 0.05  # an unbounded budget breaks the model
