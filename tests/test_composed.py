"""The `composed` method: configured by a preset as RSLAD, ABSLD, MTARD or B-MTARD it computes the
named method's losses, gradients and adaptive state, bit for bit, over epochs and an lr decay (so a
part that drifts fails here); every part changes the result; invalid combinations are one line."""

import pytest
import torch

from robustdistill.attacks import AttackConfig
from robustdistill.cli import main
from robustdistill.core.errors import ConfigError
from robustdistill.methods import Context, Progress, create_method
from robustdistill.models import ModelSpec, create_model
from robustdistill.recipes import RECIPES
from robustdistill.training.builders import lr_decays
from robustdistill.training.config import load_config

MILESTONES = [2]  # epochs 0, 1 at the base rates, epoch 2 after the decay (0-based)


def _context() -> Context:
    torch.manual_seed(0)
    student = create_model(ModelSpec("small_cnn", 10, 1, {"width": 4}))
    robust = create_model(ModelSpec("small_cnn", 10, 1, {"width": 8})).eval()
    clean = create_model(ModelSpec("small_cnn", 10, 1, {"width": 8})).eval()
    return Context(
        student, student, 10, AttackConfig(eps=0.1, step_size=0.025, steps=3), {"robust": robust, "clean": clean}
    )


def _batches():
    torch.manual_seed(1)
    return [(torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))) for _ in range(3)]


def _adaptive(method) -> dict[str, torch.Tensor]:
    """The adaptive state under common names: class-wise temperatures, EBB's pair, NLB's weights."""
    state, out = method.state_dict(), {}
    for kind in ("adv", "nat"):
        if f"temperature_{kind}" in state:
            out[f"class_{kind}"] = state[f"temperature_{kind}"]["tau"]
    uses_ebb = getattr(method.options, "ebb", None) or getattr(method.options, "entropy_balance", None)
    uses_nlb = getattr(method.options, "nlb", None) or getattr(method.options, "weights", None) == "nlb"
    if uses_ebb:
        out["ebb"] = state["entropy_balance"]["tau"]
    if uses_nlb:
        out["nlb"] = state["loss_balance"]["w"]
    return out


def _trajectory(overrides: list[str], epochs: int = 3) -> list:
    """Train a few steps a method at a time on the same inputs, noise and initial weights: each
    step's loss and gradients, and the adaptive state after every step and every epoch."""
    ctx = _context()
    method = create_method(load_config(None, overrides).method, ctx)
    params = list(ctx.student.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    ctx.student.train()
    record, step = [], 0
    for epoch in range(epochs):
        progress = Progress(epoch + 1, step, lr_decays(epoch, MILESTONES), lr_decays(epoch + 1, MILESTONES))
        method.on_epoch_start(progress)
        for x, y in _batches():
            torch.manual_seed(100 + step)  # the attack's start noise
            optimizer.zero_grad()
            loss, _ = method.loss(x, y)
            loss.backward()
            record.append(("loss", loss.detach().clone()))
            record.append(("grads", [p.grad.clone() for p in params]))
            optimizer.step()
            step += 1
            progress.step = step
            method.on_step_end(progress)
            record.append(("state", _adaptive(method)))
        method.on_epoch_end(progress)
        record.append(("epoch state", _adaptive(method)))
    return record


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))


# the digits recipes' adaptive rates, so that every part moves within three short epochs
FAST_ABSLD = ["method.rate=0.5"]
FAST_MTARD = ["method.temperature_lr=0.25", "method.weight_lr=0.2"]
FAST = ["method.anti_bias_rate=0.5", "method.ebb_lr=0.25", "method.nlb_lr=0.2"]


@pytest.mark.parametrize(
    "named, preset",
    [
        (["method=rslad"], "rslad"),
        (["method=absld", *FAST_ABSLD], "absld"),
        (["method=mtard", *FAST_MTARD], "mtard"),
        (["method=bmtard", *FAST_MTARD], "bmtard"),
    ],
)
def test_a_preset_trains_as_the_named_method_bit_for_bit_over_epochs_and_an_lr_decay(named, preset):
    ours = _trajectory(["method=composed", f"method.preset={preset}", *FAST])
    theirs = _trajectory(named)
    assert [kind for kind, _ in ours] == [kind for kind, _ in theirs]
    for step, ((kind, a), (_, b)) in enumerate(zip(ours, theirs)):
        assert _equal(a, b), f"{preset}: {kind} differs at record {step}"
    # the adaptive state moved (the comparison is not of two frozen states)
    states = [s for kind, s in ours if kind == "epoch state"]
    assert preset == "rslad" or any(not _equal(states[0][k], states[-1][k]) for k in states[0])


def test_the_selection_metric_and_the_teachers_follow_the_preset():
    ctx = _context()
    for preset, metric, roles in [
        ("rslad", "robust", ("robust",)),
        ("absld", "robust_plus_worst", ("robust",)),
        ("bmtard", "w_robust", ("robust", "clean")),
        ("bmtard_absld", "robust_plus_worst", ("robust", "clean")),
        ("bmtard_absld_tx", "robust_plus_worst", ("robust", "clean")),
    ]:
        options = load_config(None, ["method=composed", f"method.preset={preset}"]).method
        method = create_method(options, ctx)
        assert method.selection_metric == metric and method.required_teachers(options) == roles, preset


def test_the_combination_puts_class_wise_temperatures_on_top_of_ebbs_scale():
    ctx = _context()
    options = load_config(None, ["method=composed", "method.preset=bmtard_absld"]).method
    assert (options.nat_teacher, options.adversarial_target, options.attack_loss) == ("clean", "adversarial", "ce")
    assert options.entropy_balance and options.weights == "nlb"
    assert (options.adv_temperature, options.nat_temperature) == ("anti_bias", "anti_bias")
    tx = load_config(None, ["method=composed", "method.preset=bmtard_absld_tx"]).method
    assert tx.adversarial_target == "clean" and tx.attack_loss == "ce"
    method = create_method(options, ctx)
    method.entropy.tau = torch.tensor([2.0, 3.0])
    method.class_wise["adv"].tau = torch.linspace(0.5, 5.0, 10)
    method.class_wise["nat"].tau = torch.linspace(5.0, 0.5, 10)
    y = torch.tensor([0, 9, 4])
    assert torch.equal(method._temperature("adv", y), 2.0 * torch.linspace(0.5, 5.0, 10)[y])
    assert torch.equal(method._temperature("nat", y), 3.0 * torch.linspace(5.0, 0.5, 10)[y])
    # a class-wise temperature moves on its own target's risk: the adversarial one on x_adv's
    torch.manual_seed(5)
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))
    ctx.student.train()
    method.loss(x, y)
    assert method.class_wise["adv"].risk.sum() > method.class_wise["nat"].risk.sum() > 0


@pytest.mark.parametrize(
    "part",
    [
        "method.nat_teacher=clean",
        "method.adversarial_target=adversarial",
        "method.entropy_balance=true",
        "method.adv_temperature=anti_bias",
        "method.nat_temperature=anti_bias",
        "method.weights=nlb",
        "method.attack_loss=ce",
    ],
)
def test_every_part_changes_the_training(part):
    base = ["method=composed", "method.preset=rslad", *FAST]
    # what a part needs to act: t(x_adv) an attack that does not need it; EBB two different targets
    # (on one teacher and one input the two entropies are equal and EBB never moves)
    extra = {
        "method.adversarial_target=adversarial": ["method.attack_loss=ce"],
        "method.entropy_balance=true": ["method.nat_teacher=clean"],
    }.get(part, [])
    plain = _trajectory(base + extra, epochs=2)
    changed = _trajectory([*base, *extra, part], epochs=2)
    losses = lambda record: [v for kind, v in record if kind == "loss"]  # noqa: E731
    assert not _equal(losses(plain), losses(changed)), part


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.preset=bmtard_absld", "method.attack_loss=kl"], "method.attack_loss=kl maximises the KL"),
        (["method.preset=nothing"], "unknown preset 'nothing'"),
        (["method.weights=balanced"], "method.weights"),
        (["method.ebb_min=2"], "0 < ebb_min <= 1 <= ebb_max"),
    ],
)
def test_an_invalid_combination_is_one_error_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as caught:
        load_config(None, ["method=composed", *overrides])
    assert "\n" not in str(caught.value)


def test_a_clean_teacher_part_without_a_clean_teacher_is_refused_before_training(tmp_path, capsys):
    overrides = [
        "method=composed",
        "method.preset=bmtard_absld",
        "teachers.robust.path=somewhere",
        f"out_dir={tmp_path}",
    ]
    assert main(["train", str(RECIPES / "rslad.yaml"), *overrides]) == 2
    assert "method 'composed' needs a 'clean' teacher" in capsys.readouterr().err


def test_a_composed_runs_balance_and_class_wise_temperatures_are_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    from robustdistill.evaluation.plots import plot_balance, plot_temperatures

    ctx = _context()
    method = create_method(load_config(None, ["method=composed", "method.preset=bmtard_absld"]).method, ctx)
    logged = method.log_state()
    assert set(logged) == {"scale_adv", "scale_nat", "weight_adv", "weight_nat", "temperature_adv", "temperature_nat"}
    steps = [{"type": "step", "step": k, **logged} for k in range(1, 4)]
    epochs = [{"type": "epoch", "epoch": k, **logged} for k in range(1, 3)]
    assert plot_balance(steps, tmp_path / "balance.png") and plot_temperatures(epochs, tmp_path / "t.png")
    assert (tmp_path / "balance.png").stat().st_size > 10_000


def test_only_the_parts_in_use_hold_state_and_it_survives_a_round_trip():
    assert create_method(load_config(None, ["method=composed"]).method, _context()).state_dict() == {}
    overrides = ["method=composed", "method.preset=bmtard_absld", *FAST]
    ctx = _context()
    method = create_method(load_config(None, overrides).method, ctx)
    assert set(method.state_dict()) == {"entropy_balance", "loss_balance", "temperature_adv", "temperature_nat"}
    progress = Progress(1, 0, 0, 0)
    method.on_epoch_start(progress)
    for x, y in _batches():
        torch.manual_seed(7)
        method.loss(x, y)
        method.on_step_end(progress)
    method.on_epoch_end(progress)
    fresh = create_method(load_config(None, overrides).method, _context())
    assert repr(fresh.state_dict()) != repr(method.state_dict())  # it moved
    fresh.load_state_dict(method.state_dict())
    assert repr(fresh.state_dict()) == repr(method.state_dict()) and fresh.log_state() == method.log_state()
