"""TRADES (Zhang et al., ICML 2019): CE(f(x), y) + beta * KL(f(x) || f(x')).

The inner max maximises KL(softmax(f(x)) || softmax(f(x'))) from x + 0.001 N(0,1); the outer
KL is averaged over the batch (`batchmean`, the paper's 1/B * sum) with gradients through both
arguments. CIFAR-10 default beta = 6.
"""

from dataclasses import dataclass

import torch.nn.functional as F

from ..core.errors import ConfigError
from .base import METHODS, Method, MethodOptions


@METHODS.register("trades")
class TRADES(Method):
    summary = "clean CE + beta KL to the adversarial example (Zhang et al., ICML 2019)"
    paper = (
        "Theoretically Principled Trade-off between Robustness and Accuracy. "
        "Zhang et al.; ICML 2019. "
        "https://arxiv.org/abs/1901.08573"
    )

    @dataclass
    class Options(MethodOptions):
        name: str = "trades"
        beta: float = 6.0  # weight of the KL term: the robustness-accuracy trade-off

        def validate(self):
            if self.beta < 0:
                raise ConfigError("method.beta must be >= 0")

    def loss(self, x, y):
        target = self.clean_prediction(x)
        x_adv = self.attack("kl")(x, target=target)
        logits_nat = self.student(x)
        logits_adv = self.student(x_adv)
        natural = F.cross_entropy(logits_nat, y)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
        return natural + self.options.beta * robust, {"loss_natural": natural.detach(), "loss_robust": robust.detach()}
