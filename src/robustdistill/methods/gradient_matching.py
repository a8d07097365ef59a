"""IGDM's term, the part any adversarial distillation can add (`method.igdm` of rslad, ard, adaad,
absld, mtard, bmtard and composed; the named method `igdm` is AdaAD with it, as the official script):

    L = L_host + igdm * min(1, e / E) * KL( softmax(t(x_adv) - t(x - delta)) || softmax(s(x + delta) - s(x - delta)) )

delta = x_adv - x, e the 1-based epoch, E = `igdm_epochs` (default: train.epochs). The equations,
the paper and every difference from the official code are in `methods.igdm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.errors import ConfigError
from .base import Method, MethodOptions
from .losses import kl_div, kl_per_sample, soft_targets

IGDM_PAPER = (
    "Indirect Gradient Matching for Adversarial Robust Distillation. Hongsin Lee, Seungju Cho, Changick Kim; "
    "ICLR 2025. https://arxiv.org/abs/2312.03286 (code: https://github.com/HongsinLee/saad)"
)


@dataclass
class IGDMOptions(MethodOptions):
    """The options of a distillation method that IGDM can join."""

    igdm: float = 0.0  # IGDM's weight alpha (0: off; the official scripts: 1 on CIFAR-10, 10 on CIFAR-100)
    igdm_epochs: Optional[int] = None  # IGDM's warm-up E: weight alpha * min(1, epoch / E); None: train.epochs

    def __post_init__(self):
        if self.igdm < 0:
            raise ConfigError(f"method.igdm must be >= 0 (0: off), got {self.igdm}")
        if self.igdm_epochs is not None and self.igdm_epochs < 1:
            raise ConfigError(f"method.igdm_epochs must be >= 1 (or null: train.epochs), got {self.igdm_epochs}")


def igdm_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    s_plus: Optional[torch.Tensor] = None,
    sample_weights: Optional[torch.Tensor] = None,
    t_plus: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """L_IGDM for a batch; `s_plus`, `t_plus`: the student's and the teacher's logits on x_adv when
    the host has them (else computed, the student's on x + delta); `sample_weights` (B,): the mean
    of each sample's KL times its weight (SAAD) instead of the batch mean."""
    delta = (x_adv - x).detach()
    with torch.no_grad():
        t_plus = teacher(x_adv) if t_plus is None else t_plus
        t_minus = teacher(x - delta)
    if s_plus is None:
        s_plus = student(x + delta)
    s_minus = student(x - delta)
    target = soft_targets(t_plus - t_minus)
    if sample_weights is None:
        return kl_div(target, s_plus - s_minus, "batchmean")
    return (sample_weights * kl_per_sample(target, s_plus - s_minus)).mean()


def igdm_weight(options: IGDMOptions, epoch: int, epochs: int) -> float:
    """alpha * min(1, e / E) for the 0-based `epoch` of a run of `epochs`."""
    return options.igdm * min(1.0, (epoch + 1) / (options.igdm_epochs or epochs))


def with_igdm(
    method: Method,
    loss: torch.Tensor,
    stats: dict[str, Any],
    x: torch.Tensor,
    x_adv: torch.Tensor,
    s_adv: Optional[torch.Tensor] = None,
    sample_weights: Optional[torch.Tensor] = None,
    t_adv: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The host's (loss, stats) with IGDM's term added when `method.igdm` is on (the robust
    teacher's); `sample_weights`: SAAD's w, which weighs IGDM's per-sample terms as the adversarial
    ones; `t_adv`: the robust teacher's logits on x_adv when the host has them."""
    options = method.options
    if not getattr(options, "igdm", 0.0):
        return loss, stats
    weight = igdm_weight(options, method.progress.epoch, method.progress.epochs)
    term = igdm_loss(method.student, method.ctx.teachers["robust"], x, x_adv, s_adv, sample_weights, t_adv)
    return loss + weight * term, {**stats, "loss_igdm": term.detach(), "igdm_weight": weight}
