"""PGD adversarial training (Madry et al., ICLR 2018).

min_theta E[ max_{||d||_inf <= eps} CE(f(x + d), y) ], the inner max by PGD from a uniform random
start. CIFAR-10 defaults: eps 8/255, 10 steps of 2/255 (the spec's shared training attack).
"""

from dataclasses import dataclass

import torch.nn.functional as F

from .base import METHODS, Method, MethodOptions


@METHODS.register("pgd_at")
class PGDAT(Method):
    summary = "PGD adversarial training (Madry et al., ICLR 2018)"
    paper = (
        "Towards Deep Learning Models Resistant to Adversarial Attacks. "
        "Madry, Makelov, Schmidt, Tsipras, Vladu; ICLR 2018. "
        "https://arxiv.org/abs/1706.06083"
    )

    @dataclass
    class Options(MethodOptions):
        name: str = "pgd_at"

    default_start = "uniform"

    def loss(self, x, y):
        x_adv = self.attack("ce")(x, y)
        return F.cross_entropy(self.student(x_adv), y), {}
