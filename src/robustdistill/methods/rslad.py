"""RSLAD (Zi et al., ICCV 2021): robust soft label adversarial distillation.

The robust teacher's soft labels on clean inputs, q = softmax(t(x)), replace the hard labels
everywhere: the inner max maximises sum_i KL(q_i || s(x'_i)) from x + 0.001 N(0,1), and the
student minimises 5/6 KL(q || s(x_adv)) + 1/6 KL(q || s(x)). It is ABSLD with every temperature
fixed at 1 (spec/methods.md).
"""

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import MethodOptions
from ..losses import kl_div, soft_targets
from . import METHODS, Method


@METHODS.register("rslad")
class RSLAD(Method):
    @dataclass
    class Options(MethodOptions):
        name: str = "rslad"
        reduction: Literal["elementwise_mean", "batchmean"] = "elementwise_mean"
        adv_weight: float = 5 / 6  # weight of the adversarial term; the natural term gets 1 - adv_weight

    teachers = ("robust",)

    def loss(self, x, y):
        with torch.no_grad():
            q = soft_targets(self.ctx.teachers["robust"](x))
        x_adv = self.attack("kl")(x, target=q)
        reduction = self.options.reduction
        adv = kl_div(q, self.student(x_adv), reduction)
        nat = kl_div(q, self.student(x), reduction)
        w = self.options.adv_weight
        return w * adv + (1 - w) * nat, {"loss_adv": adv.detach(), "loss_nat": nat.detach()}
