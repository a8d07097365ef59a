"""ARD (Goldblum et al., AAAI 2020, "Adversarially robust distillation").

    x_adv = 10-step PGD on the student's cross-entropy with the hard label, uniform start in the eps-ball
    L     = alpha * tau^2 * KL(softmax(t(x) / tau) || softmax(s(x_adv) / tau)) + (1 - alpha) * CE(s(x), y)

The teacher (robust) sees the clean input; the student is matched to it on its own adversarial
example. The KL is torch's `KLDivLoss()` default as in the official code
(goldblum/AdversariallyRobustDistillation, main.py): the exact KL terms averaged over all B x C
entries. Defaults are the official CIFAR-10 ones: tau = 30, alpha = 1 (so the clean CE term is
off), eps 8/255, 10 steps of 2/255.

Deviations from the official code:
- its attack runs with the student in train mode (BatchNorm statistics move during the attack);
  here every attack sees the student in eval mode, as for every method of this tool;
- its `adjust_learning_rate` multiplies the *initial* lr by the factor at each milestone, so the
  second decay (epoch 150) leaves the lr at 0.01; here the config's milestones compound.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from .base import METHODS, Method
from .gradient_matching import IGDMOptions, with_igdm
from .losses import kl_div


def ard_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(softmax(t / tau) || softmax(s / tau)), averaged over all B x C terms."""
    q = F.softmax(teacher_logits / temperature, dim=1)
    return temperature**2 * kl_div(q, student_logits / temperature, "mean")  # KLDivLoss()'s default


@METHODS.register("ard")
class ARD(Method):
    """Adversarially robust distillation (Goldblum et al., AAAI 2020)."""

    summary = "adversarially robust distillation (Goldblum et al., AAAI 2020)"
    paper = (
        "Adversarially Robust Distillation. "
        "Goldblum, Fowl, Feizi, Goldstein; AAAI 2020. "
        "https://arxiv.org/abs/1905.09747"
    )

    @dataclass
    class Options(IGDMOptions):
        name: str = "ard"
        alpha: float = 1.0  # weight of the distillation term; the clean CE gets 1 - alpha
        temperature: float = 30.0  # the distillation temperature tau (30: the official CIFAR-10 setting)

        def validate(self):
            if not 0 <= self.alpha <= 1 or self.temperature <= 0:
                raise ConfigError("method needs 0 <= alpha <= 1 and temperature > 0")

    teachers = ("robust",)
    default_start = "uniform"

    def loss(self, x, y):
        o = self.options
        x_adv = self.attack("ce")(x, y)
        with torch.no_grad():
            teacher = self.ctx.teachers["robust"](x)
        s_adv = self.student(x_adv)
        distill = ard_kl(teacher, s_adv, o.temperature)
        # computed even at alpha = 1, as the official loop does: the clean batch also moves BatchNorm's statistics
        natural = F.cross_entropy(self.student(x), y)
        loss = o.alpha * distill + (1 - o.alpha) * natural
        return with_igdm(
            self, loss, {"loss_distill": distill.detach(), "loss_natural": natural.detach()}, x, x_adv, s_adv
        )
