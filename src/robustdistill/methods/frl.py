"""FRL (Xu et al., ICML 2021, "To be robust or to be fair: towards fairness in adversarial
training"): fair robust learning, the reweight and the reweight + remargin variants.

TRADES with class-wise weights on its two terms and (remargin) class-wise budgets, set by Lagrange
multipliers on the class-wise constraints "clean error and boundary error exceed their averages by
at most delta". After each epoch's validation (clean and PGD-20 on the validation split):

    gamma_clean[c] = clean_err[c] - clean_err - delta,   gamma_bndy[c] = bndy_err[c] - bndy_err - delta
        (bndy_err[c] = clean accuracy - PGD-20 accuracy of class c)
    lam0 <- N(lam0 + r gamma_clean),  lam1 <- N(lam1 + 2 r gamma_bndy)    (N: clip at 0, scale the sum to <= lim)
    lam2 <- lam2 + r2 gamma_bndy                                          (remargin only)
    w0[c] = 1/C + lam0[c] - sum(lam0)/C,   w1 likewise from lam1,   eps[c] = eps * clip(exp(2 lam2[c]), 0.98, m)
    L = sum_i w0[y_i] CE(f(x_i), y_i) / sum_i w0[y_i] + beta sum_i w1[y_i] KL(f(x_i) || f(x_adv_i)) / sum_i w1[y_i]

x_adv: TRADES' inner maximisation (KL to the clean prediction, from x + 0.001 N(0,1)) inside each
sample's own ball eps[y_i]. r halves every 40 epochs (counted as the official loop does).
Defaults are the official scripts' (hannxu123/fair_robust): frlrw.py for `variant: reweight`
(delta 0.1, r 0.05, lim 0.5, beta 1.5) and frlrmrw.py for `variant: remargin` (delta 0.07, r2 0.2,
margin clip 3, and the step size max(eps[y]) / 4 of the batch). Both scripts fine-tune a pre-trained
robust model for 40 epochs at lr 0.001 (`configs/cifar10/frl_*`).
Deviations: the official loop evaluates on the validation split at the start of each epoch; here the
validation that ends the previous epoch is used (the same model), so the first update comes after the
first epoch rather than before it. The official code runs the clean forward pass twice (CE and KL
target); here once.
"""

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..attacks import ROBUST_ATTACK
from ..core.errors import ConfigError
from .base import METHODS, Method, MethodOptions
from .losses import kl_div

DEFAULTS = {  # variant -> (delta, margin rate r2, margin clip m)
    "reweight": (0.1, 0.1, 2.5),
    "remargin": (0.07, 0.2, 3.0),
}


def class_errors(summary: dict) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(clean error per class, boundary error per class, clean error, boundary error) of a validation summary."""
    clean, robust = summary["attacks"]["clean"], summary["attacks"][ROBUST_ATTACK]
    acc = torch.tensor([a if a is not None else 0.0 for a in clean["class_accuracy"]])
    acc_adv = torch.tensor([a if a is not None else 0.0 for a in robust["class_accuracy"]])
    return 1 - acc, acc - acc_adv, 1 - clean["accuracy"], clean["accuracy"] - robust["accuracy"]


def normalize_multipliers(lam: torch.Tensor, limit: float) -> torch.Tensor:
    lam = lam.clamp_min(0)
    total = lam.sum()
    return lam * (limit / total) if total > limit else lam


def cost_weights(lam: torch.Tensor) -> torch.Tensor:
    """w[c] = 1/C + lam[c] - sum(lam)/C: each class's own multiplier raises it, the others' lower it."""
    return 1 / len(lam) + lam - lam.sum() / len(lam)


@METHODS.register("frl")
class FRL(Method):
    """Fair robust learning (Xu et al., ICML 2021)."""

    summary = "fair robust learning: Lagrange-multiplier class weights (and budgets) on TRADES (Xu et al., ICML 2021)"
    paper = (
        "To be Robust or to be Fair: Towards Fairness in Adversarial Training. "
        "Xu, Liu, Li, Jain, Tang; ICML 2021. "
        "https://arxiv.org/abs/2010.06121"
    )
    needs_validation = True
    validation_attacks = ("clean", ROBUST_ATTACK)

    @dataclass
    class Options(MethodOptions):
        name: str = "frl"
        variant: Literal["reweight", "remargin"] = (
            "reweight"  # reweight: class-wise loss weights; remargin: and class-wise budgets
        )
        beta: float = 1.5  # TRADES' beta of the underlying loss
        delta: Optional[float] = None  # the fairness bound of both constraints (0.1 reweight, 0.07 remargin)
        rate: float = 0.05  # r, the multipliers' step
        margin_rate: Optional[float] = None  # r2 (0.1 reweight, unused; 0.2 remargin)
        margin_max: Optional[float] = None  # clip of exp(2 lam2) (2.5 reweight; 3 remargin)
        limit: float = 0.5  # the multipliers' sum is scaled back to at most this
        rate_halving_epochs: int = 40  # the multipliers' steps halve every this many epochs

        def validate(self):
            if self.beta < 0 or self.rate < 0 or self.limit <= 0 or self.rate_halving_epochs < 1:
                raise ConfigError("method needs beta >= 0, rate >= 0, limit > 0 and rate_halving_epochs >= 1")

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        o, c = self.options, ctx.num_classes
        delta, margin_rate, margin_max = DEFAULTS[o.variant]
        self.delta = o.delta if o.delta is not None else delta
        self.margin_rate = o.margin_rate if o.margin_rate is not None else margin_rate
        self.margin_max = o.margin_max if o.margin_max is not None else margin_max
        self.lam = torch.zeros(3, c)  # clean, boundary, margin multipliers (CPU: C numbers)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean-term weights, boundary-term weights, eps scale), one value per class, on the device."""
        scale = torch.exp(2 * self.lam[2]).clamp(0.98, self.margin_max)
        return tuple(w.to(self.device) for w in (cost_weights(self.lam[0]), cost_weights(self.lam[1]), scale))

    def loss(self, x, y):
        w0, w1, scale = (w[y] for w in self.weights())
        eps = self.ctx.attack.eps * scale
        step = eps.max() / 4 if self.options.variant == "remargin" else None
        target = self.clean_prediction(x)
        x_adv = self.attack("kl", eps=eps, step_size=None if step is None else step.expand(len(y)))(x, target=target)
        logits_nat = self.student(x)
        logits_adv = self.student(x_adv)
        natural = F.cross_entropy(logits_nat, y, reduction="none")
        boundary = kl_div(F.softmax(logits_nat, dim=1), logits_adv, "none")  # gradients through both sides
        loss = (natural * w0).sum() / w0.sum() + self.options.beta * (boundary * w1).sum() / w1.sum()
        return loss, {"loss_natural": natural.mean().detach(), "loss_boundary": boundary.mean().detach()}

    @torch.no_grad()
    def on_validation(self, summary, progress):
        o = self.options
        clean_c, bndy_c, clean, bndy = class_errors(summary)
        gamma_clean, gamma_bndy = clean_c - clean - self.delta, bndy_c - bndy - self.delta
        # the official loop halves r at the start of every 40th (1-based) epoch, before that epoch's update,
        # which is the update made here after the (0-based) epoch before it
        rate = o.rate * 0.5 ** ((progress.epoch + 2) // o.rate_halving_epochs)
        self.lam[0] = normalize_multipliers(self.lam[0] + rate * gamma_clean, o.limit)
        self.lam[1] = normalize_multipliers(self.lam[1] + 2 * rate * gamma_bndy, o.limit)
        if o.variant == "remargin":
            self.lam[2] = self.lam[2] + self.margin_rate * gamma_bndy

    def state_dict(self):
        return {"lambda": self.lam.clone()}

    def load_state_dict(self, state):
        self.lam = state["lambda"].float().cpu()

    def log_state(self):
        w0, w1, scale = self.weights()
        return {
            "class_weight_clean": w0.tolist(),
            "class_weight_boundary": w1.tolist(),
            "class_eps_scale": scale.tolist(),
        }
