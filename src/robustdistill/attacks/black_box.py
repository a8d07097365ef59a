"""Attacks that do not use the evaluated model's gradients: Square (queries only) and transfer
(PGD crafted on a surrogate model, e.g. a teacher)."""

from __future__ import annotations

import torch
from pyautoattack.square import SquareAttack

from ..core.errors import UserError
from .base import Attack, batches, pgd_parameters, register, run_pgd


@register
class Square(Attack):
    name = "square"
    kind = "black-box"
    help = "the Square attack (pyautoattack), eval.square_queries queries (5000)"

    def parameters(self, s):
        return {"eps": s.eps, "queries": s.square_queries, "package": "pyautoattack"}

    def label(self, s):
        return f"square{s.square_queries}"

    def run(self, model, x, y, env):
        """Square on chunks of `settings.block` samples (forward passes only: the per-query overhead
        dominates small models); pyautoattack reseeds per call, and a chunk is the same samples
        whatever the number of ranks."""
        s = env.settings
        attack = SquareAttack(
            model,
            norm=s.norm,
            n_queries=s.square_queries,
            eps=s.eps,
            p_init=0.8,
            n_restarts=1,
            seed=s.seed,
            verbose=False,
            device=x.device,
            resc_schedule=False,
        )
        out = [
            attack.perturb(x[i : i + s.block], y[i : i + s.block])
            for i in batches(len(x), s.block, self.name, env.progress)
        ]
        return torch.cat(out or [x]), None


@register
class Transfer(Attack):
    name = "transfer"
    kind = "black-box"
    needs_surrogate = True
    help = "PGD-20 crafted on eval.surrogate (default: the robust teacher), judged on the model"

    steps = 20  # PGD-20, as the papers' transfer attacks

    def parameters(self, s):
        return pgd_parameters(s, self.steps, "ce on the surrogate")

    def run(self, model, x, y, env):
        if env.surrogate is None:
            raise UserError(
                "the transfer attack needs a surrogate model: "
                "eval.surrogate (or --surrogate) = a run folder or checkpoint"
            )
        return run_pgd(model, x, y, env, self.name, steps=self.steps, source=env.surrogate), None
