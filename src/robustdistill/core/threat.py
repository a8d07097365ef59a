"""The threat model: the norm of the adversary's perturbation and its budget eps, on images in [0, 1].

A run has one (`attack.eps`, its training attack's: `Config.threat`), which its model files record
(`ModelMeta.threat`) and its evaluations default to; an evaluation may set another (`eval.eps`),
and its resolved settings carry the one it ran with (`EvalSettings.threat`). Every budget is checked
here, and the default PGD step of a budget is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .errors import require

Norm = Literal["Linf"]
NORMS = ("Linf",)


@dataclass(frozen=True)
class ThreatModel:
    eps: float
    norm: Norm = "Linf"

    @staticmethod
    def check_eps(eps: float, key: str) -> None:
        """A budget a config gives under `key`: in [0, 1], the range of the images."""
        require(0 <= eps <= 1, key, "must be in [0, 1] (images are in [0, 1]; e.g. 8/255)")

    def validate(self, key: str = "eps") -> None:
        self.check_eps(self.eps, key)
        require(self.norm in NORMS, f"{key} norm", f"must be one of {', '.join(NORMS)}")

    @property
    def default_step_size(self) -> float:
        """The PGD step when none is given: eps / 4 (2/255 at 8/255, the papers' setting)."""
        return self.eps / 4

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps}

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> ThreatModel:
        return cls(float(raw["eps"]), raw.get("norm", "Linf"))
