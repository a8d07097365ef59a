"""MTARD (Zhao et al., ECCV 2022) and B-MTARD (balanced MTARD): multi-teacher adversarial
robustness distillation.

A clean teacher teaches the student on clean inputs, a robust teacher on the student's
adversarial inputs:

    x_adv  = 10-step PGD on the student's cross-entropy with the hard label (from x + 0.001 N(0,1))
    L_adv  = KL(softmax(t_adv(x_adv) / tau_adv) || s(x_adv)),  L_nat = KL(softmax(t_nat(x) / tau_nat) || s(x))
    L      = loss_scale * (w_adv L_adv + w_nat L_nat)

- Entropy-Based Balance (`ebb`, B-MTARD): every step, after the losses, the temperatures move by
  eta_tau = 0.001 towards equal soft-label entropy (`EntropyBalance`, clipped to [1, 10]); the new
  temperatures act from the next step.
- Normalization Loss Balance (`nlb`): every step the weights move by eta_w = 0.025 towards the
  objectives' relative progress (`LossBalance`); the updated weights weigh this step's loss.
Both rates are multiplied by 0.1 at every lr decay. Ablations: Baseline (ebb: false, nlb: false,
so w = 1/2, tau = 1), +NLB (= MTARD), +EBB, both (= B-MTARD). Model selection: W-Robust Acc,
(clean + PGD-20) / 2, on the validation split. CIFAR-100 reference scripts use loss_scale 10.

Investigation option (not the papers'; its default is theirs): `adversarial_target: clean` makes the
adversarial term's target the robust teacher on the clean input, softmax(t_adv(x) / tau_adv) (RSLAD's
target), instead of on the student's adversarial example; EBB then balances that target's entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.errors import ConfigError
from .balance import EntropyBalance, LossBalance
from .base import METHODS, Method
from .gradient_matching import IGDMOptions, with_igdm
from .losses import kl_div, soft_targets


@dataclass
class MTARDOptions(IGDMOptions):
    name: str = "mtard"
    ebb: bool = False  # Entropy-Based Balance of the teachers' temperatures (B-MTARD)
    nlb: bool = True  # Normalization Loss Balance of the two terms' weights (MTARD)
    reduction: Literal["elementwise_mean", "batchmean"] = (
        "elementwise_mean"  # KL reduction: the published elementwise mean (divided by C), or batchmean
    )
    loss_scale: float = 1.0  # multiplies the loss (10 in the CIFAR-100 reference scripts)
    temperature_lr: float = 0.001  # eta_tau
    weight_lr: float = 0.025  # eta_w
    temperature_min: float = 1.0  # EBB's temperatures are clipped to [temperature_min, temperature_max]
    temperature_max: float = 10.0  # the upper clip of EBB's temperatures
    rate_decay: float = 0.1  # both rates are multiplied by this at every lr milestone
    adversarial_target: Literal["adversarial", "clean"] = "adversarial"  # the robust teacher's input in L_adv

    def validate(self):
        if not 0 < self.temperature_min <= 1.0 <= self.temperature_max:
            raise ConfigError("method temperatures need 0 < temperature_min <= 1 <= temperature_max")
        if self.loss_scale <= 0 or self.temperature_lr < 0 or not 0 <= self.weight_lr <= 1:
            raise ConfigError("method needs loss_scale > 0, temperature_lr >= 0 and 0 <= weight_lr <= 1")


@METHODS.register("mtard")
class MTARD(Method):
    summary = "multi-teacher adversarial robustness distillation (Zhao et al., ECCV 2022)"
    paper = (
        "Enhanced Accuracy and Robustness via Multi-Teacher Adversarial Distillation. "
        "Zhao et al.; ECCV 2022. "
        "https://doi.org/10.1007/978-3-031-19772-7_34"
    )
    Options = MTARDOptions
    teachers = ("robust", "clean")
    selection_metric = "w_robust"

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        o = self.options
        self.entropy = EntropyBalance(1.0, o.temperature_min, o.temperature_max, self.device)
        self.weights = LossBalance(2, self.device)  # (adv, nat)

    def _rate(self, base: float) -> float:
        return base * self.options.rate_decay**self.progress.lr_decays

    def loss(self, x, y):
        o = self.options
        x_adv = self.attack("ce")(x, y)
        with torch.no_grad():
            tau_adv, tau_nat = self.entropy.tau[0], self.entropy.tau[1]
            q_adv = soft_targets(
                self.ctx.teachers["robust"](x_adv if o.adversarial_target == "adversarial" else x), tau_adv
            )
            q_nat = soft_targets(self.ctx.teachers["clean"](x), tau_nat)
        s_adv = self.student(x_adv)
        adv = kl_div(q_adv, s_adv, o.reduction)
        nat = kl_div(q_nat, self.student(x), o.reduction)
        if o.nlb:
            self.weights.update(torch.stack([adv.detach(), nat.detach()]), self._rate(o.weight_lr), len(y))
        if o.ebb:
            self.entropy.observe(q_adv, q_nat, len(y))
        w_adv, w_nat = self.weights.w[0], self.weights.w[1]
        loss = o.loss_scale * (w_adv * adv + w_nat * nat)
        return with_igdm(self, loss, {"loss_adv": adv.detach(), "loss_nat": nat.detach()}, x, x_adv, s_adv)

    def on_step_end(self, progress):
        self.entropy.apply_observed(self._rate(self.options.temperature_lr))

    def state_dict(self):
        return {"entropy_balance": self.entropy.state_dict(), "loss_balance": self.weights.state_dict()}

    def load_state_dict(self, state):
        self.entropy.load_state_dict(state["entropy_balance"])
        self.weights.load_state_dict(state["loss_balance"])

    def log_state(self):
        tau, w = self.entropy.tau.tolist(), self.weights.w.tolist()
        return {"temperature_adv": tau[0], "temperature_nat": tau[1], "weight_adv": w[0], "weight_nat": w[1]}


@METHODS.register("bmtard")
class BMTARD(MTARD):
    summary = "balanced MTARD: entropy-based balance of the teachers' temperatures (Zhao et al., TPAMI 2024)"
    paper = (
        "Mitigating Accuracy-Robustness Trade-off via Balanced Multi-Teacher Adversarial Distillation. "
        "Zhao, Wang, Wei; IEEE TPAMI 2024. https://arxiv.org/abs/2306.16170"
    )

    @dataclass
    class Options(MTARDOptions):
        name: str = "bmtard"
        ebb: bool = True  # Entropy-Based Balance on: B-MTARD
        nlb: bool = True
