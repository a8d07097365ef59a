"""IAD (Zhu et al., ICLR 2022, "Reliable adversarial distillation with unreliable teachers"):
introspective adversarial distillation, the IAD-I variant built on ARD.

    x_adv   = 10-step PGD on the student's cross-entropy with the hard label, uniform start
    a_i     = softmax(t(x_adv_i))_{y_i} ** beta      (how far the teacher is trusted on x_adv_i;
                                                       1 for every sample before epoch `begin_epoch`)
    L       = alpha * tau^2 * 1/B sum_i KL(softmax(t(x_i) / tau) || softmax(s(x_adv_i) / tau))
            + alpha * 1/B sum_i (1 - a_i) KL(softmax(s(x_i)) || softmax(s(x_adv_i)))
            + (1 - alpha) * CE(s(x), y)

The student learns from the teacher where the teacher is right about the adversarial example, and
from itself (its clean prediction, gradients through both sides) where it is not. Defaults are the
authors' IAD-I CIFAR-10 script: tau = 1, alpha = 1, beta = 0.1, introspection from (0-based) epoch
60 of 200, KL summed over classes and averaged over the batch.
Deviations: as for ARD, the attack sees the student in eval mode (the script attacks in train mode)
and the config's lr milestones compound (the script's second decay is a no-op). The per-sample
trust is one tensor operation (the script loops over the samples).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from .base import METHODS, Method, MethodOptions
from .losses import kl_div


def iad_loss(teacher_clean, teacher_adv, student_clean, student_adv, y, *, temperature, beta, introspect):
    """(distillation, introspection, CE) terms and the per-sample trust a (1 when not introspecting)."""
    q = F.softmax(teacher_clean / temperature, dim=1)
    distill = temperature**2 * kl_div(q, student_adv / temperature, "batchmean")
    trust = (
        F.softmax(teacher_adv, dim=1).gather(1, y[:, None]).squeeze(1).pow(beta)
        if introspect
        else torch.ones_like(y, dtype=q.dtype)
    )
    per_sample = kl_div(F.softmax(student_clean, dim=1), student_adv, "none")  # gradients through both sides
    introspection = (per_sample * (1 - trust)).mean()
    natural = F.cross_entropy(student_clean, y)
    return distill, introspection, natural, trust


@METHODS.register("iad")
class IAD(Method):
    """Introspective adversarial distillation (Zhu et al., ICLR 2022)."""

    summary = "introspective adversarial distillation: trust the teacher where it is right (Zhu et al., ICLR 2022)"
    paper = (
        "Reliable Adversarial Distillation with Unreliable Teachers. "
        "Zhu et al.; ICLR 2022. "
        "https://arxiv.org/abs/2106.04928"
    )

    @dataclass
    class Options(MethodOptions):
        name: str = "iad"
        alpha: float = 1.0  # weight of the distillation term; the clean CE gets 1 - alpha
        temperature: float = 1.0  # the distillation temperature tau
        beta: float = 0.1  # the trust's exponent
        begin_epoch: int = 60  # (0-based) first epoch of introspection

        def validate(self):
            if not 0 <= self.alpha <= 1 or self.temperature <= 0 or self.beta < 0 or self.begin_epoch < 0:
                raise ConfigError("method needs 0 <= alpha <= 1, temperature > 0, beta >= 0 and begin_epoch >= 0")

    teachers = ("robust",)
    default_start = "uniform"

    def loss(self, x, y):
        o = self.options
        teacher = self.ctx.teachers["robust"]
        x_adv = self.attack("ce")(x, y)
        with torch.no_grad():
            t_clean, t_adv = teacher(x), teacher(x_adv)
        introspect = self.progress.epoch >= o.begin_epoch
        s_adv = self.student(x_adv)  # the script's order of the two forward passes (BatchNorm statistics)
        s_clean = self.student(x)
        distill, introspection, natural, trust = iad_loss(
            t_clean, t_adv, s_clean, s_adv, y, temperature=o.temperature, beta=o.beta, introspect=introspect
        )
        loss = o.alpha * distill + o.alpha * introspection + (1 - o.alpha) * natural
        stats = {
            "loss_distill": distill.detach(),
            "loss_introspection": introspection.detach(),
            "trust": trust.mean().detach(),
        }
        return loss, stats
