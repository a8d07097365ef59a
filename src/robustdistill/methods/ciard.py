"""CIARD (Lu et al., ICCV 2025, "CIARD: Cyclic Iterative Adversarial Robustness Distillation",
https://arxiv.org/abs/2509.12633; code: https://github.com/eminentgu/CIARD): two teachers as in
B-MTARD, with the robust teacher trained along with the student and a term that pushes the student
away from the clean teacher where that teacher is fooled.

With s the student, t_r the robust teacher (trained online), t_c the clean teacher, T_adv, T_nat
EBB's temperatures (B-MTARD's Entropy-Based Balance, clipped to [1, 10]):

    x_adv  = 10-step PGD on the student's cross-entropy with the label (from x + 0.001 N(0, 1))
    L_adv  = KL(softmax(t_r(x_adv) / T_adv) || s(x_adv)),   L_nat = KL(softmax(t_c(x) / T_nat) || s(x))
    M      = { i : argmax t_c(x_adv_i) != y_i }          (the clean teacher fooled by x_adv)
    L_push = KL(softmax(t_c(x_adv_i)) || softmax(s(x_adv_i) / T_p)) over i in M   (T_p = 5)
    L      = L_adv + L_nat - lambda 10^(min(m(L_adv), m(L_nat)) - m(L_push)) L_push,   m(v) = floor(log10 |v|)

(KL terms with the published elementwise mean, 1e-5 inside the log; the push term's factor, a
power of ten computed without gradient, brings it to the order of magnitude of the other two;
no term when M is empty.) The robust teacher learns with the student: every step from epoch
`teacher_from` on, one SGD step (momentum 0.1, weight decay 2e-4) on its cross-entropy at x_adv,
lr teacher_lr (1/2 + 1/2 cos(pi u)) exp(-0.01 u^2), u = (e - teacher_from) / (E - teacher_from).
The student's lr is the `cosine_exp` schedule (train.schedule): 0.1 until epoch 150 of 300, then
the same smooth decay.

Compared with the official code (CIARD.py, mtard_loss.robust_inner_loss_push) step by step on
identical inputs (losses, the student's and the robust teacher's weights, the temperatures):
- its loss is 1 L_adv + 1 L_nat: NLB's weights are computed but unused (the script's comment: an
  ablation against MTARD); `nlb: true` uses them;
- its robust teacher runs in train mode throughout, so its soft labels use each batch's own
  BatchNorm statistics, also before it starts learning (`teacher_train_mode`, default as there;
  false: eval mode). The script also runs it on x, unused (only its BatchNorm statistics move, which
  its train-mode soft labels never read): not done here;
- the rates of EBB (and NLB) are multiplied by 0.1 at every step of epochs 215, 260 and 285, which
  leaves them 0 from the second step of epoch 215 (`rate_decay_every_step`, default as there; false:
  once from each of those epochs);
- EBB's entropies are the means of q log(q + 1e-5), as there;
- under DDP the push term's set M and every magnitude are the global batch's, and the robust
  teacher's gradients are averaged over the ranks (the script runs one process); the trainable copy
  of the robust teacher is never compiled (train.compile compiles the frozen teachers and the student).
The robust teacher given in `teachers.robust` is copied: its file is never changed, and the copy,
with its optimiser, is part of the run's training state (`--resume` continues it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.distributed import all_reduce_mean, all_reduce_sum, broadcast_buffers, is_distributed
from ..core.errors import ConfigError
from .balance import EntropyBalance, LossBalance
from .base import METHODS, FrozenTeacher, Method, MethodOptions
from .losses import kl_div, kl_terms, soft_targets


@dataclass
class CIARDOptions(MethodOptions):
    name: str = "ciard"
    ebb: bool = True  # Entropy-Based Balance of the teachers' temperatures (as B-MTARD)
    nlb: bool = False  # weigh L_adv, L_nat by NLB (MTARD); the official loss weighs both 1
    temperature_lr: float = 0.001  # EBB's step per training step
    weight_lr: float = 0.025  # NLB's step per training step (with nlb)
    temperature_min: float = 1.0  # EBB's temperatures are clipped to [temperature_min, temperature_max]
    temperature_max: float = 10.0  # the upper clip of EBB's temperatures
    rate_decay: float = 0.1  # EBB's and NLB's rates are multiplied by this ...
    rate_decay_epochs: list[int] = field(default_factory=lambda: [215, 260, 285])  # ... at these 1-based epochs
    rate_decay_every_step: bool = True  # the script: at every step of those epochs (the rates become 0)
    push: float = 1.0  # lambda, the push term's weight on top of its magnitude factor (official: 1)
    push_temperature: float = 5.0  # T_p, the student's temperature in the push term
    teacher_lr: float = 1e-4  # the robust teacher's peak lr (0: the teacher stays as loaded)
    teacher_from: int = 50  # the 1-based epoch from which the robust teacher learns (its lr then decays)
    teacher_momentum: float = 0.1  # the robust teacher's SGD momentum
    teacher_weight_decay: float = 2e-4  # the robust teacher's SGD weight decay
    teacher_train_mode: bool = True  # the robust teacher's BatchNorm in train mode (the script), else eval

    def validate(self):
        if not 0 < self.temperature_min <= 1.0 <= self.temperature_max:
            raise ConfigError("method temperatures need 0 < temperature_min <= 1 <= temperature_max")
        if self.temperature_lr < 0 or not 0 <= self.weight_lr <= 1 or self.rate_decay < 0:
            raise ConfigError("method needs temperature_lr >= 0, 0 <= weight_lr <= 1 and rate_decay >= 0")
        if self.push < 0 or self.push_temperature <= 0:
            raise ConfigError("method needs push >= 0 and push_temperature > 0")
        if self.teacher_lr < 0 or self.teacher_from < 1 or self.teacher_momentum < 0 or self.teacher_weight_decay < 0:
            raise ConfigError(
                "method needs teacher_lr >= 0, teacher_from >= 1 (a 1-based epoch), "
                "teacher_momentum >= 0 and teacher_weight_decay >= 0"
            )


def magnitude_factor(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """10^(min(m(a), m(b)) - m(c)), m(v) = floor(log10 |v|), a 0 taken as 1e-7 (CIARD's
    `scale_to_magnitude`), in float64 on the device: no host synchronisation."""
    a, b, c = (torch.where(v == 0, torch.full_like(v, 1e-7), v).double() for v in (a.detach(), b.detach(), c.detach()))
    magnitude = [torch.floor(torch.log10(v.abs())) for v in (a, b, c)]
    return torch.pow(10.0, torch.minimum(magnitude[0], magnitude[1]) - magnitude[2])


def push_terms(clean_adv: torch.Tensor, s_adv: torch.Tensor, y: torch.Tensor, temperature: float):
    """(sum, count): the push term's elementwise KL terms summed over the samples the clean teacher
    misclassifies at x_adv, and how many terms that is (their number times C)."""
    wrong = (clean_adv.argmax(dim=1) != y).float()[:, None]
    terms = kl_terms(soft_targets(clean_adv), s_adv.float() / temperature, "elementwise_mean")
    return (terms * wrong).sum(), wrong.sum() * clean_adv.shape[1]


@METHODS.register("ciard")
class CIARD(Method):
    summary = "two teachers, the robust one trained online, a push from the fooled clean teacher (Lu et al., ICCV 2025)"
    paper = (
        "CIARD: Cyclic Iterative Adversarial Robustness Distillation. Lu, Pang, Zheng, Gu, Du, Liu, Zhou; "
        "ICCV 2025, pp. 350-359. https://arxiv.org/abs/2509.12633 (code: https://github.com/eminentgu/CIARD)"
    )
    Options = CIARDOptions
    teachers = ("robust", "clean")
    selection_metric = "w_robust"

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        o = self.options
        given = ctx.teachers["robust"]
        module = given.module if isinstance(given, FrozenTeacher) else given
        module = getattr(module, "_orig_mod", module)  # the module under torch.compile
        self.robust = copy.deepcopy(module).requires_grad_(True)
        self.robust.train(o.teacher_train_mode)
        self.robust_optimizer = torch.optim.SGD(
            self.robust.parameters(), lr=0.0, momentum=o.teacher_momentum, weight_decay=o.teacher_weight_decay
        )
        self.entropy = EntropyBalance(1.0, o.temperature_min, o.temperature_max, self.device)
        self.weights = LossBalance(2, self.device)
        self.rate_decays = 0  # the decays of EBB's and NLB's rates applied so far

    @classmethod
    def costliest_epoch(cls, options, epochs) -> int:
        # the teacher's own step runs from the epoch after `teacher_from` (1-based): 0-based teacher_from
        return options.teacher_from if options.teacher_lr > 0 and options.teacher_from < epochs else 0

    def on_epoch_start(self, progress):
        super().on_epoch_start(progress)
        if not self.options.rate_decay_every_step:
            self.rate_decays = sum(progress.epoch + 1 >= e for e in self.options.rate_decay_epochs)

    def _rate(self, base: float) -> float:
        return base * self.options.rate_decay**self.rate_decays

    def teacher_lr(self) -> float:
        """The robust teacher's lr this epoch (0 before `teacher_from`)."""
        o, e, total = self.options, self.progress.epoch + 1, self.progress.epochs
        if e < o.teacher_from or o.teacher_lr == 0:
            return 0.0
        u = (e - o.teacher_from) / max(total - o.teacher_from, 1)
        return o.teacher_lr * (0.5 + 0.5 * math.cos(math.pi * u)) * math.exp(-0.01 * u**2)

    def loss(self, x, y):
        o = self.options
        clean = self.ctx.teachers["clean"]
        s_nat = self.student(x)  # the script's order: the clean pass before the attack
        with torch.no_grad():
            t_nat = clean(x)
        x_adv = self.attack("ce")(x, y)
        s_adv = self.student(x_adv)
        lr = self.teacher_lr()
        learning = lr > 0 and self.progress.epoch + 1 > o.teacher_from
        with torch.set_grad_enabled(learning):
            t_adv = self.robust(x_adv)
        with torch.no_grad():
            c_adv = clean(x_adv)
            tau = self.entropy.tau
            q_adv, q_nat = soft_targets(t_adv.detach(), tau[0]), soft_targets(t_nat, tau[1])
        adv = kl_div(q_adv, s_adv)
        nat = kl_div(q_nat, s_nat)
        if o.nlb:
            self.weights.update(torch.stack([adv.detach(), nat.detach()]), self._rate(o.weight_lr), len(y))
            loss = self.weights.w[0] * adv + self.weights.w[1] * nat
        else:
            loss = adv + nat
        if o.ebb:
            self.entropy.observe(q_adv, q_nat, len(y), eps=1e-5)
        stats = {"loss_adv": adv.detach(), "loss_nat": nat.detach(), "teacher_lr": lr}
        if o.push > 0:
            loss, stats = self._push(loss, stats, adv, nat, c_adv, s_adv, y)
        if learning:
            stats["loss_teacher"] = self._teacher_step(t_adv, y, lr)
        return loss, stats

    def _push(self, loss, stats, adv, nat, c_adv, s_adv, y):
        """The loss minus the push term, its global mean over the fooled samples (nothing when none)."""
        total, count = push_terms(c_adv, s_adv, y, self.options.push_temperature)
        global_total = all_reduce_sum(torch.stack([total.detach().double(), count.double()]))
        terms = global_total[1].clamp_min(1)  # none fooled: total is 0, and so is the term
        push_mean = global_total[0] / terms
        means = all_reduce_mean(torch.stack([adv.detach(), nat.detach()]).double(), len(y))
        factor = magnitude_factor(means[0], means[1], push_mean)
        world = torch.distributed.get_world_size() if is_distributed() else 1
        term = total * world / terms  # the ranks' gradients average to the global mean's
        loss = loss - self.options.push * factor.to(loss.dtype) * term.to(loss.dtype)
        return loss, {**stats, "loss_push": push_mean.float(), "push_factor": factor.float()}

    def _teacher_step(self, t_adv: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One SGD step of the robust teacher on its cross-entropy at x_adv (gradients averaged over ranks)."""
        ce = F.cross_entropy(t_adv.float(), y)
        optimizer = self.robust_optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        ce.backward()
        if is_distributed():
            for p in self.robust.parameters():
                if p.grad is not None:
                    all_reduce_mean(p.grad)
        optimizer.step()
        return ce.detach()

    def on_step_end(self, progress):
        o = self.options
        self.entropy.apply_observed(self._rate(o.temperature_lr))
        if o.rate_decay_every_step and progress.epoch + 1 in o.rate_decay_epochs:
            self.rate_decays += 1  # the script's decay inside its step loop

    def on_epoch_end(self, progress):
        broadcast_buffers(self.robust)  # one set of BatchNorm statistics in the checkpoint

    def state_dict(self):
        return {
            "entropy_balance": self.entropy.state_dict(),
            "loss_balance": self.weights.state_dict(),
            "rate_decays": self.rate_decays,
            "robust_teacher": self.robust.state_dict(),
            "robust_teacher_optimizer": self.robust_optimizer.state_dict(),
        }

    def load_state_dict(self, state):
        self.entropy.load_state_dict(state["entropy_balance"])
        self.weights.load_state_dict(state["loss_balance"])
        self.rate_decays = int(state["rate_decays"])
        self.robust.load_state_dict(state["robust_teacher"])
        self.robust_optimizer.load_state_dict(state["robust_teacher_optimizer"])

    def log_state(self):
        tau = self.entropy.tau.tolist()
        logged = {"temperature_adv": tau[0], "temperature_nat": tau[1]}
        if self.options.nlb:
            w = self.weights.w.tolist()
            logged.update(weight_adv=w[0], weight_nat=w[1])
        return logged
