"""The baselines the seed papers compare against: each loss against an independent re-derivation
on tiny tensors, and a short digits run that beats an untrained model under PGD-20."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import digits_config
from robustdistill.attacks import EvalSettings
from robustdistill.evaluate import evaluate
from robustdistill.methods.ard import ard_kl
from robustdistill.methods.mart import mart_loss
from robustdistill.models import ModelSpec, create_model


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_mart_loss_against_its_equations():
    logits_nat = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    logits_adv = torch.tensor([[0.5, 1.5, -0.5], [1.0, -2.0, 0.0]])
    y = torch.tensor([0, 2])
    boosted, robust = mart_loss(logits_nat, logits_adv, y, beta=6.0)
    p_nat, p_adv, yy = (
        _softmax(logits_nat.numpy().astype(np.float64)),
        _softmax(logits_adv.numpy().astype(np.float64)),
        y.numpy(),
    )
    rows = np.arange(2)
    masked = p_adv.copy()
    masked[rows, yy] = -1
    wrong = masked.argmax(axis=1)  # the most likely wrong class: 1 for the first sample, 0 for the second
    assert wrong.tolist() == [1, 0]
    expected_boosted = np.mean(-np.log(p_adv[rows, yy])) + np.mean(-np.log(1.0001 - p_adv[rows, wrong] + 1e-12))
    kl = (p_nat * (np.log(p_nat) - np.log(p_adv + 1e-12))).sum(axis=1)
    expected_robust = np.mean(kl * (1.0000001 - p_nat[rows, yy]))
    assert boosted.item() == pytest.approx(expected_boosted, rel=1e-5)
    assert robust.item() == pytest.approx(expected_robust, rel=1e-5)


def test_ard_kl_by_hand():
    # teacher softmax [1/4, 3/4], student [1/2, 1/2]: KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; the mean
    # over the B x C = 2 entries halves it; the temperature leaves the distributions (logits scaled with it)
    # and multiplies by tau^2
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert ard_kl(torch.tensor([[0.0, math.log(3)]]), torch.zeros(1, 2), 1.0).item() == pytest.approx(kl / 2, rel=1e-6)
    assert ard_kl(torch.tensor([[0.0, 2 * math.log(3)]]), torch.zeros(1, 2), 2.0).item() == pytest.approx(
        4 * kl / 2, rel=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mart", "ard"])
def test_a_short_digits_run_beats_an_untrained_model(name, tmp_path, trained_runs, digits):
    from robustdistill.train import train

    cfg = digits_config(
        tmp_path,
        name,
        train__epochs=4,
        train__milestones="[]",
        eval__checks="false",
        **{"teachers.robust.path": str(trained_runs["trades"])} if name == "ard" else {},
    )
    run = train(cfg)
    trained = json.loads((run / "report.json").read_text())["attacks"]["pgd20"]["accuracy"]
    torch.manual_seed(0)
    untrained = create_model(ModelSpec("small_cnn", 10, 1, {"width": 16})).eval()
    settings = EvalSettings(eps=cfg.attack.eps, step_size=cfg.attack.eps / 4, attacks=("pgd20",))
    baseline = evaluate(untrained, digits.test, settings, 10)["attacks"]["pgd20"]["accuracy"]
    assert trained > baseline + 0.1, (trained, baseline)
