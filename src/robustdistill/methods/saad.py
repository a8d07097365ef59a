"""SAAD, Sample-wise Adaptive Adversarial Distillation (Lee and Chung, TMLR 2026, "Sample-wise
Adaptive Weighting for Transfer Consistency in Adversarial Distillation",
https://arxiv.org/abs/2512.10275): the official script's whole method. Its sample weights alone are
`method.saad` of rslad, adaad, absld and composed (`methods.sample_weighting`).

A stronger teacher does not by itself make a stronger student: what matters is whether the
student's adversarial examples transfer to the teacher. SAAD weighs each sample by the robust
teacher's uncertainty at the student's adversarial example, a proxy for that transfer. With t the
robust teacher, s the student, delta = x_adv - x:

    inner max:  x_adv = argmax_{x' in B(x, eps)} sum_i KL(softmax(t~(x'_i)) || softmax(s(x'_i)))
                t~(x') = t(x) + lambda e_y (grad_x t_y(x) . (x' - x))   (the teacher linearised at x,
                its true-class logit only; 10-step PGD from x + 0.001 N(0, 1))
    H_i   = H_gamma(softmax(t(x_adv_i)))                    Renyi entropy of order gamma
    w_i   = scale (H_i - min_j H_j),   v_i = (w_i - min w) / (max w - min w + 1e-8)
    L     = mean_i [ w_i (KL_i(t(x_adv) || s(x_adv))
                          + alpha e / E KL_i(t(x_adv) - t(x - delta) || s(x_adv) - s(x - delta)))
                     + beta (1 - v_i) KL_i(t(x) || s(x)) ]

(KL_i: sample i's KL between the softmaxes, summed over classes; the second is IGDM's term, with
its linear warm-up e / E.) From epoch `average_from` (1-based) on, the model validated, selected
and reported is the equal-weight average of the student's weights after each epoch (SWA), its
BatchNorm statistics recomputed over that epoch's training batches.

Defaults are the official main.sh (HongsinLee/saad): beta 0, gamma 1, alpha 1 (10 on CIFAR-100),
lambda 1, scale 5, SWA from epoch 95 of 200, lr 0.1 decayed at 100 and 150. Compared with the
official code (saad.py, attacks.saad_inner_loss) step by step on identical inputs (the inner
maximisation's iterates, the loss, the weights over steps of IGDM's warm-up):
- the same operations and order: the student on x_adv, on x - delta, then on x (in train mode; the
  clean term is computed, and moves BatchNorm's statistics, also at beta = 0); x - delta not clipped;
- the inner maximisation is the config's `attack` section (its budget, steps, start): the script
  runs 10 steps of 2/255 within 8/255 from x + 0.001 N(0, 1), which the CIFAR recipes set;
- SWA: the script evaluates the average on the test split every epoch and reports the last one;
  here the average is validated every epoch on the validation split and the best one is kept
  (`train.select_on: val`, as every method here); its BatchNorm statistics are recomputed with the
  script's `update_bn` rule (a cumulative mean over the batches) on the epoch's own training
  batches; under DDP each rank recomputes on its share of them and the ranks' statistics are
  averaged (each batch's statistics then come from a share of the global batch, as BatchNorm's
  own statistics do during DDP training);
- the weights' minimum and maximum are the global batch's under DDP (the script runs one process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from .base import METHODS, Method
from .gradient_matching import igdm_weight
from .losses import kl_per_sample, soft_targets
from .sample_weighting import SAAD_PAPER, SAADOptions, saad_weights


class LinearisedTeacher(nn.Module):
    """The teacher's logits at x with the true class's logit moved along its input gradient:
    t(x) + lambda e_y (g . (x' - x)), differentiable in x' (SAAD's inner-maximisation target)."""

    def __init__(self, logits: torch.Tensor, gradient: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: float):
        super().__init__()
        self.logits, self.gradient, self.x, self.lam = logits.detach(), gradient.detach(), x.detach(), lam
        self.onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)

    def forward(self, x_adv: torch.Tensor) -> torch.Tensor:
        correction = (self.gradient * (x_adv - self.x)).flatten(1).sum(dim=1)
        return self.logits + self.lam * correction[:, None] * self.onehot


def logits_and_true_class_gradient(
    teacher: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits on x and grad_x sum_i t_{y_i}(x_i) (one backward through the teacher)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = teacher(x)
        (gradient,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x)
    return logits.detach(), gradient


@METHODS.register("saad")
class SAAD(Method):
    """Sample-wise adaptive adversarial distillation, as the official SAAD script trains."""

    summary = "sample-wise adaptive weighting for transfer consistency, with IGDM and SWA (Lee & Chung, TMLR 2026)"
    paper = SAAD_PAPER

    @dataclass
    class Options(SAADOptions):
        name: str = "saad"
        saad: bool = True  # SAAD's per-sample weights (false: every weight 1 on the adversarial terms, 0 on the clean)
        igdm: float = 1.0  # IGDM's weight alpha (the official scripts: 1 on CIFAR-10, 10 on CIFAR-100)
        beta: float = 0.0  # the clean term's weight, beta (1 - w_norm) KL(t(x) || s(x)) (the official main.sh: 0)
        inner_lambda: float = 1.0  # lambda of the inner maximisation's linearised teacher (0: the teacher at x)
        average_from: Optional[int] = 95  # SWA from this 1-based epoch (BatchNorm recomputed); null: no averaging

        def validate(self):
            if self.beta < 0:
                raise ConfigError(f"method.beta must be >= 0, got {self.beta}")
            if self.average_from is not None and self.average_from < 1:
                raise ConfigError(f"method.average_from must be >= 1 (a 1-based epoch) or null: {self.average_from}")

    teachers = ("robust",)

    @classmethod
    def averages_weights(cls, options) -> bool:
        return options.average_from is not None

    @classmethod
    def validates(cls, options) -> bool:
        return options.average_from is not None  # the average is updated after every epoch's validation

    @classmethod
    def recomputes_batchnorm(cls, options) -> bool:
        return options.average_from is not None

    def average_decay(self, summary, progress) -> Optional[float]:
        done = progress.epoch + 1 - self.options.average_from  # epochs already in the average
        return None if done < 0 else done / (done + 1)

    def loss(self, x, y):
        o, teacher = self.options, self.ctx.teachers["robust"]
        t_clean, gradient = logits_and_true_class_gradient(teacher, x, y)
        x_adv = self.attack("kl")(x, target=LinearisedTeacher(t_clean, gradient, x, y, o.inner_lambda))
        delta = x_adv - x
        with torch.no_grad():
            t_plus, t_minus = teacher(x_adv), teacher(x - delta)
        s_plus = self.student(x_adv)
        s_minus = self.student(x - delta)
        s_clean = self.student(x)
        if o.saad:
            w, v = saad_weights(t_plus, o.saad_gamma, o.saad_scale)
        else:
            w, v = torch.ones(len(x), device=x.device), torch.zeros(len(x), device=x.device)
        adv = kl_per_sample(soft_targets(t_plus), s_plus)
        matching = kl_per_sample(soft_targets(t_plus - t_minus), s_plus - s_minus)
        clean = kl_per_sample(soft_targets(t_clean), s_clean)
        alpha = igdm_weight(o, self.progress.epoch, self.progress.epochs)
        loss = (w * (adv + alpha * matching) + o.beta * (1 - v) * clean).mean()
        stats = {
            "loss_adv": adv.mean().detach(),
            "loss_igdm": matching.mean().detach(),
            "loss_nat": clean.mean().detach(),
            "igdm_weight": alpha,
            "saad_weight_mean": w.mean(),
        }
        return loss, stats
