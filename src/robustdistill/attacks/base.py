"""What every evaluation attack shares: the resolved settings, the environment an attack runs in,
the `Attack` base class and its registry, and batched PGD with per-sample restarts."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import UserError
from ..core.registry import Registry
from ..core.threat import ThreatModel
from .pgd import PGD, sample_noise

Kind = Literal["reference", "white-box", "black-box"]

ROBUST_ATTACK = "pgd20"  # the attack behind "robust accuracy" in model selection and W-Robust Acc


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation config resolved once (`EvalConfig.resolve`): every fallback applied (the threat
    model from the run's, the step size from it), so nothing downstream resolves it again."""

    threat: ThreatModel
    step_size: float
    attacks: tuple[str, ...] = ("clean", "pgd20")
    restarts: int = 1
    square_queries: int = 5000
    batch_size: int = 256
    seed: int = 0
    checks: bool = False
    checks_subset: int = 500
    large_eps: Optional[float] = 1.0  # None: the image diagonal (L2; the check measures it)
    fold_batchnorm: bool = True

    @property
    def eps(self) -> float:
        return self.threat.eps

    @property
    def check_steps(self) -> int:
        """The steps of the sanity checks' PGD runs: those of the first `pgd<N>` attack asked for,
        else 20 (the papers' PGD-20)."""
        return next((attack.steps for attack in map(ATTACKS.get, self.attacks) if attack.family == "pgd"), 20)

    @property
    def block(self) -> int:
        """Samples per block (ranks own whole blocks) and per Square / AutoAttack chunk."""
        return 4 * self.batch_size

    def at_eps(self, eps: float) -> EvalSettings:
        """The same settings at another budget, the step size scaled with it (the sanity checks)."""
        step = self.step_size * eps / self.eps if self.eps > 0 else ThreatModel(eps, self.norm).default_step_size
        return dataclasses.replace(self, threat=dataclasses.replace(self.threat, eps=eps), step_size=step)

    def common(self) -> dict[str, Any]:
        """The report's `settings.common` (the attack list is the report's own keys; the threat
        model as its eps and norm)."""
        rest = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("attacks", "threat")}
        return {"eps": self.threat.eps, "norm": self.threat.norm, **rest}

    @property
    def norm(self) -> str:
        return self.threat.norm


@dataclass
class AttackEnv:
    """What an attack may need beyond the model and its samples.

    An attack is called on the samples this rank owns (`index`, their positions in the split);
    randomness is a function of (seed, sample index), so verdicts do not depend on the batch or
    on the number of ranks. AutoAttack, whose candidates change between its sub-attacks, reads
    the whole split from `x_all`/`y_all` and coordinates the ranks itself."""

    settings: EvalSettings
    surrogate: Optional[nn.Module] = None
    state_dir: Optional[Path] = None  # AutoAttack's resumable state files live here
    progress: bool = False
    index: Optional[torch.Tensor] = None  # None: the samples are the whole split, in order
    x_all: Optional[torch.Tensor] = None
    y_all: Optional[torch.Tensor] = None
    rank: int = 0
    world_size: int = 1
    notes: dict[str, list[str]] = field(default_factory=dict)  # warnings an attack raised, by attack
    # an ensemble's accuracy after each of its parts, in order, by attack (AutoAttack: clean, apgd-ce, ...)
    parts: dict[str, dict[str, float]] = field(default_factory=dict)

    def sample_index(self, n: int) -> torch.Tensor:
        return torch.arange(n) if self.index is None else self.index.cpu()


class Attack:
    """An evaluation attack: one subclass per name, registered in `ATTACKS`.

    `run(model, x, y, env)` returns the adversarial examples of the samples this rank owns and,
    when the attack decides correctness itself (AutoAttack), the per-sample verdicts (else None:
    the suite predicts on the examples). Class attributes describe it to the CLI, the report and
    the sanity checks."""

    name: ClassVar[str]
    family: ClassVar[Optional[str]] = None  # a family of attacks named by their steps: pgd -> pgd20, pgd50, ...
    steps: ClassVar[Optional[int]] = None  # a family member's steps (its name's number)
    kind: ClassVar[Kind] = "white-box"  # the sanity checks compare black-box with white-box attacks
    needs_surrogate: ClassVar[bool] = False  # crafted on another model (eval.surrogate)
    autoattack: ClassVar[bool] = False  # of the AutoAttack family (pyautoattack): check 8 reads its flags
    suite: ClassVar[bool] = False  # a whole AutoAttack (standard, fast): check 4 holds it below PGD-20
    help: ClassVar[str] = ""

    def parameters(self, s: EvalSettings) -> dict[str, Any]:
        """The settings that define this attack, for the report's `settings.<name>`."""
        return {"eps": s.eps}

    def label(self, s: EvalSettings) -> str:
        """The name people read (tables): says the parameters that vary, e.g. PGD-50."""
        return self.name

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, env: AttackEnv
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def describe(self, s: EvalSettings) -> dict[str, Any]:
        return {**self.parameters(s), "label": self.label(s)}


class AttackRegistry(Registry[type[Attack]]):
    """Attack names are exact (`clean`, `square`) or a family's prefix followed by the number of
    steps that run (`pgd20`, `pgd100`, `cw30`): the name says what runs. A family is registered
    under `<prefix><N>`, which `names()` lists and `get` also returns (its steps unset)."""

    def get(self, name: str) -> type[Attack]:
        found = re.fullmatch(r"([a-z_]*[a-z])(\d+)", name)
        if found and f"{found[1]}<N>" in self._items:
            prefix, digits = found[1], found[2]
            if digits != str(int(digits)) or int(digits) < 1:
                raise UserError(
                    f"attack '{name}': write the steps as a number >= 1 without leading zeros, e.g. {prefix}20"
                )
            return self._member(prefix, int(digits))
        return super().get(name)

    @functools.cache  # noqa: B019 - one class per member, kept for the process (the registry lives as long)
    def _member(self, prefix: str, steps: int) -> type[Attack]:
        family = super().get(f"{prefix}<N>")
        return type(f"{family.__name__}{steps}", (family,), {"name": f"{prefix}{steps}", "steps": steps})


ATTACKS = AttackRegistry("attack")


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: register an `Attack` under its `name` (a family: `<prefix><N>`)."""
    return ATTACKS.register(cls.name)(cls)


def get_attack(name: str) -> Attack:
    return ATTACKS.get(name)()


def names_of(kind: Kind) -> list[str]:
    """The registered names (families as `<prefix><N>`) of one kind of attack."""
    return [n for n in ATTACKS.names() if ATTACKS.get(n).kind == kind]


def of_kind(names, kind: Kind) -> list[str]:
    """Those of `names` (attack names, family members included) that are of `kind`, sorted."""
    return sorted(n for n in names if ATTACKS.get(n).kind == kind)


def needs_surrogate(attacks: tuple[str, ...] | list[str]) -> bool:
    return any(ATTACKS.get(a).needs_surrogate for a in attacks)


def pgd_label(prefix: str, steps: int, s) -> str:
    """The name with the steps run and, if more than one, the restarts: pgd50, cw30x5."""
    return f"{prefix}{steps}" + (f"x{s.restarts}" if s.restarts > 1 else "")


def pgd_parameters(s, steps: int, loss: str) -> dict:
    return {
        "eps": s.eps,
        "step_size": s.step_size,
        "start": "uniform",
        "restarts": s.restarts,
        "steps": steps,
        "loss": loss,
    }


def batches(n: int, size: int, desc: str, progress: bool):
    return tqdm(range(0, n, size), desc=desc, leave=False, disable=None if progress else True)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    if not len(x):
        return x.new_zeros(0, dtype=torch.long)
    return torch.cat([model(x[i : i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)])


def run_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    env: AttackEnv,
    desc: str,
    *,
    steps: int,
    loss: str = "ce",
    start: str = "uniform",
    source: Optional[nn.Module] = None,
    restarts: Optional[int] = None,
) -> torch.Tensor:
    """PGD at `env.settings`' eps and step size, crafted on `source` (default: the model), batched,
    with restarts judged on `model`: each sample keeps the first restart's example that fools
    `model`. Restart r of sample i starts from noise drawn for (seed, r, i)."""
    s = env.settings
    index = env.sample_index(len(x))
    attack = PGD(
        source or model, s.eps, s.step_size, steps, loss=loss, start=start, fold_batchnorm=s.fold_batchnorm, norm=s.norm
    )
    out = torch.empty_like(x)
    for i in batches(len(x), s.batch_size, desc, env.progress):
        xb, yb = x[i : i + s.batch_size], y[i : i + s.batch_size]
        best, fooled = None, torch.zeros(len(yb), dtype=torch.bool, device=x.device)
        for r in range(restarts or s.restarts):
            noise = (
                sample_noise(index[i : i + s.batch_size], tuple(x.shape[1:]), s.seed, r).to(x.device)
                if start == "uniform"
                else None
            )
            adv = attack(xb, yb, noise=noise)
            with torch.no_grad():
                wrong = model(adv).argmax(dim=1) != yb
            best = adv if best is None else torch.where((wrong & ~fooled).view(-1, 1, 1, 1), adv, best)
            fooled |= wrong
        out[i : i + s.batch_size] = best
    return out
