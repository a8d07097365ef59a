"""The `eval` config section: what the final evaluation of a run and `robustdistill eval` run, and
its resolution into the frozen `EvalSettings` every attack reads."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from ..attacks import ATTACKS, EvalSettings
from ..core.errors import ConfigError, require
from ..core.schema import SEED_LIMIT
from ..core.threat import ConfigNorm, ThreatModel, eps_limit, norm_of
from ..models import ModelConfig

log = logging.getLogger("robustdistill")


@dataclass
class EvalConfig:
    """The evaluation run at the end of training and by `robustdistill eval`."""

    attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20"])  # pgd<N>, cw<N>: N steps
    eps: Optional[float] = None  # None: the training attack's eps
    norm: Optional[ConfigNorm] = None  # linf or l2; None: the training attack's (another norm needs eval.eps)
    step_size: Optional[float] = None  # None: eps / 4 (2/255 at L-inf 8/255, 0.125 at L2 0.5)
    restarts: int = 1  # random restarts of PGD / CW / transfer; a sample must survive all of them
    square_queries: int = 5000  # queries of the standalone Square attack
    surrogate: Optional[str] = None  # transfer attack source (run folder or checkpoint); None: the robust teacher
    surrogate_model: Optional[ModelConfig] = None  # the surrogate's architecture, for a foreign state dict
    checks: bool = True  # run the sanity checks (robustdistill list checks)
    checks_subset: int = 500  # images the extra check attacks use
    large_eps: Optional[float] = None  # the large-eps check's budget; None: 1 under linf, the image diagonal under l2
    batch_size: int = 256  # images per attack batch (a rank's block is 4 batches)
    subset: Optional[int] = None  # evaluate on the first N test images
    seed: int = 0  # the seed of every random start and of AutoAttack
    fold_batchnorm: bool = True  # PGD / CW steps on the model with batch norm folded into its convolutions
    corruptions: Optional[str] = None  # a CIFAR-10-C style folder (labels.npy, <corruption>.npy): accuracy on each

    def validate(self) -> None:
        require(bool(self.attacks), "eval.attacks", "must name at least one attack (e.g. [clean, pgd20])")
        for name in self.attacks:
            attack = ATTACKS.get(name)
            require(
                attack.family is None or attack.steps is not None,
                "eval.attacks",
                f"'{name}' needs its steps in the name, e.g. {attack.family}20",
            )
        require(len(set(self.attacks)) == len(self.attacks), "eval.attacks", "lists an attack twice")
        require(self.restarts >= 1, "eval.restarts", "must be >= 1")
        require(self.square_queries >= 1, "eval.square_queries", "must be >= 1")
        require(self.checks_subset >= 1, "eval.checks_subset", "must be >= 1")
        require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        norm = norm_of(self.norm) if self.norm is not None else None
        if self.eps is not None:
            ThreatModel.check_eps(self.eps, "eval.eps", norm or "L2")  # the norm's own limit: at `resolve`
        limit = eps_limit(norm or "L2")  # the norm unknown yet: the wider limit, the norm's own at `resolve`
        require(self.step_size is None or 0 < self.step_size <= limit, "eval.step_size", f"must be in (0, {limit:g}]")
        require(self.large_eps is None or 0 < self.large_eps <= limit, "eval.large_eps", f"must be in (0, {limit:g}]")
        require(self.subset is None or self.subset >= 1, "eval.subset", "must be >= 1")
        require(0 <= self.seed < SEED_LIMIT, "eval.seed", "must be an integer in [0, 2**32)")
        if self.surrogate_model is not None:
            self.surrogate_model.validate("eval.surrogate_model")

    @classmethod
    def config_upgrade(cls, raw: dict[str, Any], key: str) -> dict[str, Any]:
        """Configs written before the attacks' names carried their steps (run folders' config.yaml
        among them) still load: `pgd_steps` and `cw_steps` become the steps in the names of `pgd20`
        and `cw`, with a one-line note."""
        old = {k: raw[k] for k in ("pgd_steps", "cw_steps") if k in raw}
        for k, v in old.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}.{k} must be an integer >= 1 (better: the steps in the attack's name, pgd50)")
        attacks = raw.get("attacks", cls().attacks if "pgd_steps" in old else None)
        bare_cw = isinstance(attacks, list) and "cw" in attacks
        if not old and not bare_cw:
            return raw
        raw = {k: v for k, v in raw.items() if k not in old}
        if isinstance(attacks, list):
            renamed = {"pgd20": f"pgd{old.get('pgd_steps', 20)}", "cw": f"cw{old.get('cw_steps', 30)}"}
            raw["attacks"] = [renamed.get(a, a) if isinstance(a, str) else a for a in attacks]
        given = [f"{key}.{k}={v}" for k, v in old.items()] + ([f"cw in {key}.attacks"] if bare_cw else [])
        log.warning(
            "note: old keys (%s) read as %s.attacks=%s: the steps are in the attack's name now (pgd50, cw30)",
            ", ".join(given),
            key,
            "[" + ", ".join(map(str, raw["attacks"])) + "]" if "attacks" in raw else "its default",
        )
        return raw

    def resolve(self, default: Optional[ThreatModel]) -> EvalSettings:
        """The settings every evaluation runs with: the threat model is `eval.norm` and `eval.eps`'s
        where set, else `default`'s (the run's, or a checkpoint's recorded one); the step size falls
        back to the threat model's default. Done once, here."""
        norm = norm_of(self.norm) if self.norm is not None else default.norm if default is not None else "Linf"
        if self.eps is not None:
            threat = ThreatModel(self.eps, norm)
        elif default is None:
            raise ConfigError(f"no eps known for this model; set eval.eps (--eps), e.g. {_EXAMPLE[norm]}")
        elif default.norm != norm:
            raise ConfigError(
                f"eval.norm={norm.lower()} is not the model's threat model ({default.describe()}): "
                f"give its budget too, eval.eps (--eps), e.g. {_EXAMPLE[norm]}"
            )
        else:
            threat = default
        threat.validate("eval.eps")
        limit = eps_limit(threat.norm)
        for key in ("step_size", "large_eps"):
            value = getattr(self, key)
            require(
                value is None or 0 < value <= limit,
                f"eval.{key}",
                f"must be in (0, {limit:g}] under {threat.describe()}",
            )
        step = self.step_size if self.step_size is not None else threat.default_step_size
        large = self.large_eps if self.large_eps is not None else 1.0 if threat.norm == "Linf" else None
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(EvalSettings) if f.name != "threat"}
        changed = {"threat": threat, "step_size": step, "attacks": tuple(self.attacks), "large_eps": large}
        return EvalSettings(**rest | changed)


_EXAMPLE = {"Linf": "8/255", "L2": "0.5"}
