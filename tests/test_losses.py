import math

import pytest
import torch

from robustdistill.methods.losses import kl_div, soft_targets


def test_elementwise_mean_is_the_published_reduction_by_hand():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    log_p = logits - math.log(sum(math.exp(v) for v in [1.0, 0.0, -1.0]))
    terms = [qi * (math.log(qi + 1e-5) - lp) for qi, lp in zip([0.7, 0.2, 0.1], log_p[0].tolist())]
    assert kl_div(q, logits, "elementwise_mean").item() == pytest.approx(sum(terms) / 3, abs=1e-6)
    exact = sum(qi * (math.log(qi) - lp) for qi, lp in zip([0.7, 0.2, 0.1], log_p[0].tolist()))
    assert kl_div(q, logits, "batchmean").item() == pytest.approx(exact, abs=1e-6)
    assert kl_div(q.repeat(4, 1), logits.repeat(4, 1), "sum").item() == pytest.approx(4 * exact, abs=4e-6)
    assert kl_div(q, logits, "mean").item() == pytest.approx(exact / 3, abs=1e-6)  # torch's KLDivLoss() default
    per_sample = kl_div(q.repeat(4, 1), logits.repeat(4, 1), "none")
    assert per_sample.shape == (4,) and per_sample.tolist() == pytest.approx([exact] * 4, abs=1e-6)


@pytest.mark.parametrize("reduction", ["elementwise_mean", "batchmean", "sum"])
def test_kl_is_nonnegative_and_zero_at_the_target(reduction):
    torch.manual_seed(0)
    for _ in range(20):
        q = torch.softmax(3 * torch.randn(5, 10), dim=1)
        assert kl_div(q, torch.randn(5, 10), reduction) >= 0
        assert kl_div(q, torch.log(q), reduction).item() == pytest.approx(0.0, abs=2e-5 if reduction != "sum" else 1e-4)


def test_soft_targets_per_sample_temperature():
    z = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    q = soft_targets(z, torch.tensor([1.0, 2.0]))
    assert torch.allclose(q[0], torch.softmax(z[0], 0)) and torch.allclose(q[1], torch.softmax(z[1] / 2, 0))
    assert q[1, 0] < q[0, 0]  # a higher temperature is a smoother target
