"""SAAD's sample weights, the part a soft-label distillation can take (`method.saad` of rslad, adaad,
absld and composed; the named method `saad` is the official script's whole method):

    H_i = H_gamma(softmax(t(x_adv_i)))               the robust teacher's Renyi entropy of order gamma
    w_i = scale * (H_i - min_j H_j)                  (>= 0; 0 for the teacher's most confident sample)
    v_i = (w_i - min_j w_j) / (max_j w_j - min_j w_j + 1e-8)
    L   = w_adv * mean_i(w_i l_adv,i) + w_nat * mean_i((1 - v_i) l_nat,i)   [+ IGDM's terms weighted by w_i]

l_adv,i and l_nat,i are each sample's share of the host's own KL terms (in its reduction), w_adv and
w_nat the host's weights: the adversarial term leans on the samples where the teacher is unsure at
x_adv (SAAD's proxy for the adversarial examples that transfer from student to teacher), the clean
term on the others. The minima and maxima run over the global batch (all ranks). The equations,
the paper and every difference from the official code are in `methods.saad`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..core.distributed import all_reduce_max
from ..core.errors import ConfigError
from .base import Method
from .gradient_matching import IGDMOptions
from .losses import Reduction, kl_div, kl_per_sample

SAAD_PAPER = (
    "Sample-wise Adaptive Weighting for Transfer Consistency in Adversarial Distillation. "
    "Hongsin Lee, Hye Won Chung; TMLR 2026. https://arxiv.org/abs/2512.10275 (code: https://github.com/HongsinLee/saad)"
)


@dataclass
class SAADOptions(IGDMOptions):
    """The options of a soft-label distillation that SAAD's weights (and IGDM's term) can join."""

    saad: bool = False  # SAAD's per-sample weights: w on the adversarial term (and IGDM's), 1 - w_norm on the clean
    saad_gamma: float = 1.0  # the order gamma of the teacher's Renyi entropy (1: Shannon; the official scripts: 1)
    saad_scale: float = 5.0  # w = saad_scale * (H - min H) (the official code's entropy_scale, 5)

    def __post_init__(self):
        super().__post_init__()
        if self.saad_gamma <= 0:
            raise ConfigError(f"method.saad_gamma (the Renyi order) must be > 0, got {self.saad_gamma}")
        if self.saad_scale <= 0:
            raise ConfigError(f"method.saad_scale must be > 0, got {self.saad_scale}")


def renyi_entropy(logits: torch.Tensor, order: float, eps: float = 1e-12) -> torch.Tensor:
    """Each row's Renyi entropy of order `order` of softmax(logits), shape (B,); order 1: Shannon's
    (the official code's form, with eps inside the logs)."""
    p = F.softmax(logits.float(), dim=1)
    if abs(order - 1.0) < 1e-6:
        return -(p * torch.log(p + eps)).sum(dim=1)
    return torch.log((p**order).sum(dim=1) + eps) / (1.0 - order)


@torch.no_grad()
def saad_weights(teacher_adv: torch.Tensor, gamma: float = 1.0, scale: float = 5.0) -> tuple[torch.Tensor, ...]:
    """(w, v): SAAD's weights of the adversarial terms and their min-max scaled form, from the
    teacher's logits on x_adv; minima and maxima over the global batch under DDP."""
    entropy = renyi_entropy(teacher_adv, gamma)
    lowest = -all_reduce_max(-entropy.min().clone())
    w = (scale * (entropy - lowest)).clamp(min=0.0)
    w_max = all_reduce_max(w.max().clone())
    # (w - min w) / (max w - min w + 1e-8), as the official code; min w is exactly 0 (the weight of the
    # global batch's most confident sample), so one all-reduce fewer gives the same bits
    return w, w / (w_max + 1e-8)


def saad_terms(
    method: Method,
    q_adv: torch.Tensor,
    s_adv: torch.Tensor,
    q_nat: torch.Tensor,
    s_nat: torch.Tensor,
    reduction: Reduction,
    x_adv: torch.Tensor,
    t_adv: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], dict[str, Any]]:
    """A host's two KL terms (adv, nat), weighted per sample when `method.saad` is on, with w (None
    when off: the plain terms) and the robust teacher's logits on x_adv (computed when not given), for
    IGDM's term, and stats to log."""
    o = method.options
    if not getattr(o, "saad", False):
        return kl_div(q_adv, s_adv, reduction), kl_div(q_nat, s_nat, reduction), None, t_adv, {}
    if t_adv is None:
        with torch.no_grad():
            t_adv = method.ctx.teachers["robust"](x_adv)
    w, v = saad_weights(t_adv, o.saad_gamma, o.saad_scale)
    adv = (w * kl_per_sample(q_adv, s_adv, reduction)).mean()
    nat = ((1 - v) * kl_per_sample(q_nat, s_nat, reduction)).mean()
    return adv, nat, w, t_adv, {"saad_weight_mean": w.mean()}
