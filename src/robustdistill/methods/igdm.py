"""IGDM, the Indirect Gradient Distillation Module (Lee, Cho and Kim, ICLR 2025, "Indirect Gradient
Matching for Adversarial Robust Distillation", https://arxiv.org/abs/2312.03286), a term any
adversarial distillation adds to its own loss: `method.igdm` of rslad, ard, adaad, absld, mtard,
bmtard and composed. The method `igdm` is the official script's combination, AdaAD + IGDM.

With the host method's adversarial example x_adv and delta = x_adv - x,

    L_IGDM = KL( softmax(t(x_adv) - t(x - delta)) || softmax(s(x + delta) - s(x - delta)) )   (batchmean)
    L      = L_host + igdm * min(1, e / E) * L_IGDM

e the 1-based epoch, E = `igdm_epochs` (default: train.epochs), t the robust teacher. Adversarial
training makes a model locally linear, so t(x + delta) - t(x - delta) is about 2 J_t(x) delta:
matching the two differences matches the student's input gradient to the teacher's along delta
without computing either.

Compared with the official code (HongsinLee/saad: igdm.py, AdaAD + IGDM, and saad.py) step by step
on identical inputs (the loss and the weights over steps of the warm-up):
- the same loss, schedule and reduction (`KLDivLoss(reduction="batchmean")`); s(x + delta) is the
  host's own s(x_adv) where the host computes it (the official script runs the student on X + delta,
  equal to x_adv up to float rounding), and both terms' gradients flow through it, as there;
- x - delta is not clipped to [0, 1], as there;
- igdm.py divides the epoch by a hard-coded 200 (its default number of epochs), saad.py by the
  number of epochs: `igdm_epochs` (default train.epochs); the factor is capped at 1 here, which the
  official loops never pass (their epochs end at E);
- the official igdm.py, adaad.py and rslad.py call their inner maximisation with
  `step_size=8/255, epsilon=2/255`, a budget of 2/255 (saad.py: 2/255 steps within 8/255); here the
  inner maximisation is the config's `attack` section: `attack.eps=2/255 attack.step_size=8/255`
  reproduces those scripts;
- the official igdm.py runs AdaAD's term with batchmean (`igdm` here; `adaad`'s own default is its
  authors' mean over B x C) and no clean term; this AdaAD also runs the student on x for its clean
  term (weighted 0 at alpha = 1), which moves BatchNorm's running statistics but no gradient.
For MTARD and B-MTARD the term is added after NLB's weighted sum and loss scale: NLB does not
balance it.
"""

from dataclasses import dataclass
from typing import Literal

from .adaad import AdaAD
from .base import METHODS
from .gradient_matching import IGDM_PAPER


@METHODS.register("igdm")
class IGDM(AdaAD):
    """AdaAD with IGDM's term, as the official IGDM script trains."""

    summary = "AdaAD + indirect gradient matching of the teacher's input gradient (Lee et al., ICLR 2025)"
    paper = IGDM_PAPER

    @dataclass
    class Options(AdaAD.Options):
        name: str = "igdm"
        igdm: float = 1.0  # IGDM's weight alpha (the official scripts: 1 on CIFAR-10, 10 on CIFAR-100)
        reduction: Literal["mean", "batchmean"] = "batchmean"  # the KL reduction of AdaAD's term (the script's)
