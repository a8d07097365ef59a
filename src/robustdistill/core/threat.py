"""The threat model: the norm of the adversary's perturbation and its budget eps, on images in [0, 1].

A run has one (`attack.norm` and `attack.eps`, its training attack's: `Config.threat`), which its
model files record (`ModelMeta.threat`) and its evaluations default to; an evaluation may set
another (`eval.norm`, `eval.eps`), and its resolved settings carry the one it ran with
(`EvalSettings.threat`). Every budget is checked here, and the default PGD step of a budget is
defined here.

Norms are spelled as RobustBench spells its threat models (`Linf`, `L2`) in files and reports, and
in lower case in configs (`attack.norm: linf | l2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError, require

Norm = Literal["Linf", "L2"]
NORMS = ("Linf", "L2")
ConfigNorm = Literal["linf", "l2"]  # a config's spelling
# an L2 budget above this is not a budget on images in [0, 1] (CIFAR-10's is 0.5, ImageNet's 3.0):
# most likely one in 0-255 units (0.5 * 255 = 127.5)
L2_EPS_LIMIT = 16.0
WORDS = {"Linf": "L-inf", "L2": "L2"}


def eps_limit(norm: str) -> float:
    """The largest budget (and PGD step) a config may give under `norm`: 1 under L-inf (the range of
    the images), `L2_EPS_LIMIT` under L2."""
    return L2_EPS_LIMIT if norm == "L2" else 1.0


def norm_of(value: str) -> Norm:
    """A config's norm (linf, l2; any case) as the threat model spells it (Linf, L2)."""
    found = {n.lower(): n for n in NORMS}.get(str(value).lower())
    if found is None:
        raise ConfigError(f"unknown norm {value!r}; use one of {', '.join(n.lower() for n in NORMS)}")
    return found


@dataclass(frozen=True)
class ThreatModel:
    eps: float
    norm: Norm = "Linf"

    @staticmethod
    def check_eps(eps: float, key: str, norm: str = "Linf") -> None:
        """A budget a config gives under `key`, for `norm`: in [0, 1] under L-inf (the range of the
        images), in [0, 16] under L2 (a larger one is given in 0-255 units)."""
        if norm == "L2":
            require(
                0 <= eps <= L2_EPS_LIMIT,
                key,
                f"is an L2 budget on images in [0, 1] and must be in [0, {L2_EPS_LIMIT:g}] (CIFAR-10's is 0.5; "
                f"{eps:g} looks like 0-255 units)"
                if eps > L2_EPS_LIMIT
                else f"must be in [0, {L2_EPS_LIMIT:g}] (an L2 budget on images in [0, 1], e.g. 0.5)",
            )
        else:
            require(0 <= eps <= 1, key, "must be in [0, 1] (images are in [0, 1]; e.g. 8/255)")

    def validate(self, key: str = "eps") -> None:
        require(self.norm in NORMS, f"{key} norm", f"must be one of {', '.join(NORMS)}")
        self.check_eps(self.eps, key, self.norm)

    @property
    def default_step_size(self) -> float:
        """An evaluation's PGD step when none is given: eps / 4 (2/255 at L-inf 8/255; 0.125 at L2 0.5)."""
        return self.eps / 4

    def describe(self) -> str:
        """In words, for reports and figure titles: "L-inf, eps 8/255", "L2, eps 0.5"."""
        return f"{WORDS.get(self.norm, self.norm)}, eps {eps_text(self.eps, self.norm)}"

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps}

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> ThreatModel:
        return cls(float(raw["eps"]), raw.get("norm", "Linf"))


def eps_text(eps: float, norm: str = "Linf") -> str:
    """An L-inf budget as a fraction of 255 where it is one and has no short decimal (8/255, but
    0.2 rather than 51/255), any other as a number."""
    steps = eps * 255
    if norm == "Linf" and abs(eps - round(eps, 4)) > 1e-9 and abs(steps - round(steps)) < 1e-6:
        return f"{round(steps)}/255"
    return f"{eps:.6g}"
