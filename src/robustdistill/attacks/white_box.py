"""The gradient attacks of the papers' tables: clean (the reference), FGSM, PGD and CW."""

from __future__ import annotations

import torch

from .base import Attack, batches, pgd_label, pgd_parameters, register, run_pgd
from .pgd import FGSM


@register
class Clean(Attack):
    name = "clean"
    kind = "reference"
    help = "no attack: the clean accuracy"

    def parameters(self, s):
        return {}

    def run(self, model, x, y, env):
        return x, None


@register
class FastGradientSign(Attack):
    name = "fgsm"
    help = "one gradient step of size eps (its sign under L-inf, its direction under L2)"

    def parameters(self, s):
        return {"eps": s.eps, "loss": "ce"}

    def run(self, model, x, y, env):
        s = env.settings
        attack = FGSM(model, s.eps, norm=s.norm)
        out = [
            attack(x[i : i + s.batch_size], y[i : i + s.batch_size])
            for i in batches(len(x), s.batch_size, self.name, env.progress)
        ]
        return torch.cat(out or [x]), None


@register
class ProjectedGradientDescent(Attack):
    name = "pgd<N>"
    family = "pgd"
    help = "PGD on the cross-entropy, N steps (pgd20: the papers' PGD-20), uniform start, eval.restarts"

    def parameters(self, s):
        return pgd_parameters(s, self.steps, "ce")

    def label(self, s):
        return pgd_label("pgd", self.steps, s)

    def run(self, model, x, y, env):
        return run_pgd(model, x, y, env, self.name, steps=self.steps), None


@register
class CarliniWagner(Attack):
    name = "cw<N>"
    family = "cw"
    help = "PGD on the Carlini-Wagner margin, N steps (cw30: the papers' CW-inf), eval.restarts"

    def parameters(self, s):
        return pgd_parameters(s, self.steps, "cw margin")

    def label(self, s):
        return pgd_label("cw", self.steps, s)

    def run(self, model, x, y, env):
        return run_pgd(model, x, y, env, self.name, steps=self.steps, loss="cw"), None
