import pytest
import torch

from robustdistill.attacks import ATTACKS as EVAL_ATTACKS
from robustdistill.attacks import FGSM, PGD, AttackEnv, EvalSettings, cw_margin, get_attack
from robustdistill.core.errors import UserError
from robustdistill.core.threat import ThreatModel
from robustdistill.models import ModelSpec, create_model, fingerprint


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


@pytest.mark.parametrize("name", [n.replace("<N>", "3") for n in EVAL_ATTACKS.names()])  # families: 3 steps
def test_every_evaluation_attack_stays_in_the_ball_and_leaves_the_model_unchanged(name, monkeypatch):
    """The registry sweep: whatever an attack does, its examples lie in the eps-ball and [0, 1],
    the model's parameters and buffers are untouched, and it says what it ran."""
    import pyautoattack.autoattack as aa_module

    # a few iterations and queries instead of AutoAttack's 100 and 5000: the same code paths, a fraction of the time
    for part in ["APGDAttack", "APGDAttack_targeted", "FABAttack_PT"]:
        original = getattr(aa_module, part)
        monkeypatch.setattr(aa_module, part, lambda *a, _cls=original, **k: _cls(*a, **{**k, "n_iter": 5}))
    set_version = aa_module.AutoAttack._set_version

    def few_queries(self, version):
        set_version(self, version)
        self.square.n_queries = 20

    monkeypatch.setattr(aa_module.AutoAttack, "_set_version", few_queries)
    model = _tiny().eval()
    torch.manual_seed(1)
    surrogate = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4})).eval()
    x = torch.rand(4, 1, 8, 8)
    x[:1] = 1.0  # pixels at the range's edge
    y = model(x).argmax(dim=1).detach()  # correctly classified, so every attack has work to do
    settings = EvalSettings(ThreatModel(0.1), step_size=0.025, batch_size=4, square_queries=30)
    before = fingerprint(model)
    attack = get_attack(name)
    x_adv, verdict = attack.run(model, x, y, AttackEnv(settings, surrogate=surrogate))
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= settings.eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert fingerprint(model) == before
    if verdict is not None:
        assert verdict.dtype == torch.bool and verdict.shape == y.shape
    described = attack.describe(settings)
    assert attack.kind in ("reference", "white-box", "black-box") and attack.help and described["label"]
    assert described.get("eps", settings.eps) == settings.eps


def test_attack_names_say_the_steps_that_run_and_labels_the_restarts():
    settings = EvalSettings(ThreatModel(0.1), step_size=0.025, restarts=3)
    assert get_attack("pgd50").label(settings) == "pgd50x3" and get_attack("pgd50").describe(settings)["steps"] == 50
    assert get_attack("cw7").describe(settings) | {"label": None} == {
        "eps": 0.1,
        "step_size": 0.025,
        "start": "uniform",
        "restarts": 3,
        "steps": 7,
        "loss": "cw margin",
        "label": None,
    }
    assert get_attack("pgd20").label(EvalSettings(ThreatModel(0.1), step_size=0.025)) == "pgd20"
    assert EVAL_ATTACKS.get("pgd50") is EVAL_ATTACKS.get("pgd50") and EVAL_ATTACKS.get("pgd50").kind == "white-box"
    assert "pgd<N>" in EVAL_ATTACKS.names() and "pgd20" not in EVAL_ATTACKS.names()
    for bad, message in [("pgd0", "number >= 1"), ("pgd020", "without leading zeros"), ("pgdx", "unknown attack")]:
        with pytest.raises(UserError, match=message):
            EVAL_ATTACKS.get(bad)
    assert (
        EvalSettings(ThreatModel(0.1), step_size=0.025, attacks=("clean", "cw30", "pgd50", "pgd20")).check_steps == 50
    )
    assert EvalSettings(ThreatModel(0.1), step_size=0.025, attacks=("clean", "cw30")).check_steps == 20


@pytest.mark.parametrize("start", ["uniform", "gaussian", "none"])
def test_per_sample_budgets_keep_each_sample_in_its_own_ball(start):
    model = _tiny()
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    eps = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.2, 0.3])
    x_adv = PGD(model, eps, eps / 4, 5, "ce", start)(x, y)
    reach = (x_adv - x).abs().flatten(1).amax(dim=1)
    assert torch.all(reach <= eps + 1e-6) and torch.equal(x_adv[0], x[0])
    assert reach[-1] > 0.2  # the largest ball is used, not the smallest
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # the same budget for every sample gives exactly the scalar attack
    torch.manual_seed(0)
    per_sample = PGD(model, torch.full((6,), 0.1), torch.full((6,), 0.025), 3, "ce", "none")(x, y)
    assert torch.equal(per_sample, PGD(model, 0.1, 0.025, 3, "ce", "none")(x, y))
    with pytest.raises(ValueError, match="one value per sample"):
        PGD(model, torch.full((5,), 0.1), 0.025, 3)(x, y)


def test_random_starts_depend_on_the_seed_and_the_restart_but_not_on_the_batch():
    """Each (seed, restart, sample) has its own start: an earlier version packed the three into one
    integer whose high bits torch's generator dropped, so every seed and every restart started alike."""
    from robustdistill.attacks.pgd import sample_noise

    index = torch.arange(6)
    base = sample_noise(index, (1, 4, 4), seed=0, stream=0)
    assert base.min() >= 0 and base.max() < 1 and base.dtype == torch.float32
    assert not torch.equal(base, sample_noise(index, (1, 4, 4), seed=1, stream=0))
    assert not torch.equal(base, sample_noise(index, (1, 4, 4), seed=0, stream=1))
    other_restart = sample_noise(index, (1, 4, 4), seed=0, stream=1)
    assert all(not torch.equal(a, b) for a, b in zip(base, other_restart))  # every sample moves
    # a sample's start is the same whichever batch (and rank) it is drawn in
    assert torch.equal(sample_noise(index[3:5], (1, 4, 4), seed=0, stream=0), base[3:5])
    assert not torch.equal(base[0], base[1])


def test_every_autoattack_attack_has_its_state_file_among_the_tools_own_files():
    """--force may delete, and a resumed run moves aside, only the files the tool knows as its own."""
    from robustdistill.storage.runs import AUTOATTACK_STATES

    family = {n for n in EVAL_ATTACKS.names() if EVAL_ATTACKS.get(n).autoattack}
    assert {"autoattack", "autoattack_fast", "autoattack_rand", "apgd_ce", "apgd_t", "fab_t"} <= family
    assert set(AUTOATTACK_STATES) == {f"{n}_state.json" for n in family}
