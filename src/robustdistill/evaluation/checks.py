"""The sanity checks of the evaluation protocol, run with every evaluation.

Each check is one small function registered in `CHECKS` with its id, its name and what it asserts
(`robustdistill list checks` prints them); `run_checks` runs them all, in id order, and each gives
one report entry {"id", "name", "status": passed | failed | skipped, "numbers", "message"}.
A failed check is a warning in the report and on the terminal (`--strict` makes it an error):
it says the numbers may overestimate robustness, typically through gradient masking.
Comparisons allow sampling noise of one sample or 0.5 %, whichever is larger.

    @check(9, "my_check", "what must hold, in one sentence")
    def my_check(c: CheckContext) -> Outcome:
        return Outcome(c.accuracy("clean") > 0, {"clean": c.accuracy("clean")})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..attacks import ATTACKS, ROBUST_ATTACK, AttackEnv, names_of, of_kind, predict, run_pgd
from ..core.distributed import assemble
from ..core.registry import Registry
from ..models import eval_mode, fingerprint


@dataclass(frozen=True)
class Outcome:
    """What a check found: `passed` (None: skipped), its numbers, and a detail: the reason it was
    skipped, or what a failure adds to the check's statement."""

    passed: Optional[bool]
    numbers: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


@dataclass(frozen=True)
class Check:
    id: int
    name: str
    asserts: str  # what must hold, in one sentence (the report's message)
    run: Callable[[CheckContext], Outcome]

    def evaluate(self, context: CheckContext) -> dict[str, Any]:
        """The report entry."""
        out = self.run(context)
        status = "skipped" if out.passed is None else ("passed" if out.passed else "failed")
        message = out.detail if out.passed is None else self.asserts + (f"; {out.detail}" if out.detail else "")
        return {"id": self.id, "name": self.name, "status": status, "numbers": out.numbers, "message": message}


CHECKS: Registry[Check] = Registry("check")


def check(id_: int, name: str, asserts: str) -> Callable[[Callable[[CheckContext], Outcome]], Check]:
    """Register a check function under `name` with its report id and statement."""

    def add(fn: Callable[[CheckContext], Outcome]) -> Check:
        if any(CHECKS.get(n).id == id_ for n in CHECKS.names()):
            raise ValueError(f"check id {id_} is registered twice")
        return CHECKS.register(name)(Check(id_, name, asserts, fn))

    return add


def registered() -> list[Check]:
    """Every check, in id order."""
    return sorted((CHECKS.get(n) for n in CHECKS.names()), key=lambda c: c.id)


def _accuracy(correct: torch.Tensor) -> float:
    """Accuracy of per-sample verdicts over the whole split (already assembled from every rank)."""
    return correct.double().mean().item() if len(correct) else 0.0


class CheckContext:
    """What a check may look at: the suite's per-sample verdicts (`correct`, assembled from every
    rank) and adversarial-example bounds, and extra PGD runs on the first `checks_subset` samples,
    each rank attacking the ones it owns."""

    def __init__(
        self,
        model,
        correct: dict[str, torch.Tensor],
        bounds: dict[str, dict[str, float]],
        env: AttackEnv,
        num_classes: int,
        before: Optional[str],
    ):
        s = env.settings
        self.model, self.correct, self.bounds, self.env = model, correct, bounds, env
        self.num_classes, self.before, self.settings = num_classes, before, s
        self.n = min(len(env.y_all), s.checks_subset)
        self.mine = env.index[env.index < self.n]
        on_device = self.mine.to(env.y_all.device)
        self.xs, self.ys = env.x_all[on_device], env.y_all[on_device]
        self.tol = max(1.0 / max(self.n, 1), 0.005)

    def accuracy(self, name: str, first: Optional[int] = None) -> float:
        """Accuracy of the suite's attack `name` over the whole split, or its first `first` samples."""
        return _accuracy(self.correct[name][:first] if first is not None else self.correct[name])

    def accuracy_on(self, x_adv: torch.Tensor) -> float:
        """Accuracy on the checks' samples of examples crafted for the ones this rank owns."""
        s = self.settings
        return _accuracy(assemble(predict(self.model, x_adv, s.batch_size) == self.ys, self.mine, self.n))

    def pgd(self, eps: float, steps: int, start: str = "uniform") -> float:
        """Accuracy under one PGD run (one restart) on the checks' samples."""
        at = dataclasses.replace(self.env, index=self.mine, settings=self.settings.at_eps(eps))
        return self.accuracy_on(
            run_pgd(self.model, self.xs, self.ys, at, "checks", steps=steps, start=start, restarts=1)
        )


def run_checks(context: CheckContext) -> list[dict[str, Any]]:
    """Every registered check, in id order, on the first `checks_subset` samples of the split."""
    return [c.evaluate(context) for c in registered()]


@check(1, "eps_zero", "PGD at eps = 0 must equal clean accuracy")
def eps_zero(c: CheckContext) -> Outcome:
    clean = c.accuracy("clean", c.n) if "clean" in c.correct else c.accuracy_on(c.xs)
    zero = c.pgd(0.0, c.settings.check_steps)
    return Outcome(zero == clean, {"clean": clean, "pgd_eps0": zero})


@check(2, "monotone", "accuracy must not increase with eps or with the number of steps")
def monotone(c: CheckContext) -> Outcome:
    s, steps = c.settings, c.settings.check_steps
    suite_run = f"pgd{steps}"
    reuse = suite_run in c.correct and s.restarts == 1  # the suite's own run is this PGD
    full = c.accuracy(suite_run, c.n) if reuse else c.pgd(s.eps, steps)
    half = c.pgd(s.eps / 2, steps)
    few_steps = max(1, steps // 4)
    few = c.pgd(s.eps, few_steps)
    numbers = {"eps/2": half, "eps": full, f"steps={few_steps}": few, f"steps={steps}": full}
    return Outcome(half + c.tol >= full and few + c.tol >= full, numbers)


@check(
    3,
    "large_eps",
    "an unbounded white-box attack must reach chance accuracy or below; otherwise suspect gradient masking",
)
def large_eps(c: CheckContext) -> Outcome:
    """At eval.large_eps; under L2 by default the image diagonal sqrt(C * H * W), the largest L2
    distance between two images in [0, 1] (the L-inf default, 1, is that of L-inf)."""
    chance = 1.0 / c.num_classes
    eps = c.settings.large_eps
    if eps is None:
        eps = float(c.env.x_all[0].numel()) ** 0.5
    large = c.pgd(eps, c.settings.check_steps, start="none")
    return Outcome(large <= chance + c.tol, {"eps": eps, "accuracy": large, "chance": chance})


@check(4, "worst_case", "the per-sample worst case must be below every attack, and AutoAttack not above PGD-20")
def worst_case(c: CheckContext) -> Outcome:
    if len(c.correct) <= 1:
        return Outcome(None, detail="needs at least two attacks")
    accs = {k: _accuracy(v) for k, v in c.correct.items()}
    worst = _accuracy(torch.stack(list(c.correct.values())).all(dim=0))
    ok = all(worst <= a for a in accs.values())
    autoattacks = [a for k, a in accs.items() if ATTACKS.get(k).suite]
    if autoattacks and ROBUST_ATTACK in accs:
        ok = ok and all(a <= accs[ROBUST_ATTACK] + c.tol for a in autoattacks)
    return Outcome(ok, {"robust_to_all": worst, **accs})


@check(5, "black_box", "a black-box attack stronger than every white-box one points to gradient masking")
def black_box(c: CheckContext) -> Outcome:
    """A black-box attack run on its own (square, transfer) against the white-box attacks; else the
    standard AutoAttack's Square, which attacks the points its white-box parts left robust: it must
    not lower the accuracy they reached."""
    white = {k: _accuracy(c.correct[k]) for k in of_kind(c.correct, "white-box")}
    black = {k: _accuracy(c.correct[k]) for k in of_kind(c.correct, "black-box")}
    parts = c.env.parts.get("autoattack", {})
    if not black and "square" in parts:
        order = list(parts)
        before = parts[order[order.index("square") - 1]]
        white = {f"autoattack {'+'.join(order[1 : order.index('square')])}": before}
        black = {"autoattack square (after them)": parts["square"]}
    if not (white and black):
        others = " or ".join(names_of("black-box"))
        return Outcome(None, detail=f"needs a white-box and a black-box attack ({others}, or autoattack)")
    strongest = min(white.values())
    numbers = {**{f"white:{k}": v for k, v in white.items()}, **{f"black:{k}": v for k, v in black.items()}}
    return Outcome(all(a + c.tol >= strongest for a in black.values()), numbers)


@check(6, "perturbation", "every adversarial example must lie in the eps-ball and in [0, 1]")
def perturbation(c: CheckContext) -> Outcome:
    """In the threat model's ball: the largest L-inf perturbation, or under L2 the largest per-sample
    L2 norm (measured in float64, allowed float32 rounding: 1e-6 plus 1e-5 of eps)."""
    eps, key = c.settings.eps, "max_l2" if c.settings.norm == "L2" else "max_linf"
    slack = 1e-6 + (1e-5 * eps if key == "max_l2" else 0.0)
    bad = [k for k, b in c.bounds.items() if b[key] > eps + slack or b["min"] < 0.0 or b["max"] > 1.0]
    return Outcome(not bad, dict(c.bounds), f"violated by {', '.join(bad)}" if bad else "")


@check(7, "unchanged", "parameters and buffers must be bit-identical before and after the evaluation")
def unchanged(c: CheckContext) -> Outcome:
    after = fingerprint(c.model) if c.before is not None else None
    return Outcome(None if c.before is None else c.before == after, {"before": c.before, "after": after})


@check(8, "autoattack_flags", "AutoAttack's own checks must raise no warning")
def autoattack_flags(c: CheckContext) -> Outcome:
    flags = {k: v for k, v in c.env.notes.items() if ATTACKS.get(k).autoattack}
    if not flags:
        return Outcome(None, detail="needs an AutoAttack (autoattack, autoattack_fast, its parts or its rand version)")
    messages = sorted({m for ms in flags.values() for m in ms})
    return Outcome(
        not messages, {k: len(v) for k, v in flags.items()}, f"it warned: {' | '.join(messages)}" if messages else ""
    )


@check(9, "gradient", "the input gradient of the margin loss must be finite, and non-zero for most samples")
def gradient(c: CheckContext) -> Outcome:
    """NaN weights give NaN gradients; a model that hides its gradient (a non-differentiable input
    transform, a saturated or quantised layer) gives zeros, and every gradient attack then fails to
    move: its robust accuracy is not robustness. The margin (z_y - max_{j != y} z_j), not the
    cross-entropy, whose gradient a confident model may round to zero for good reasons."""
    finite, moving = [], []
    with eval_mode(c.model) as model:
        for start in range(0, len(c.xs), c.settings.batch_size):
            x = c.xs[start : start + c.settings.batch_size].clone().requires_grad_(True)
            y = c.ys[start : start + c.settings.batch_size]
            with torch.enable_grad():
                logits = model(x).float()
                other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
                margin = logits.gather(1, y[:, None]).squeeze(1) - other.max(dim=1).values
                (grad,) = torch.autograd.grad(margin.sum(), x)
            norms = grad.flatten(1).abs().sum(dim=1)
            finite.append(torch.isfinite(norms))
            moving.append(torch.isfinite(norms) & (norms > 0))
    ok = assemble(torch.cat(finite) if finite else torch.zeros(0, dtype=torch.bool), c.mine, c.n)
    nonzero = assemble(torch.cat(moving) if moving else torch.zeros(0, dtype=torch.bool), c.mine, c.n)
    share, broken = _accuracy(nonzero), int((~ok).sum())
    numbers = {"samples": c.n, "not_finite": broken, "nonzero_share": share}
    if broken:
        return Outcome(False, numbers, f"{broken} of {c.n} samples have a NaN or infinite gradient (NaN weights?)")
    return Outcome(share >= 0.5, numbers, "" if share >= 0.5 else f"only {100 * share:.0f} % have a non-zero gradient")


def failed(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in checks if c["status"] == "failed"]
