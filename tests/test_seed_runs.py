"""The seed methods inside real (tiny) runs: logged adaptive state, resume, plots."""

import json

import pytest
import torch

from conftest import digits_config
from robustdistill.cli import main
from robustdistill.storage.runs import read_metrics
from robustdistill.training.loop import train


def _student(tmp_path, trained_runs, which, **overrides):
    teachers = {
        "teachers.robust.path": str(trained_runs["trades"]),
        "teachers.clean.path": str(trained_runs["natural"]),
    }
    if which in ("absld", "rslad"):
        teachers.pop("teachers.clean.path")
    settings = dict(train__epochs=3, attack__steps=2, train__milestones="[2]", train__log_every=2)
    return digits_config(tmp_path, which, **teachers, **(settings | overrides))


@pytest.mark.slow
def test_absld_logs_classwise_temperatures_that_move(tmp_path, trained_runs):
    cfg = _student(tmp_path, trained_runs, "absld")
    run = train(cfg)
    epochs = [r for r in read_metrics(run) if r["type"] == "epoch"]
    assert all(len(r["temperature_adv"]) == 10 and len(r["temperature_nat"]) == 10 for r in epochs)
    assert epochs[-1]["temperature_adv"] != [1.0] * 10
    assert all(0.5 <= t <= 5.0 for r in epochs for t in r["temperature_adv"] + r["temperature_nat"])
    # the largest gap moves its class by exactly the rate: r after epoch 1; the lr decays from
    # epoch 3 (milestone 2, 0-based), and as in the official loop (lr and rate decay at the end of
    # 1-based epoch 215, then that epoch's update) the update after epoch 2 already uses r / 10
    moves = [
        max(abs(a - b) for a, b in zip(later["temperature_adv"], earlier))
        for earlier, later in zip([[1.0] * 10] + [r["temperature_adv"] for r in epochs], epochs)
    ]
    r = cfg.method.rate
    assert moves == pytest.approx([r, r / 10, r / 10], abs=1e-6)
    assert [r["lr"] for r in epochs] == pytest.approx([0.5, 0.5, 0.05])
    assert "val_robust_plus_worst" in epochs[-1]


@pytest.mark.slow
def test_bmtard_logs_temperatures_and_weights_per_step(tmp_path, trained_runs):
    run = train(_student(tmp_path, trained_runs, "bmtard"))
    steps = [r for r in read_metrics(run) if r["type"] == "step"]
    assert steps and all(isinstance(r["temperature_adv"], float) for r in steps)
    assert all(r["weight_adv"] + r["weight_nat"] == pytest.approx(1.0) for r in steps)
    assert any(r["weight_adv"] != 0.5 for r in steps) and any(r["temperature_nat"] != 1.0 for r in steps)
    assert "val_w_robust" in read_metrics(run)[-1]


@pytest.mark.slow
def test_the_combination_logs_ebbs_scales_nlbs_weights_and_class_wise_temperatures_that_move(tmp_path, trained_runs):
    run = train(_student(tmp_path, trained_runs, "bmtard_absld", data__imbalance=10))  # on long-tailed digits
    records = read_metrics(run)
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert all(r["weight_adv"] + r["weight_nat"] == pytest.approx(1.0) for r in steps)
    assert any(r["scale_nat"] != 1.0 for r in steps) and any(r["weight_adv"] != 0.5 for r in steps)
    assert epochs[-1]["temperature_adv"] != [1.0] * 10 and epochs[-1]["temperature_nat"] != [1.0] * 10
    assert "val_robust_plus_worst" in epochs[-1]
    assert steps[-1]["loss"] < steps[0]["loss"]  # three short epochs on 455 images: it learns, slowly
    report = json.loads((run / "report.json").read_text())
    counts = report["data"]["train_class_counts"]  # the training pool's profile, in the report
    assert counts == sorted(counts, reverse=True) and round(counts[0] / counts[-1]) == 10
    assert "training images" in (run / "report.md").read_text()


@pytest.mark.parametrize("which", ["absld", "bmtard", "bmtard_absld"])
@pytest.mark.slow
def test_adaptive_state_is_checkpointed_and_restored_on_resume(tmp_path, trained_runs, which):
    straight = train(_student(tmp_path, trained_runs, which, name="straight", train__epochs=2))
    cfg = _student(tmp_path, trained_runs, which, name="resumed", train__epochs=1)
    run = train(cfg)
    cfg.train.epochs = 2
    train(cfg, resume=True)
    a = torch.load(straight / "checkpoints" / "train_state.pt", weights_only=True)["method"]
    b = torch.load(run / "checkpoints" / "train_state.pt", weights_only=True)["method"]
    flat = lambda s: {f"{k}.{j}": v for k, d in s.items() for j, v in d.items()}  # noqa: E731
    assert flat(a).keys() == flat(b).keys()
    for key, value in flat(a).items():  # bit for bit, as the README promises of a resume
        assert torch.equal(value, flat(b)[key]), key
    state_a = torch.load(straight / "checkpoints" / "train_state.pt", weights_only=True)["model"]
    state_b = torch.load(run / "checkpoints" / "train_state.pt", weights_only=True)["model"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.slow
def test_plot_command_draws_the_trajectories(tmp_path, trained_runs, capsys):
    absld = train(_student(tmp_path, trained_runs, "absld", train__epochs=2))
    bmtard = train(_student(tmp_path, trained_runs, "bmtard", train__epochs=2))
    assert main(["plot", str(absld)]) == 0 and main(["plot", str(bmtard)]) == 0
    out = capsys.readouterr().out
    assert "temperatures.png" in out and "balance.png" in out
    for png in [
        absld / "plots" / "temperatures.png",
        bmtard / "plots" / "balance.png",
        absld / "plots" / "classwise.png",
    ]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["plot", str(tmp_path)]) == 2
