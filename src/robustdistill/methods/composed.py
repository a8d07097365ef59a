"""Composed: ABSLD's and B-MTARD's parts, each chosen on its own, and the combinations neither paper
tried (`bmtard_absld`, `bmtard_absld_tx`).

Both papers train on two terms, the student on its adversarial example x_adv against an adversarial
target q_adv and on the clean input x against a natural target q_nat:

    L = loss_scale * (w_adv KL(q_adv || s(x_adv)) + w_nat KL(q_nat || s(x)))
    q_k = softmax(z_k / (T_k tau_k[y]))                                       k in {adv, nat}

and differ only in how each piece is chosen. The parts (method options):
- `nat_teacher`: the teacher of q_nat, `robust` (RSLAD, ABSLD) or `clean` (MTARD, B-MTARD); q_adv's
  is always the robust teacher.
- `adversarial_target`: the robust teacher's input for q_adv: `clean`, z_adv = t(x) (RSLAD, ABSLD),
  or `adversarial`, z_adv = t(x_adv) (MTARD, B-MTARD).
- `entropy_balance` (EBB, B-MTARD): T_adv, T_nat, two scalars moved every step by `ebb_lr` towards
  equal soft-label entropy of q_adv and q_nat, clipped to [`ebb_min`, `ebb_max`]; off: T = 1.
- `adv_temperature`, `nat_temperature`: `fixed` (tau = 1) or `anti_bias` (ABSLD): tau_k in R^C moved
  at every epoch end by `anti_bias_rate` against the gap between each class's error risk and the mean
  risk, the risk being the student's cross-entropy on the target's inputs (x_adv for q_adv, x for
  q_nat), clipped to [`anti_bias_min`, `anti_bias_max`].
- `weights`: `fixed` (w_adv = `adv_weight`, w_nat = 1 - w_adv) or `nlb` (NLB: moved every step by
  `nlb_lr` towards the two terms' relative progress; the updated weights weigh this step's loss).
- `attack_loss`: the inner maximisation's loss, `kl` to q_adv (RSLAD, ABSLD) or `ce` with the hard
  label (MTARD, B-MTARD). `kl` needs q_adv before x_adv exists, so not with `adversarial_target:
  adversarial` (refused).
Every rate is multiplied by `rate_decay` at every lr decay, with each paper's timing (EBB and NLB per
step with the decays in force; ABSLD at the epoch end with the next epoch's, as the official loop).

Why the combination is built this way (`bmtard_absld`): EBB sets how hard each teacher's knowledge
is overall, ABSLD how hard it is per class; the two act on different axes, so the class-wise
temperature multiplies EBB's scalar (T_k tau_k[y]) rather than replacing it, and EBB balances the
entropies of the targets as the student receives them (with the class-wise factor), the quantity
it exists to balance. Each teacher's class-wise temperature follows the risk of the inputs it
teaches on: the clean risk for the clean teacher's q_nat, the adversarial risk for the robust
teacher's q_adv, which is ABSLD's own pairing. NLB weighs the two terms as in B-MTARD. The
checkpoint is selected as ABSLD selects (PGD-20 + worst-class PGD-20 on validation): the point of the
combination is fairness on top of B-MTARD's trade-off, and W-Robust Acc would ignore the worst class.
`bmtard_absld_tx` is the same with t(x) as the adversarial target: the digits experiment found
t(x_adv) to be what keeps B-MTARD below RSLAD (`bmtard_tx`).

`preset` fills every part not given (`PRESETS`): `rslad`, `absld`, `mtard`, `bmtard`,
`bmtard_absld`, `bmtard_absld_tx`; composed with the preset of a named method it computes that
method's loss, gradients and adaptive state (held equal by tests over epochs and lr decays). The
config a run records holds every part, resolved.

Two newer parts join any preset: `igdm` (IGDM's gradient-matching term, `methods.gradient_matching`)
and `saad` (SAAD's per-sample weights on the two terms, `methods.sample_weighting`); with SAAD, NLB
balances the weighted terms.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from .balance import ClassWiseTemperature, EntropyBalance, LossBalance
from .base import METHODS, Method
from .gradient_matching import IGDMOptions, with_igdm
from .losses import soft_targets
from .sample_weighting import SAADOptions, saad_terms

# each preset's parts; the rates and ranges are the named methods' defaults
_TWO_TEACHERS = {"nat_teacher": "clean", "adversarial_target": "adversarial", "attack_loss": "ce"}
_ONE_TEACHER = {"nat_teacher": "robust", "adversarial_target": "clean", "attack_loss": "kl"}
PRESETS: dict[str, dict[str, Any]] = {
    "rslad": {**_ONE_TEACHER, "weights": "fixed", "select": "robust"},
    "absld": {
        **_ONE_TEACHER,
        "adv_temperature": "anti_bias",
        "nat_temperature": "anti_bias",
        "weights": "fixed",
        "select": "robust_plus_worst",
    },
    "mtard": {**_TWO_TEACHERS, "weights": "nlb", "select": "w_robust"},
    "bmtard": {**_TWO_TEACHERS, "entropy_balance": True, "weights": "nlb", "select": "w_robust"},
    "bmtard_absld": {
        **_TWO_TEACHERS,
        "entropy_balance": True,
        "adv_temperature": "anti_bias",
        "nat_temperature": "anti_bias",
        "weights": "nlb",
        "select": "robust_plus_worst",
    },
}
PRESETS["bmtard_absld_tx"] = {**PRESETS["bmtard_absld"], "adversarial_target": "clean"}
PART_DEFAULTS: dict[str, Any] = {  # what a part is when neither the config nor the preset sets it
    "entropy_balance": False,
    "adv_temperature": "fixed",
    "nat_temperature": "fixed",
}


@dataclass
class ComposedOptions(SAADOptions):
    name: str = "composed"
    preset: str = "rslad"  # fills every part not given: rslad, absld, mtard, bmtard, bmtard_absld, bmtard_absld_tx
    # the parts (None only before `config_upgrade` resolves them from the preset)
    nat_teacher: Optional[Literal["robust", "clean"]] = (
        None  # the natural term's teacher: robust (RSLAD, ABSLD) or clean (MTARD)
    )
    adversarial_target: Optional[Literal["clean", "adversarial"]] = (
        None  # the adversarial term's teacher input: x (RSLAD) or x_adv (MTARD)
    )
    entropy_balance: Optional[bool] = None  # EBB's scalar temperatures T_adv, T_nat (B-MTARD)
    adv_temperature: Optional[Literal["fixed", "anti_bias"]] = (
        None  # the adversarial target's class-wise tau: fixed, or ABSLD's anti-bias update
    )
    nat_temperature: Optional[Literal["fixed", "anti_bias"]] = None  # the same for the natural target
    weights: Optional[Literal["fixed", "nlb"]] = None  # the terms' weights: fixed (adv_weight), or NLB's (MTARD)
    attack_loss: Optional[Literal["kl", "ce"]] = (
        None  # inner max: KL to the adversarial target (RSLAD), or CE with the label (MTARD)
    )
    select: Optional[Literal["robust", "robust_plus_worst", "w_robust"]] = (
        None  # the validation metric that picks the best checkpoint
    )
    # the parts' constants (each paper's default)
    adv_weight: float = 5 / 6  # fixed weights: w_adv; w_nat = 1 - w_adv
    reduction: Literal["elementwise_mean", "batchmean"] = (
        "elementwise_mean"  # KL reduction: the published elementwise mean (divided by C), or batchmean
    )
    loss_scale: float = 1.0  # multiplies the loss (10 in B-MTARD's CIFAR-100 scripts)
    ebb_lr: float = 0.001  # EBB's step per training step
    ebb_min: float = 1.0  # EBB's temperatures are clipped to [ebb_min, ebb_max]
    ebb_max: float = 10.0  # the upper clip of EBB's temperatures
    nlb_lr: float = 0.025  # NLB's step per training step
    anti_bias_rate: float = 0.1  # ABSLD's rate r: each epoch's step against the class-wise risk gap
    anti_bias_init: float = 1.0  # the class-wise temperatures' start
    anti_bias_min: float = 0.5  # the class-wise temperatures are clipped to [anti_bias_min, anti_bias_max]
    anti_bias_max: float = 5.0  # the upper clip of the class-wise temperatures
    rate_decay: float = 0.1  # every rate (EBB, NLB, anti-bias) is multiplied by this at each lr milestone

    @classmethod
    def config_upgrade(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """Every part the section does not set, from its preset (so a run's config.yaml holds them all)."""
        preset = data.get("preset", cls.preset)
        if preset not in PRESETS:
            raise ConfigError(f"{where}.preset: unknown preset '{preset}'; one of {', '.join(PRESETS)}")
        parts = {**PART_DEFAULTS, **PRESETS[preset]}
        return {**{k: v for k, v in parts.items() if data.get(k) is None}, **data}

    def validate(self):
        optional = {f.name for f in fields(IGDMOptions)}  # IGDM's options may be None (its defaults)
        missing = [f.name for f in fields(self) if getattr(self, f.name) is None and f.name not in optional]
        if missing:
            raise ConfigError(f"method parts not set: {', '.join(missing)}")
        if self.attack_loss == "kl" and self.adversarial_target == "adversarial":
            raise ConfigError(
                "method.attack_loss=kl maximises the KL to the adversarial target, which cannot be the teacher "
                "on x_adv (method.adversarial_target=adversarial): use attack_loss=ce or adversarial_target=clean"
            )
        if not 0 <= self.adv_weight <= 1:
            raise ConfigError("method.adv_weight must be in [0, 1]")
        if not 0 < self.ebb_min <= 1.0 <= self.ebb_max:
            raise ConfigError("method needs 0 < ebb_min <= 1 <= ebb_max")
        if not 0 < self.anti_bias_min <= self.anti_bias_init <= self.anti_bias_max:
            raise ConfigError("method needs 0 < anti_bias_min <= anti_bias_init <= anti_bias_max")
        if self.loss_scale <= 0 or min(self.ebb_lr, self.anti_bias_rate, self.rate_decay) < 0:
            raise ConfigError("method needs loss_scale > 0 and ebb_lr, anti_bias_rate, rate_decay >= 0")
        if not 0 <= self.nlb_lr <= 1:
            raise ConfigError("method.nlb_lr must be in [0, 1]")


@METHODS.register("composed")
class Composed(Method):
    summary = "ABSLD's and B-MTARD's parts chosen one by one (presets: the four methods, bmtard_absld[_tx])"
    paper = "none: this project's combination of the ABSLD and B-MTARD papers' parts"
    Options = ComposedOptions
    teachers = ("robust",)  # and "clean" when nat_teacher is clean (`required_teachers`)

    @classmethod
    def required_teachers(cls, options: ComposedOptions) -> tuple[str, ...]:
        return ("robust", "clean") if options.nat_teacher == "clean" else ("robust",)

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        o = self.options
        self.selection_metric = o.select
        self.entropy = EntropyBalance(1.0, o.ebb_min, o.ebb_max, self.device)  # (T_adv, T_nat)
        self.weights = LossBalance(2, self.device)  # (adv, nat)
        self.class_wise = {
            kind: ClassWiseTemperature(ctx.num_classes, o.anti_bias_init, o.anti_bias_min, o.anti_bias_max, self.device)
            for kind, policy in (("adv", o.adv_temperature), ("nat", o.nat_temperature))
            if policy == "anti_bias"
        }

    def _temperature(self, kind: str, y: torch.Tensor) -> torch.Tensor | float:
        scalar = self.entropy.tau[0 if kind == "adv" else 1] if self.options.entropy_balance else None
        if kind not in self.class_wise:
            return 1.0 if scalar is None else scalar
        per_sample = self.class_wise[kind].per_sample(y)
        return per_sample if scalar is None else scalar * per_sample

    def _step_rate(self, base: float) -> float:  # EBB and NLB: the decays in force this step
        return base * self.options.rate_decay**self.progress.lr_decays

    def loss(self, x, y):
        o = self.options
        robust = self.ctx.teachers["robust"]
        z_clean = t_adv = None  # the robust teacher on x (once when both targets use it), on x_adv
        if o.adversarial_target == "clean":
            with torch.no_grad():
                z_clean = robust(x)
                q_adv = soft_targets(z_clean, self._temperature("adv", y))
            x_adv = self.attack("kl")(x, target=q_adv) if o.attack_loss == "kl" else self.attack("ce")(x, y)
        else:
            x_adv = self.attack("ce")(x, y)
            with torch.no_grad():
                t_adv = robust(x_adv)
                q_adv = soft_targets(t_adv, self._temperature("adv", y))
        with torch.no_grad():
            z_nat = (
                z_clean if o.nat_teacher == "robust" and z_clean is not None else self.ctx.teachers[o.nat_teacher](x)
            )
            q_nat = soft_targets(z_nat, self._temperature("nat", y))
        logits_adv = self.student(x_adv)
        logits_nat = self.student(x)
        terms = saad_terms(self, q_adv, logits_adv, q_nat, logits_nat, o.reduction, x_adv, t_adv)
        adv, nat, sample_w, t_adv, extra = terms
        with torch.no_grad():  # the class-wise error risks that drive the anti-bias temperatures
            for kind, logits in (("adv", logits_adv), ("nat", logits_nat)):
                if kind in self.class_wise:
                    self.class_wise[kind].accumulate(F.cross_entropy(logits.float(), y, reduction="none"), y)
        if o.weights == "nlb":
            self.weights.update(torch.stack([adv.detach(), nat.detach()]), self._step_rate(o.nlb_lr), len(y))
            w_adv, w_nat = self.weights.w[0], self.weights.w[1]
        else:
            w_adv, w_nat = o.adv_weight, 1 - o.adv_weight
        if o.entropy_balance:
            self.entropy.observe(q_adv, q_nat, len(y))
        stats = {"loss_adv": adv.detach(), "loss_nat": nat.detach(), **extra}
        loss = o.loss_scale * (w_adv * adv + w_nat * nat)
        return with_igdm(self, loss, stats, x, x_adv, logits_adv, sample_w, t_adv)

    def on_step_end(self, progress):
        self.entropy.apply_observed(self._step_rate(self.options.ebb_lr))  # they act from the next step

    def on_epoch_end(self, progress):
        rate = self.options.anti_bias_rate * self.options.rate_decay**progress.next_lr_decays
        for temp in self.class_wise.values():
            temp.update(rate)

    def _parts(self) -> dict[str, Any]:
        """The adaptive parts in use, by their state's name."""
        parts: dict[str, Any] = {}
        if self.options.entropy_balance:
            parts["entropy_balance"] = self.entropy
        if self.options.weights == "nlb":
            parts["loss_balance"] = self.weights
        parts.update({f"temperature_{k}": t for k, t in self.class_wise.items()})
        return parts

    def state_dict(self):
        return {name: part.state_dict() for name, part in self._parts().items()}

    def load_state_dict(self, state):
        for name, part in self._parts().items():
            part.load_state_dict(state[name])

    def log_state(self):
        o, logged = self.options, {}
        if o.entropy_balance:
            logged.update(dict(zip(("scale_adv", "scale_nat"), self.entropy.tau.tolist())))
        if o.weights == "nlb":
            logged.update(dict(zip(("weight_adv", "weight_nat"), self.weights.w.tolist())))
        logged.update({f"temperature_{k}": t.tau.tolist() for k, t in self.class_wise.items()})
        return logged
