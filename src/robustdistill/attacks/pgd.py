"""The primitives of training and evaluation: PGD (and FGSM as its one-step case), in the L-inf
or the L2 ball.

Conventions of torchattacks/AutoAttack: an attack is built once around a model that takes
images in [0, 1] and returns logits, then called on `(x, y)`:

    attack = PGD(model, eps=8/255, step_size=2/255, steps=20)
    x_adv = attack(x, y)              # or attack.run(x, y): the examples and what the attack counted

The model is put in eval mode for the attack (BatchNorm statistics never move) and restored to
its previous mode afterwards. Gradients are taken with respect to the input only
(`torch.autograd.grad`), so no parameter's `.grad` is touched. Every iterate is projected onto
the eps-ball around x and onto [0, 1].

Norms (`norm`): `Linf` steps along the gradient's sign and clips each pixel to [x - eps, x + eps];
`L2` steps along the gradient divided by its L2 norm (per sample) and scales the perturbation back
onto the L2 ball when it leaves it (Madry et al.'s PGD-L2, as torchattacks' PGDL2 and the
robustness library do). Clipping to [0, 1] after the L2 projection only shortens the perturbation,
so the iterate stays in both sets.

Losses (summed over the batch, so a sample's step does not depend on the batch size):
- `ce`: cross-entropy with the label `y`;
- `kl`: KL(target || softmax(model(x'))) to a given target distribution (RSLAD/ABSLD, TRADES), or,
  when `target` is a model, to that model's softmax on the same iterate x', differentiated through
  both models (AdaAD's inner maximisation: the point where teacher and student disagree most);
- `cw`: the Carlini-Wagner margin, max wrong logit minus true logit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import require
from ..core.threat import ConfigNorm, Norm, ThreatModel, eps_limit, norm_of
from ..models import eval_mode
from ..models.fold import eval_view, release

Loss = Literal["ce", "kl", "cw"]
Start = Literal["uniform", "gaussian", "none"]
EarlyStop = Literal["first_adversarial", "last_clean"]


@dataclass
class AttackConfig:
    """The inner maximisation used during training (config section `attack`); its eps is the run's
    threat model (`threat`)."""

    eps: float = 8 / 255  # the budget of the training attack in `norm`: the run's threat model
    step_size: Optional[float] = None  # each PGD step; None: 2/255 under linf, 2.5 * eps / steps under l2
    steps: int = 10  # PGD steps of the inner maximisation
    norm: ConfigNorm = "linf"  # the ball: linf (the papers') or l2 (eps 0.5 on CIFAR-10, RobustBench's L2)
    start: Literal["auto", "uniform", "gaussian", "none"] = (
        "auto"  # auto: the method's own choice (seed methods: x + 0.001 N(0,1))
    )
    fold_batchnorm: bool = True  # PGD steps on the model with batch norm folded into its convolutions

    @property
    def threat(self) -> ThreatModel:
        """The run's threat model: its evaluations default to it, its model files record it."""
        return ThreatModel(self.eps, norm_of(self.norm))

    @property
    def step(self) -> float:
        """The step of each PGD iteration: `step_size`, or its default for the norm."""
        if self.step_size is not None:
            return self.step_size
        return 2.5 * self.eps / self.steps if self.threat.norm == "L2" else 2 / 255

    def validate(self) -> None:
        norm = norm_of(self.norm)
        ThreatModel.check_eps(self.eps, "attack.eps", norm)
        limit = eps_limit(norm)
        require(
            self.step_size is None or 0 < self.step_size <= limit,
            "attack.step_size",
            f"must be in (0, {limit:g}] (e.g. 2/255 under linf, eps / 4 under l2)",
        )
        require(self.steps >= 1, "attack.steps", "must be >= 1")


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample max_{j != y} z_j - z_y (positive means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return other - true


def attack_loss(logits: torch.Tensor, loss: Loss, y: Optional[torch.Tensor], target: Optional[torch.Tensor]):
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if loss == "kl":
        return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum")
    if loss == "cw":
        return cw_margin(logits, y).sum()
    raise ValueError(f"unknown attack loss '{loss}'; use ce, kl or cw")


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: Norm = "Linf") -> torch.Tensor:
    """x_adv moved onto the `norm` ball of radius eps around x, then onto [0, 1]."""
    if norm == "L2":
        delta = x_adv - x
        scale = torch.clamp(eps / l2_norms(delta).clamp_min(1e-12), max=1.0)
        return (x + delta * scale).clamp_(0.0, 1.0)
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    """Each sample's L2 norm, shaped to broadcast over it ((B, 1, 1, 1) for images)."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def l2_start(noise: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """The L2 random start from U[0, 1) draws shaped like the images: a direction uniform on the
    sphere and a radius uniform in [0, eps] (torchattacks' PGDL2 start), both from the same draws.
    The draws become a standard normal vector z (inverse normal CDF); its direction z / |z| is
    uniform on the sphere and independent of |z|, whose chi-square CDF (d degrees of freedom) is
    U(0, 1): that is the radius, so one draw per pixel serves both and a sample's start stays a pure
    function of its own noise."""
    z = torch.special.ndtri(noise.double().clamp(1e-7, 1 - 1e-7))
    length = l2_norms(z)
    radius = torch.special.gammainc(torch.tensor(z[0].numel() / 2, dtype=z.dtype), length**2 / 2)
    return (z / length.clamp_min(1e-12) * radius).to(noise.dtype) * eps


def ball_bounds(x: torch.Tensor, eps: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eps-ball intersected with [0, 1], once per attack: `x_adv.clamp(lo, hi)` is then one
    operation per step, bit-identical to `project(x_adv, x, eps)` for x in [0, 1]."""
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


def sample_noise(index: torch.Tensor, shape: tuple[int, ...], seed: int, stream: int = 0) -> torch.Tensor:
    """U[0, 1) noise of `shape` for each sample in `index` (CPU float32), a pure function of
    (seed, stream, sample index): the same whatever the batch, the rank or the number of ranks."""
    # numpy's SeedSequence takes the three numbers whole; torch's CPU generator keeps only the low
    # 32 bits of a seed, which made an earlier packing of (seed, stream, i) into one integer ignore
    # seed and stream: every restart started from the same point
    out = torch.empty((len(index), *shape))
    for row, i in zip(out, index.tolist()):
        row.copy_(torch.from_numpy(np.random.default_rng([seed, stream, i]).random(shape, dtype=np.float32)))
    return out


@dataclass(frozen=True)
class Found:
    """What one PGD call found: the adversarial examples and, with `count_correct`, per sample how
    many iterates the model still classified right (Fair-ARD's robustness degree; else None)."""

    x_adv: torch.Tensor
    correct: Optional[torch.Tensor] = None


class PGD:
    """Projected gradient ascent on `loss` inside the `norm` ball (Linf, L2) of radius `eps`.

    start: `uniform` (L-inf: U(-eps, eps), Madry et al.; L2: `l2_start`), `gaussian`
    (x + sigma*N(0,1), the seed methods and TRADES, sigma=0.001, projected) or `none`.
    `eps` and `step_size` are floats or tensors of one value per sample (shape (B,)), for the methods
    with class-wise or per-sample budgets (CFA, FRL's remargin): each sample stays in its own ball.

    early_stop (needs labels; a stopped sample keeps its point while the others go on):
    - `first_adversarial`: a sample stops on the first iterate the model misclassifies, after `tau`
      further steps (friendly adversarial training's tau; BAT's x_adv with tau = 1);
    - `last_clean`: a sample returns the last iterate the model still classified right (the start
      itself when that is already misclassified): BAT's point just inside the decision boundary.
    A sample that never stops returns the last iterate (after the final step, unchecked).

    fold_batchnorm: the steps run on `models.fold.eval_view(model)`, the model with each conv ->
    batch-norm pair folded into one convolution (eval mode makes the batch norm affine): the same
    function up to float rounding, two kernels fewer per pair and step.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor,
        step_size: float | torch.Tensor,
        steps: int,
        loss: Loss = "ce",
        start: Start = "uniform",
        sigma: float = 0.001,
        generator: Optional[torch.Generator] = None,
        count_correct: bool = False,
        early_stop: Optional[EarlyStop] = None,
        tau: int = 0,
        fold_batchnorm: bool = True,
        norm: Norm = "Linf",
    ):
        if norm not in ("Linf", "L2"):
            raise ValueError(f"PGD norm: Linf or L2 (got {norm!r})")
        self.norm = norm
        # per-sample tensors are not checked here: reading them back would stall the device every step
        negative = [v for v in (eps, step_size) if not isinstance(v, torch.Tensor) and v < 0]
        if negative or steps < 1:
            raise ValueError(f"PGD needs eps >= 0, step_size >= 0, steps >= 1 (got {eps}, {step_size}, {steps})")
        self.model, self.eps, self.step_size, self.steps = model, eps, step_size, steps
        self.loss, self.start, self.sigma, self.generator = loss, start, sigma, generator
        self.count_correct = count_correct
        if early_stop not in (None, "first_adversarial", "last_clean") or tau < 0:
            raise ValueError(f"PGD early_stop: first_adversarial or last_clean, and tau >= 0 (got {early_stop}, {tau})")
        self.early_stop, self.tau = early_stop, tau
        self.fold_batchnorm = fold_batchnorm

    @staticmethod
    def _per_sample(value: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
        """A float as it is; a tensor of one value per sample shaped to broadcast over the image."""
        if not isinstance(value, torch.Tensor):
            return value
        if value.dim() == 0:
            return value.item()
        if value.shape != (len(x),):
            raise ValueError(
                f"a per-sample budget needs one value per sample: shape ({len(x)},), got {tuple(value.shape)}"
            )
        return value.to(device=x.device, dtype=x.dtype).view(-1, *[1] * (x.dim() - 1))

    def _init(self, x: torch.Tensor, noise: Optional[torch.Tensor], eps) -> torch.Tensor:
        if self.start == "uniform":
            if noise is None:
                noise = torch.rand(x.shape, device=x.device, generator=self.generator, dtype=x.dtype)
            if self.norm == "L2":
                return project(x + l2_start(noise, eps), x, eps, "L2")
            return project(x + (2 * noise - 1) * eps, x, eps)
        if self.start == "gaussian":
            noise = torch.randn(x.shape, device=x.device, generator=self.generator, dtype=x.dtype)
            return project(x + self.sigma * noise, x, eps, self.norm)
        return x.clone()

    def __call__(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        target: Optional[torch.Tensor | nn.Module] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The adversarial examples (`run(...).x_adv`)."""
        return self.run(x, y, target, noise).x_adv

    def run(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        target: Optional[torch.Tensor | nn.Module] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Found:
        """The attack: its examples and (count_correct) per-sample counts. `noise`: U[0, 1) draws
        shaped like x for the uniform start (default: from `generator`); evaluation passes
        per-sample noise so that a sample's attack does not depend on its batch. `target` (kl
        loss): a distribution per sample, or a model (frozen, in eval mode) whose softmax on each
        iterate is the target."""
        if self.loss == "kl" and target is None:
            raise ValueError("the kl attack loss needs a target distribution")
        if (self.loss != "kl" or self.early_stop or self.count_correct) and y is None:
            raise ValueError(f"the {self.loss} attack loss, early_stop and count_correct need labels y")
        x = x.detach()
        reference = target if isinstance(target, nn.Module) else None
        if reference is None and target is not None:
            target = target.detach()
        eps, step_size = self._per_sample(self.eps, x), self._per_sample(self.step_size, x)
        correct = None
        with eval_mode(self.model), contextlib.ExitStack() as cleanup:
            if self.fold_batchnorm:
                cleanup.callback(release, self.model)  # the folded weights live only during the attack
            model = eval_view(self.model) if self.fold_batchnorm else self.model
            x_adv = self._init(x, noise, eps)
            lo, hi = ball_bounds(x, eps) if self.norm == "Linf" else (0.0, 1.0)
            stop = _EarlyStop(self.early_stop, self.tau, x_adv) if self.early_stop else None
            with torch.enable_grad():
                for _ in range(self.steps):
                    x_adv.requires_grad_(True)
                    if reference is not None:
                        target = F.softmax(reference(x_adv), dim=1)
                    logits = model(x_adv)
                    if self.count_correct or stop is not None:
                        hits = logits.argmax(dim=1) == y
                    if self.count_correct:  # Fair-ARD's robustness degree: counted on each iterate before its step
                        correct = hits.long() if correct is None else correct + hits.long()
                    loss = attack_loss(logits, self.loss, y, target)
                    (grad,) = torch.autograd.grad(loss, x_adv)
                    if self.norm == "L2":
                        grad = grad / l2_norms(grad).clamp_min(1e-12)
                        x_next = project(x_adv.detach() + step_size * grad, x, eps, "L2")
                    else:
                        x_next = torch.clamp(x_adv.detach() + step_size * grad.sign(), lo, hi)
                    x_adv = x_next if stop is None else stop.update(x_adv.detach(), x_next, hits)
            if stop is not None:
                x_adv = stop.result(x_adv)
        return Found(x_adv.detach(), correct)


class _EarlyStop:
    """Per-sample stopping of PGD as tensor operations: which samples still move, what the stopped
    ones return, and (first_adversarial) how many steps past their first misclassification remain."""

    def __init__(self, rule: EarlyStop, tau: int, start: torch.Tensor):
        self.rule = rule
        self.moving = torch.ones(len(start), dtype=torch.bool, device=start.device)
        self.budget = torch.full((len(start),), tau, device=start.device)
        self.out = start.detach().clone()  # what a stopped sample returns
        self.previous = start.detach()  # last_clean: the iterate before the current one

    def _rows(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return mask.view(-1, *[1] * (like.dim() - 1))

    def update(self, current: torch.Tensor, proposed: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        """`current`: this step's iterate, `hits`: whether the model classifies it right; returns the next iterates."""
        wrong = self.moving & ~hits
        if self.rule == "first_adversarial":
            stopped = wrong & (self.budget == 0)
            self.budget = self.budget - (wrong & (self.budget > 0)).long()
            self.out = torch.where(self._rows(stopped, current), current, self.out)
        else:  # last_clean: the iterate before this (misclassified) one
            stopped = wrong
            self.out = torch.where(self._rows(stopped, current), self.previous, self.out)
        self.moving = self.moving & ~stopped
        self.previous = current
        return torch.where(self._rows(self.moving, current), proposed, current)

    def result(self, last: torch.Tensor) -> torch.Tensor:
        return torch.where(self._rows(self.moving, last), last, self.out)


class FGSM(PGD):
    """One step of size eps from x (Goodfellow et al.): along the gradient's sign (L-inf), or along
    the gradient over its L2 norm (L2: the fast gradient method)."""

    def __init__(self, model: nn.Module, eps: float, loss: Loss = "ce", norm: Norm = "Linf"):
        super().__init__(model, eps=eps, step_size=eps, steps=1, loss=loss, start="none", norm=norm)
