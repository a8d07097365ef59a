"""CFA (Wei et al., CVPR 2023, "CFA: Class-wise calibrated fair adversarial training"): class-wise
budgets (CCM), class-wise TRADES weights (CCR) and fairness-aware weight averaging (FAWA).

    r_c      = the student's robust accuracy on class c's training adversarial examples of the last
               epoch (the training forward pass's predictions, no extra attack)
    CCM      eps_c  = (lambda_1 + r_c) * eps                       from epoch `begin` on (before: eps)
    CCR      beta_c = (lambda_2 + r_c) beta / (1 + (lambda_2 + r_c) beta)  from `begin` (before: beta / (1 + beta))
    base trades: x_adv = 10-step PGD on KL(f(x) || f(x')) from x + 0.001 N(0,1) in the ball eps_{y_i};
                 L = 1/B sum_i [(1 - beta_{y_i}) CE(f(x_i), y_i) + beta_{y_i} KL(f(x_i) || f(x_adv_i))]
    base at:     x_adv = 10-step PGD on the CE from a uniform start in the ball eps_{y_i};
                 L = 1/B sum_i CE(f(x_adv_i), y_i)                  (CCR does not apply)
    FAWA     after each epoch's validation: when the student's worst-class PGD accuracy reaches
             `fawa_threshold`, theta_avg <- d theta_avg + (1 - d) theta (the first time: theta);
             otherwise theta_avg stays. The average (every parameter and BatchNorm statistic) is
             the model that is validated, selected and reported.

Easier classes (high r_c) get larger budgets and stronger regularisation, harder ones smaller. The
step size stays the config's (2/255), whatever eps_c is. Defaults are the official code's
(PKU-ML/CFA, train.py and attack.py): base trades, beta 6, lambda_1 = lambda_2 = 0.5, begin 10,
decay 0.88, threshold 0.2 (the README's command; the script's argparse default is 0.24), selection on
robust + worst-class robust accuracy; CIFAR-10: PreActResNet-18, 200 epochs, lr 0.1 / 10 at 100
and 150, weight decay 5e-4, 2 % of the training set (100 images per class) held out for validation.
Note that `base: trades` without CCR is TRADES divided by 1 + beta, as in the official code.
Deviations: r_c divides class c's correct count by its own number of samples (the official code by
N / C, the same on a balanced split); the validation behind FAWA is PGD-20 (the official loop runs
PGD-10 at 2/255); `base: at`'s attack runs in eval mode (the official one in train mode); the clean
forward pass runs once (the official TRADES loss runs it twice, CE and KL target); until FAWA's
first update the student itself stands in for the average (the official average is a randomly
initialised network until then, never selected in practice); FAT+CFA is not implemented.
"""

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..attacks import ROBUST_ATTACK
from ..core.distributed import all_reduce_sum
from ..core.errors import ConfigError
from .base import METHODS, Method, MethodOptions
from .losses import kl_div


def calibrated_eps(robust: torch.Tensor, lambda_1: float, eps: float) -> torch.Tensor:
    """CCM: eps_c = (lambda_1 + r_c) eps."""
    return (lambda_1 + robust) * eps


def calibrated_beta(robust: torch.Tensor, lambda_2: float, beta: float) -> torch.Tensor:
    """CCR: the weight of the robust term, b / (1 + b) with b = (lambda_2 + r_c) beta."""
    b = (lambda_2 + robust) * beta
    return b / (1 + b)


def weighted_trades(logits_nat, logits_adv, y, class_beta):
    """(loss, mean CE, mean KL): 1/B sum_i (1 - beta_{y_i}) CE_i + beta_{y_i} KL(p(x_i) || p(x_adv_i))."""
    natural = F.cross_entropy(logits_nat, y, reduction="none")
    robust = kl_div(F.softmax(logits_nat, dim=1), logits_adv, "none")  # gradients through both sides
    b = class_beta[y]
    return ((1 - b) * natural + b * robust).mean(), natural.mean(), robust.mean()


@METHODS.register("cfa")
class CFA(Method):
    """Class-wise calibrated fair adversarial training (Wei et al., CVPR 2023)."""

    summary = "class-wise calibrated budgets, TRADES weights and weight averaging (Wei et al., CVPR 2023)"
    paper = (
        "CFA: Class-wise Calibrated Fair Adversarial Training. "
        "Wei, Wang, Guo, Wang; CVPR 2023. "
        "https://arxiv.org/abs/2303.14460"
    )
    selection_metric = "robust_plus_worst"
    validation_attacks = ("clean", ROBUST_ATTACK)

    @dataclass
    class Options(MethodOptions):
        name: str = "cfa"
        base: Literal["trades", "at"] = "trades"  # the adversarial training CFA calibrates: TRADES or PGD-AT
        beta: float = 6.0  # TRADES' beta before calibration
        ccm: bool = True  # class-wise calibrated margin (eps_c)
        ccr: bool = True  # class-wise calibrated regularisation (beta_c; base trades only)
        lambda_1: float = 0.5  # CCM: eps_c = (lambda_1 + r_c) eps, from class c's training robust accuracy r_c
        lambda_2: float = 0.5  # CCR: beta_c = (lambda_2 + r_c) beta
        begin: int = 10  # first (0-based) epoch with calibrated eps_c / beta_c
        fawa: bool = True  # fairness-aware weight averaging (needs a validation every epoch)
        fawa_decay: float = 0.88  # FAWA's decay d: average <- d average + (1 - d) student
        fawa_threshold: float = 0.2  # worst-class validation PGD accuracy that lets an epoch enter the average

        def validate(self):
            if self.beta < 0 or self.lambda_1 < 0 or self.lambda_2 < 0 or self.begin < 0:
                raise ConfigError("method needs beta, lambda_1, lambda_2 and begin >= 0")
            if not 0 <= self.fawa_decay < 1 or not 0 <= self.fawa_threshold <= 1:
                raise ConfigError("method needs 0 <= fawa_decay < 1 and 0 <= fawa_threshold <= 1")
            if self.ccr and self.base != "trades":
                raise ConfigError("method.ccr calibrates TRADES' beta: it needs method.base=trades (or ccr: false)")

    @classmethod
    def validates(cls, options) -> bool:
        return options.fawa

    @classmethod
    def averages_weights(cls, options) -> bool:
        return options.fawa

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.default_start = "gaussian" if options.base == "trades" else "uniform"
        c = ctx.num_classes
        self.robust = torch.zeros(c, device=self.device)  # r_c of the last epoch
        self.correct = torch.zeros(c, device=self.device)
        self.count = torch.zeros(c, device=self.device)
        self.class_eps, self.class_beta = self._calibration(epoch=0)

    def _calibration(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        o, c = self.options, len(self.robust)
        eps, active = self.ctx.attack.eps, epoch >= o.begin
        class_eps = calibrated_eps(self.robust, o.lambda_1, eps) if o.ccm and active else torch.full((c,), eps)
        if o.ccr and active:
            class_beta = calibrated_beta(self.robust, o.lambda_2, o.beta)
        else:
            class_beta = torch.full((c,), o.beta / (1 + o.beta))
        return class_eps.to(self.device), class_beta.to(self.device)

    def on_epoch_start(self, progress):
        super().on_epoch_start(progress)
        self.class_eps, self.class_beta = self._calibration(progress.epoch)

    def loss(self, x, y):
        eps = self.class_eps[y]
        if self.options.base == "at":
            x_adv = self.attack("ce", eps=eps)(x, y)
            logits_adv = self.student(x_adv)
            loss = F.cross_entropy(logits_adv, y)
            stats = {"loss_robust": loss.detach()}
        else:
            target = self.clean_prediction(x)
            x_adv = self.attack("kl", eps=eps)(x, target=target)
            logits_nat = self.student(x)
            logits_adv = self.student(x_adv)
            loss, natural, robust = weighted_trades(logits_nat, logits_adv, y, self.class_beta)
            stats = {"loss_natural": natural.detach(), "loss_robust": robust.detach()}
        with torch.no_grad():
            self.correct.index_add_(0, y, (logits_adv.argmax(dim=1) == y).float())
            self.count.index_add_(0, y, torch.ones_like(y, dtype=torch.float32))
        return loss, stats

    @torch.no_grad()
    def on_epoch_end(self, progress):
        correct, count = all_reduce_sum(self.correct.clone()), all_reduce_sum(self.count.clone())
        self.robust = correct / count.clamp_min(1)
        self.correct.zero_()
        self.count.zero_()

    def average_decay(self, summary, progress) -> Optional[float]:
        worst = summary["attacks"][ROBUST_ATTACK]["worst_class_accuracy"]
        if worst is not None and worst >= self.options.fawa_threshold:
            return self.options.fawa_decay
        return None

    def state_dict(self):
        return {"robust": self.robust.clone(), "correct": self.correct.clone(), "count": self.count.clone()}

    def load_state_dict(self, state):
        for key in ("robust", "correct", "count"):
            setattr(self, key, state[key].to(self.device).float())
        self.class_eps, self.class_beta = self._calibration(self.progress.epoch)

    def log_state(self):
        state = {"class_train_robust": self.robust.tolist(), "class_eps": self.class_eps.tolist()}
        if self.options.base == "trades":
            state["class_beta"] = self.class_beta.tolist()
        return state
