"""What every training method shares: the `Method` base class and its registry, the options base
(`MethodOptions`, the config section `method`), the loop's `Progress`, the `Context` a method may
use, and `FrozenTeacher`, a teacher as the methods call it.

The training loop only ever calls `on_epoch_start(progress)`, then per batch
`loss, stats = method.loss(x, y)` and `on_step_end(progress)`, then `on_epoch_end(progress)`;
it saves `state_dict()` with
every checkpoint and logs `log_state()` to metrics.jsonl. A method never touches the loop and
the loop never knows which method runs.

A new method is a subclass registered by name, with an `Options` dataclass for its config keys:

    @METHODS.register("my_method")
    class MyMethod(Method):
        @dataclass
        class Options(MethodOptions):
            name: str = "my_method"
            beta: float = 1.0
        teachers = ("robust",)          # roles it needs under `teachers:` in the config
        selection_metric = "robust"      # how the best checkpoint is chosen on validation data
        def loss(self, x, y): ...
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from ..attacks import PGD, AttackConfig, Loss, Start
from ..core.distributed import all_reduce_mean
from ..core.registry import Registry
from ..models import eval_mode

METHODS: Registry[type[Method]] = Registry("method")


@dataclass
class MethodOptions:
    """Base of every method's options (config section `method`); each method has a subclass with
    its own fields, and may define `validate()` (raising `ConfigError`)."""

    name: str = "natural"

    @classmethod
    def config_class(cls, raw: dict[str, Any]) -> type[MethodOptions]:
        """The options class a raw `method` section is typed as: that of the method it names."""
        return METHODS.get(raw.get("name", cls.name)).Options


@dataclass
class Progress:
    """Where the loop is. `lr_decays` counts the lr milestones in force for the current epoch, so
    per-step rates that decay with the lr use it; `next_lr_decays` counts those in force for the
    next epoch: the official loops decay the lr (and their rates) at the end of an epoch, before
    that epoch's end-of-epoch update, which therefore already uses the decayed rate."""

    epoch: int = 0
    step: int = 0
    lr_decays: int = 0
    next_lr_decays: int = 0
    epochs: int = 1  # the run's train.epochs (IGDM's warm-up reads it)


@dataclass
class Context:
    """What a method may use. `student` is what to call for the training forward pass (DDP-wrapped
    under DDP); `attacked` is the student the inner maximisation and the eval-mode predictions run
    on: never DDP-wrapped (no gradient synchronisation), compiled like `student` with train.compile."""

    student: nn.Module
    attacked: nn.Module
    num_classes: int
    attack: AttackConfig
    teachers: dict[str, nn.Module] = field(default_factory=dict)


class Method:
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    summary: ClassVar[str] = ""  # one line with the paper, for `robustdistill list methods`
    paper: ClassVar[str] = ""  # title; authors; venue; link (the docs' methods page, `robustdistill -v list methods`)
    teachers: ClassVar[tuple[str, ...]] = ()
    selection_metric: ClassVar[str] = "robust"
    default_start: ClassVar[Start] = "gaussian"
    needs_validation: ClassVar[bool] = False  # its adaptive state reads the per-epoch validation evaluation
    validation_attacks: ClassVar[tuple[str, ...]] = ()  # attacks it needs in that evaluation

    def __init__(self, options: MethodOptions, ctx: Context):
        self.options = options
        self.ctx = ctx
        self.student = ctx.student
        self.device = next(ctx.attacked.parameters()).device
        self.progress = Progress()

    def attack(
        self, loss: Loss, eps: Optional[torch.Tensor] = None, step_size: Optional[torch.Tensor] = None, **options
    ) -> PGD:
        """The training-time inner maximisation on the bare student, from the config's settings
        (`attack.start: auto` is the method's `default_start`); `eps` / `step_size`: per-sample
        budgets (shape (B,)) for methods with class-wise ones, else the config's; `options`: PGD's
        (count_correct, early_stop, tau)."""
        a = self.ctx.attack
        chosen = a.start if a.start != "auto" else self.default_start
        eps = a.eps if eps is None else eps
        step_size = a.step if step_size is None else step_size
        return PGD(
            self.ctx.attacked,
            eps,
            step_size,
            a.steps,
            loss=loss,
            start=chosen,
            fold_batchnorm=a.fold_batchnorm,
            norm=a.threat.norm,
            **options,
        )

    @torch.no_grad()
    def clean_prediction(self, x: torch.Tensor) -> torch.Tensor:
        """The bare student's softmax on x in eval mode, without gradient: TRADES' inner-max target."""
        with eval_mode(self.ctx.attacked) as model:
            return torch.softmax(model(x), dim=1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def on_epoch_start(self, progress: Progress) -> None:
        self.progress = progress

    def on_step_end(self, progress: Progress) -> None:
        pass

    def on_epoch_end(self, progress: Progress) -> None:
        pass

    def on_validation(self, summary: dict[str, Any], progress: Progress) -> None:
        """Called with the validation evaluation that ends each epoch (`needs_validation` methods:
        every epoch, on the validation split, with `validation_attacks` among the attacks)."""

    @classmethod
    def required_teachers(cls, options: MethodOptions) -> tuple[str, ...]:
        """The teacher roles a run with these options needs under `teachers:` (default: `teachers`)."""
        return cls.teachers

    @classmethod
    def uses_labels(cls, options: MethodOptions) -> bool:
        """Whether a run with these options reads the training labels (a loss term, an inner
        maximisation, class-wise state); one that does not can train on unlabeled extra images."""
        return True

    @classmethod
    def validates(cls, options: MethodOptions) -> bool:
        """Whether a run with these options adapts to a validation every epoch (the preflight then
        requires train.eval_every=1 and train.select_on=val)."""
        return cls.needs_validation

    @classmethod
    def averages_weights(cls, options: MethodOptions) -> bool:
        """Whether the loop keeps a weight average of the student, updated by `average_decay`, and
        validates, selects and reports the average instead of the student."""
        return False

    @classmethod
    def costliest_epoch(cls, options: MethodOptions, epochs: int) -> int:
        """The first (0-based) epoch from which a training step costs the most, where the cost changes
        during a run (CIARD's teacher starts learning): `--estimate` times its steps there."""
        return 0

    @classmethod
    def recomputes_batchnorm(cls, options: MethodOptions) -> bool:
        """Whether the average's BatchNorm statistics are recomputed over the epoch's training batches
        after each update (SWA's `update_bn`) rather than averaged with the weights."""
        return False

    def average_decay(self, summary: dict[str, Any], progress: Progress) -> Optional[float]:
        """After `on_validation` (the student's summary): d for theta_avg <- d theta_avg + (1 - d) theta,
        or None to leave the average as it is this epoch (`averages_weights` methods)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def log_state(self) -> dict[str, Any]:
        """Adaptive state worth a line in metrics.jsonl (temperatures, weights, ...)."""
        return {}


def label_free_methods() -> list[str]:
    """The methods that, with their default options, learn without the training labels."""
    return [name for name in METHODS.names() if not METHODS.get(name).uses_labels(METHODS.get(name).Options())]


def create_method(options: MethodOptions, ctx: Context) -> Method:
    return METHODS.get(options.name)(options, ctx)


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, for every parameter and floating-point
    buffer (BatchNorm statistics too); integer buffers (batch counters) are copied."""
    for a, b in zip(average.state_dict().values(), model.state_dict().values()):
        if a.is_floating_point():
            a.mul_(decay).add_(b.detach(), alpha=1 - decay)
        else:
            a.copy_(b)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]]) -> None:
    """`model`'s BatchNorm statistics from scratch over `batches` (torch's SWA `update_bn`: each
    running statistic the cumulative mean of the batches' statistics), then averaged over the ranks
    under DDP; the model is left in eval mode."""
    update_bn(batches, model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            all_reduce_mean(m.running_mean)
            all_reduce_mean(m.running_var)
    model.eval()


class FrozenTeacher(nn.Module):
    """A teacher as the methods call it. Without gradient (its soft labels: every method computes
    them under `torch.no_grad()`) the forward runs under `torch.inference_mode()`, which also skips
    autograd's version counters and view tracking, and the logits are cloned out of it (a (B, C)
    copy) so that they may enter the student's loss, whose backward saves them. With gradient enabled
    (AdaAD's inner maximisation differentiates through the teacher with respect to the input) it is
    the plain module."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.module(x)
        with torch.inference_mode():
            out = self.module(x)
        return out.clone()
