"""MART (Wang et al., ICLR 2020, "Improving adversarial robustness requires revisiting
misclassified examples"): misclassification-aware adversarial training.

    x_adv  = 10-step PGD on the cross-entropy with the hard label, from x + 0.001 N(0,1)
    BCE    = CE(f(x_adv), y) - log(1 - max_{k != y} p_k(x_adv))           (boosted cross-entropy)
    L      = BCE + beta * 1/B sum_i KL(p(x_i) || p(x_adv_i)) * (1 - p_{y_i}(x_i))

The KL weight (1 - p_y(x)) makes misclassified (low-confidence) clean examples count more; the
gradient flows through both arguments of the KL and through the weight. CIFAR-10: beta = 6.
The constants of the official code (YisenWang/MART, mart.py) are kept: log(1.0001 - p + 1e-12)
in the boosted term, log(p_adv + 1e-12) in the KL and 1.0000001 - p_y in the weight; the largest
wrong class is the second of `argsort` when the first is y.
Deviation: the official schedule (train_wideresnet.py) divides the lr at epochs 75, 90 and 100 of
120; here the schedule is the config's (`train.milestones`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from .base import METHODS, Method, MethodOptions


def mart_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float):
    """(boosted CE, weighted KL): MART's two terms, as the official code computes them."""
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # the most likely wrong class
    boosted = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    nat_probs = F.softmax(logits_nat, dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    robust = (kl * (1.0000001 - true_probs)).mean()
    return boosted, robust


@METHODS.register("mart")
class MART(Method):
    """Misclassification-aware adversarial training (Wang et al., ICLR 2020)."""

    summary = "misclassification-aware adversarial training (Wang et al., ICLR 2020)"
    paper = (
        "Improving Adversarial Robustness Requires Revisiting Misclassified Examples. "
        "Wang et al.; ICLR 2020. "
        "https://openreview.net/forum?id=rklOg6EFwS"
    )

    @dataclass
    class Options(MethodOptions):
        name: str = "mart"
        beta: float = 6.0  # weight of the misclassification-aware KL term

        def validate(self):
            if self.beta < 0:
                raise ConfigError("method.beta must be >= 0")

    def loss(self, x, y):
        x_adv = self.attack("ce")(x, y)
        logits_nat = self.student(x)
        logits_adv = self.student(x_adv)
        boosted, robust = mart_loss(logits_nat, logits_adv, y, self.options.beta)
        return boosted + self.options.beta * robust, {
            "loss_boosted_ce": boosted.detach(),
            "loss_robust": robust.detach(),
        }
