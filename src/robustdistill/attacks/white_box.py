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
    help = "one signed-gradient step of size eps"

    def parameters(self, s):
        return {"eps": s.eps, "loss": "ce"}

    def run(self, model, x, y, env):
        s = env.settings
        attack = FGSM(model, s.eps)
        out = [
            attack(x[i : i + s.batch_size], y[i : i + s.batch_size])
            for i in batches(len(x), s.batch_size, self.name, env.progress)
        ]
        return torch.cat(out or [x]), None


@register
class ProjectedGradientDescent(Attack):
    name = "pgd20"  # the name reports and model selection know; `eval.pgd_steps` sets the steps
    help = "PGD on the cross-entropy, eval.pgd_steps steps (20), uniform start, eval.restarts"

    def parameters(self, s):
        return pgd_parameters(s, s.pgd_steps, "ce")

    def label(self, s):
        return pgd_label("pgd", s.pgd_steps, s)

    def run(self, model, x, y, env):
        return run_pgd(model, x, y, env, self.name, steps=env.settings.pgd_steps), None


@register
class CarliniWagner(Attack):
    name = "cw"
    help = "PGD on the Carlini-Wagner margin, eval.cw_steps steps (30)"

    def parameters(self, s):
        return pgd_parameters(s, s.cw_steps, "cw margin")

    def label(self, s):
        return pgd_label("cw", s.cw_steps, s)

    def run(self, model, x, y, env):
        return run_pgd(model, x, y, env, self.name, steps=env.settings.cw_steps, loss="cw"), None
