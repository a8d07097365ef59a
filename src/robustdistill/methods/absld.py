"""ABSLD: Anti-Bias Soft Label Distillation (Zhao et al., robust fairness).

Every class c has its own teacher temperatures tau_adv[c], tau_nat[c] (init 1, clipped to
[0.5, 5]). With the robust teacher on clean inputs, z_t = t(x), and per sample i:

    q_i^adv = softmax(z_t,i / tau_adv[y_i]),   q_i^nat = softmax(z_t,i / tau_nat[y_i])
    inner max:  x_adv = argmax_{x' in B(x, eps)} sum_i KL(q_i^adv || s(x'_i))
    loss:       L = 5/6 KL(q^adv || s(x_adv)) + 1/6 KL(q^nat || s(x))

During the epoch the student's per-class cross-entropy sums E_adv[c] (on x_adv) and E_nat[c] (on x)
are accumulated; at the end of the epoch each tau_k moves against its class's risk gap
(`ClassWiseTemperature`) at rate r = 0.1, multiplied by 0.1 at every lr decay. As in the official
loop, the lr and the rate decay at the end of the epoch before a milestone, and that epoch's update
already uses the decayed rate (1-based: the update after epoch 215 uses 0.01).
With every temperature fixed at 1 this is RSLAD. `method.igdm` adds IGDM's term, `method.saad: true`
weighs both terms per sample by SAAD's weights (the robust teacher's entropy at x_adv); the class-wise
risks that move the temperatures stay unweighted.

Options beyond the paper's defaults:
- `fixed_temperature_adv` / `fixed_temperature_nat`: the paper's "manual" ablation, class-wise
  temperatures that never move (a list of C floats; the other vector stays adaptive unless given);
- `adaptive: false`: freeze both vectors at `init_temperature`;
- `shared_temperature_quirk: true`: the published code's behaviour, where both targets are built
  from z_t / (tau_adv[y] * tau_nat[y]) (one tensor divided in place twice);
- `reduction`: `elementwise_mean` (published) or `batchmean`;
- `class_risk: mean` (not in the paper or its code): each class's risk is its mean cross-entropy
  instead of the sum over its images. Both rank the classes alike on balanced data (CIFAR-10, the
  paper's); on long-tailed data the sum calls a class of a dozen images easy however badly the
  student fits it, and gives it the smoothest soft labels.
Model selection: average PGD-20 accuracy + worst-class PGD-20 accuracy on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from .balance import ClassWiseTemperature
from .base import METHODS, Method
from .gradient_matching import with_igdm
from .losses import soft_targets
from .rslad import SoftLabelOptions
from .sample_weighting import saad_terms


@METHODS.register("absld")
class ABSLD(Method):
    summary = (
        "anti-bias soft label distillation: class-wise temperatures for robust fairness (Zhao et al., NeurIPS 2024)"
    )
    paper = (
        "Improving Adversarial Robust Fairness via Anti-Bias Soft Label Distillation. "
        "Zhao, Wang, Wei; NeurIPS 2024. "
        "https://arxiv.org/abs/2312.05508"
    )

    @dataclass
    class Options(SoftLabelOptions):  # reduction and adv_weight, as RSLAD, plus the temperatures
        name: str = "absld"
        adaptive: bool = True  # move the class-wise temperatures every epoch (false: frozen at init_temperature)
        init_temperature: float = 1.0  # every class's starting temperature
        temperature_min: float = 0.5  # temperatures are clipped to [temperature_min, temperature_max]
        temperature_max: float = 5.0  # the upper clip of the class-wise temperatures
        rate: float = 0.1  # r: each epoch's step of the temperatures against the class-wise risk gap
        rate_decay: float = 0.1  # the rate is multiplied by this at every lr milestone
        fixed_temperature_adv: Optional[list[float]] = (
            None  # the paper's manual ablation: C fixed temperatures of the adversarial target
        )
        fixed_temperature_nat: Optional[list[float]] = None  # the same for the natural target
        shared_temperature_quirk: bool = False  # the published code: both targets from z / (tau_adv[y] tau_nat[y])
        class_risk: Literal["sum", "mean"] = "sum"  # a class's risk: summed over its images (paper, code) or mean

        def validate(self):
            super().validate()
            if not 0 < self.temperature_min <= self.init_temperature <= self.temperature_max:
                raise ConfigError("method temperatures need 0 < temperature_min <= init_temperature <= temperature_max")
            if self.rate < 0:
                raise ConfigError("method.rate must be >= 0")

    teachers = ("robust",)
    selection_metric = "robust_plus_worst"

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        o = self.options
        self.temperatures: dict[str, ClassWiseTemperature] = {}
        self.adaptive: dict[str, bool] = {}
        for kind, fixed in (("adv", o.fixed_temperature_adv), ("nat", o.fixed_temperature_nat)):
            temp = ClassWiseTemperature(
                ctx.num_classes,
                o.init_temperature,
                o.temperature_min,
                o.temperature_max,
                self.device,
                mean=o.class_risk == "mean",
            )
            if fixed is not None:
                if len(fixed) != ctx.num_classes:
                    raise ConfigError(
                        f"method.fixed_temperature_{kind} has {len(fixed)} values; "
                        f"the dataset has {ctx.num_classes} classes"
                    )
                if min(fixed) <= 0:
                    raise ConfigError(f"method.fixed_temperature_{kind} must be > 0")
                temp.tau = torch.tensor(fixed, dtype=torch.float32, device=self.device)
            self.temperatures[kind] = temp
            self.adaptive[kind] = o.adaptive and fixed is None

    def targets(self, teacher_logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tau_adv = self.temperatures["adv"].per_sample(y)
        tau_nat = self.temperatures["nat"].per_sample(y)
        if self.options.shared_temperature_quirk:
            tau_adv = tau_nat = tau_adv * tau_nat
        return soft_targets(teacher_logits, tau_adv), soft_targets(teacher_logits, tau_nat)

    def loss(self, x, y):
        with torch.no_grad():
            q_adv, q_nat = self.targets(self.ctx.teachers["robust"](x), y)
        x_adv = self.attack("kl")(x, target=q_adv)
        logits_adv = self.student(x_adv)
        logits_nat = self.student(x)
        adv, nat, sample_w, t_adv, extra = saad_terms(
            self, q_adv, logits_adv, q_nat, logits_nat, self.options.reduction, x_adv
        )
        with torch.no_grad():  # the class-wise error risk that drives the temperatures
            self.temperatures["adv"].accumulate(F.cross_entropy(logits_adv.float(), y, reduction="none"), y)
            self.temperatures["nat"].accumulate(F.cross_entropy(logits_nat.float(), y, reduction="none"), y)
        w = self.options.adv_weight
        stats = {"loss_adv": adv.detach(), "loss_nat": nat.detach(), **extra}
        return with_igdm(self, w * adv + (1 - w) * nat, stats, x, x_adv, logits_adv, sample_w, t_adv)

    def on_epoch_end(self, progress):
        # the official loop decays lr and rate at the end of epoch 215 (1-based), then updates
        # the temperatures of that epoch with the decayed rate: hence the next epoch's decays
        rate = self.options.rate * self.options.rate_decay**progress.next_lr_decays
        for kind, temp in self.temperatures.items():
            if self.adaptive[kind]:
                temp.update(rate)
            else:
                temp.risk.zero_()

    def state_dict(self):
        return {f"temperature_{k}": t.state_dict() for k, t in self.temperatures.items()}

    def load_state_dict(self, state):
        for k, t in self.temperatures.items():
            t.load_state_dict(state[f"temperature_{k}"])

    def log_state(self):
        return {f"temperature_{k}": t.tau.tolist() for k, t in self.temperatures.items()}
