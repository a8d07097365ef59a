"""Fair-ARD (Yue et al., NeurIPS 2023, "Revisiting adversarial robustness distillation from the
perspective of robust fairness"): ARD whose samples are re-weighted by their class's vulnerability.

    x_adv      = 10-step PGD on the student's cross-entropy, uniform start (as ARD); along the way
                 kappa_i counts the iterates (the start and the first 9 steps) the student still
                 classifies right: sample i's robustness degree
    L          = alpha * tau^2 * 1/B sum_i w_{y_i} KL_C(softmax(t(x_i)/tau) || softmax(s(x_adv_i)/tau))
               + (1 - alpha) * 1/B sum_i w_{y_i} CE(s(x_i), y_i)         (KL_C: the KL divided by C)
    end of epoch: kappa_c = mean of kappa_i over the class's samples of the epoch;
                  w_c = (1 / (kappa_c + 1e-5)) ** beta, rescaled to sum to C, clipped to [5/6, 5/2]

Less robust classes weigh more from the next epoch on (all weights 1 in the first). Defaults are
the official Fair-ARD script (NISP-official/Fair-ARD): tau = 30, alpha = 1, beta = 2.
Deviations: the script divides each class's kappa sum by N / C (the class size of a balanced
training set); here by the class's own sample count (the same on CIFAR-10); its attack runs in train
mode and its SGD uses Nesterov momentum (here eval-mode attacks and the config's optimizer); the
per-sample weighting is one tensor operation (the script loops over the samples).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.distributed import all_reduce_sum
from ..core.errors import ConfigError
from .base import METHODS, Method, MethodOptions
from .losses import kl_div


def class_weights(kappa: torch.Tensor, beta: float, lo: float = 5 / 6, hi: float = 5 / 2) -> torch.Tensor:
    """Fair-ARD's re-weighting of the class-wise robustness degrees."""
    weight = (1 / (kappa + 1e-5)) ** beta
    weight = weight * (len(kappa) / weight.sum())
    return weight.clamp(lo, hi)


def weighted_distillation(teacher_logits, student_adv, student_clean, y, weight, temperature):
    """(tau^2 * weighted mean of the per-sample KL / C, weighted mean of the per-sample CE)."""
    q = F.softmax(teacher_logits / temperature, dim=1)
    per_sample_kl = kl_div(q, student_adv / temperature, "none") / q.shape[1]  # KLDivLoss()'s default on one sample
    w = weight[y]
    distill = temperature**2 * (w * per_sample_kl).mean()
    natural = (w * F.cross_entropy(student_clean, y, reduction="none")).mean()
    return distill, natural


@METHODS.register("fair_ard")
class FairARD(Method):
    """ARD re-weighted by class vulnerability (Yue et al., NeurIPS 2023)."""

    summary = "ARD with classes re-weighted by their robustness degree (Yue et al., NeurIPS 2023)"
    paper = (
        "Revisiting Adversarial Robustness Distillation from the Perspective of Robust Fairness. "
        "Yue, Mou, Wang, Zhao; NeurIPS 2023. "
        "https://openreview.net/forum?id=ywrPcBEXdC"
    )

    @dataclass
    class Options(MethodOptions):
        name: str = "fair_ard"
        alpha: float = 1.0  # weight of the distillation term (ARD's alpha); the clean CE gets 1 - alpha
        temperature: float = 30.0  # the distillation temperature tau (ARD's)
        beta: float = 2.0  # how strongly a class's vulnerability raises its weight
        weight_min: float = 5 / 6  # class weights are clipped to [weight_min, weight_max]
        weight_max: float = 5 / 2  # the upper clip of the class weights

        def validate(self):
            if not 0 <= self.alpha <= 1 or self.temperature <= 0 or self.beta < 0:
                raise ConfigError("method needs 0 <= alpha <= 1, temperature > 0 and beta >= 0")
            if not 0 < self.weight_min <= 1 <= self.weight_max:
                raise ConfigError("method needs 0 < weight_min <= 1 <= weight_max")

    teachers = ("robust",)
    default_start = "uniform"

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        c = ctx.num_classes
        self.weight = torch.ones(c, device=self.device)
        self.kappa = torch.zeros(c, device=self.device)  # the last epoch's class-wise robustness degree
        self.kappa_sum = torch.zeros(c, device=self.device)
        self.count = torch.zeros(c, device=self.device)

    def loss(self, x, y):
        o = self.options
        found = self.attack("ce", count_correct=True).run(x, y)
        x_adv = found.x_adv
        with torch.no_grad():
            self.kappa_sum.index_add_(0, y, found.correct.float())
            self.count.index_add_(0, y, torch.ones_like(y, dtype=torch.float32))
            teacher = self.ctx.teachers["robust"](x)
        distill, natural = weighted_distillation(
            teacher, self.student(x_adv), self.student(x), y, self.weight, o.temperature
        )
        loss = o.alpha * distill + (1 - o.alpha) * natural
        return loss, {"loss_distill": distill.detach(), "loss_natural": natural.detach()}

    @torch.no_grad()
    def on_epoch_end(self, progress):
        total, count = all_reduce_sum(self.kappa_sum.clone()), all_reduce_sum(self.count.clone())
        self.kappa = total / count.clamp_min(1)
        self.weight = class_weights(self.kappa, self.options.beta, self.options.weight_min, self.options.weight_max)
        self.kappa_sum.zero_()
        self.count.zero_()

    def state_dict(self):
        return {
            "weight": self.weight.clone(),
            "kappa": self.kappa.clone(),
            "kappa_sum": self.kappa_sum.clone(),
            "count": self.count.clone(),
        }

    def load_state_dict(self, state):
        for key in ("weight", "kappa", "kappa_sum", "count"):
            setattr(self, key, state[key].to(self.device).float())

    def log_state(self):
        return {"class_weight": self.weight.tolist(), "class_robustness": self.kappa.tolist()}
