"""BAT (Sun et al., AAAI 2023, "Improving robust fairness via balance adversarial training"):
adversarial examples on both sides of the decision boundary, and predictions pulled towards the
uniform distribution there.

    x_lc = the last iterate of TRADES' inner maximisation (KL to the clean prediction, from
           x + 0.001 N(0,1)) that the student still classifies right: just inside the boundary
           (the start when that is already misclassified; the last iterate when none is)
    x_fa = the first misclassified iterate of a second such run, after tau more steps (tau = 1):
           just outside the boundary (the last iterate when none is misclassified)
    L    = CE(f(x_lc), y) + beta 1/B sum_i KL(p(x_i) || p(x_fa_i))
           + gamma 1/B sum_i [KL(p(x_lc_i) || U) + KL(p(x_fa_i) || U)]          (U: uniform over the C classes)

Stopping each sample near the boundary balances how hard the adversarial examples of easy and hard
classes are (the paper's source-class fairness); the uniform term keeps them from favouring some
wrong classes over others (target-class fairness). Both inner maximisations run the student in eval
mode; the three training passes (x_lc, x_fa, x) in train mode, with gradients through both sides of
every KL. Defaults and the stopping rules are the official code's (silvercherry/Improving-Robust-
Fairness-via-Balance-Adversarial-Training: train.py, train_mode/stop_to_lastclean.py and
stop_to_firstadv.py): beta 6, tau 1, gamma 1 (the script adds the uniform term unweighted).
Deviations: the official loops drop a stopped sample from the batch and gather the outputs in a
shuffled order; here stopped samples stay in the batch (frozen, one tensor operation per step) and
keep their order, which changes neither the points nor the loss (eval-mode attack, sums over the batch).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from .base import METHODS, Method, MethodOptions
from .losses import kl_div


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Per sample KL(softmax(logits) || U) = log C - H(softmax(logits))."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * log_p).sum(dim=1) + math.log(logits.shape[1])


def bat_loss(logits_lc, logits_fa, logits_nat, y, beta: float, gamma: float):
    """(loss, CE on x_lc, KL term, uniform term) of BAT."""
    natural = F.cross_entropy(logits_lc, y)
    robust = kl_div(F.softmax(logits_nat, dim=1), logits_fa, "batchmean")
    uniform = (kl_to_uniform(logits_lc) + kl_to_uniform(logits_fa)).mean()
    return natural + beta * robust + gamma * uniform, natural, robust, uniform


@METHODS.register("bat")
class BAT(Method):
    """Balance adversarial training (Sun et al., AAAI 2023)."""

    summary = "boundary-straddling adversarial examples with a uniform-target term (Sun et al., AAAI 2023)"
    paper = (
        "Improving Robust Fairness via Balance Adversarial Training. "
        "Sun et al.; AAAI 2023. "
        "https://arxiv.org/abs/2209.07534"
    )

    @dataclass
    class Options(MethodOptions):
        name: str = "bat"
        beta: float = 6.0  # weight of the KL between the clean and the first-adversarial prediction
        gamma: float = 1.0  # weight of the uniform-distribution term
        tau: int = 1  # steps past the first misclassified iterate

        def validate(self):
            if self.beta < 0 or self.gamma < 0 or self.tau < 0:
                raise ConfigError("method needs beta >= 0, gamma >= 0 and tau >= 0")

    def loss(self, x, y):
        o = self.options
        target = self.clean_prediction(x)
        x_lc = self.attack("kl", early_stop="last_clean")(x, y, target=target)
        x_fa = self.attack("kl", early_stop="first_adversarial", tau=o.tau)(x, y, target=target)
        loss, natural, robust, uniform = bat_loss(
            self.student(x_lc), self.student(x_fa), self.student(x), y, o.beta, o.gamma
        )
        stats = {"loss_natural": natural, "loss_robust": robust, "loss_uniform": uniform}
        return loss, {k: v.detach() for k, v in stats.items()}
