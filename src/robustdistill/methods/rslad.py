"""RSLAD (Zi et al., ICCV 2021): robust soft label adversarial distillation.

The robust teacher's soft labels on clean inputs, q = softmax(t(x)), replace the hard labels
everywhere: the inner max maximises sum_i KL(q_i || s(x'_i)) from x + 0.001 N(0,1), and the
student minimises 5/6 KL(q || s(x_adv)) + 1/6 KL(q || s(x)). It is ABSLD with every temperature
fixed at 1.

Investigation options (not the paper's; their defaults are RSLAD): they take RSLAD one factor at a
time towards MTARD's Baseline, which differs from RSLAD in exactly these three places and in
its clean teacher:
- `attack_loss: ce`: the inner max maximises the cross-entropy with the hard label (MTARD);
- `adversarial_target: adversarial`: the adversarial term's target is the teacher's soft labels on
  the adversarial input, softmax(t(x_adv)) (MTARD), instead of those on the clean input;
- `adv_weight: 0.5`: MTARD's Baseline weights.
With all three and the robust teacher in both of MTARD's roles, RSLAD's loss is MTARD's Baseline
loss on the same inputs (a test holds them equal).
"""

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.errors import ConfigError
from .base import METHODS, Method
from .gradient_matching import with_igdm
from .losses import soft_targets
from .sample_weighting import SAADOptions, saad_terms


@dataclass
class SoftLabelOptions(SAADOptions):
    """Options shared by RSLAD and ABSLD."""

    reduction: Literal["elementwise_mean", "batchmean"] = (
        "elementwise_mean"  # KL reduction: the published elementwise mean (divided by C), or batchmean
    )
    adv_weight: float = 5 / 6  # weight of the adversarial term; the natural term gets 1 - adv_weight

    def validate(self):
        if not 0 <= self.adv_weight <= 1:
            raise ConfigError("method.adv_weight must be in [0, 1]")


@METHODS.register("rslad")
class RSLAD(Method):
    summary = "robust soft label adversarial distillation (Zi et al., ICCV 2021)"
    paper = (
        "Revisiting Adversarial Robustness Distillation: Robust Soft Labels Make Student Better. "
        "Zi, Zhao, Ma, Jiang; ICCV 2021. "
        "https://arxiv.org/abs/2108.07969"
    )

    @dataclass
    class Options(SoftLabelOptions):
        name: str = "rslad"
        attack_loss: Literal["kl", "ce"] = (
            "kl"  # inner max: KL to the soft labels (RSLAD), or CE with the hard label (MTARD)
        )
        adversarial_target: Literal["clean", "adversarial"] = (
            "clean"  # the teacher's input for the adversarial target: x (RSLAD) or x_adv (MTARD)
        )

    teachers = ("robust",)

    @classmethod
    def uses_labels(cls, options) -> bool:
        return options.attack_loss == "ce"  # the soft labels alone, unless the inner max takes the hard label

    def loss(self, x, y):
        o = self.options
        teacher = self.ctx.teachers["robust"]
        with torch.no_grad():
            q = soft_targets(teacher(x))
        x_adv = self.attack("kl")(x, target=q) if o.attack_loss == "kl" else self.attack("ce")(x, y)
        t_adv = None
        if o.adversarial_target == "adversarial":
            with torch.no_grad():
                t_adv = teacher(x_adv)
                q_adv = soft_targets(t_adv)
        else:
            q_adv = q
        s_adv = self.student(x_adv)
        adv, nat, sample_w, t_adv, extra = saad_terms(self, q_adv, s_adv, q, self.student(x), o.reduction, x_adv, t_adv)
        w = o.adv_weight
        stats = {"loss_adv": adv.detach(), "loss_nat": nat.detach(), **extra}
        return with_igdm(self, w * adv + (1 - w) * nat, stats, x, x_adv, s_adv, sample_w, t_adv)
