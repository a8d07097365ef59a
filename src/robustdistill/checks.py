"""The sanity checks of spec/evaluation.md, run with every evaluation.

Each check returns {"id", "name", "status": passed | failed | skipped, "numbers", "message"}.
A failed check is a warning in the report and on the terminal (`--strict` makes it an error):
it says the numbers may overestimate robustness, typically through gradient masking.

1 eps_zero      PGD with eps = 0 gives exactly the clean accuracy
2 monotone      accuracy does not increase with eps (eps/2 vs eps) or with steps (steps/4 vs steps)
3 large_eps     PGD from x (no random start) with eps = large_eps drives accuracy to chance or below
4 worst_case    the per-sample worst case is below every attack; AutoAttack is not above PGD-20
5 black_box     black-box attacks (square, transfer) are not stronger than the white-box ones
6 perturbation  every adversarial example lies in the eps-ball and in [0, 1]
7 unchanged     parameters and BatchNorm buffers are bit-identical before and after
8 autoattack_flags  pyautoattack's own checks raised no warning (randomised or dynamic model,
                probabilities instead of logits, zero gradients, "Square Attack has decreased the
                robust accuracy"), the flags the untouched package prints
Comparisons allow sampling noise of one sample or 0.5 %, whichever is larger.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .attacks import ATTACKS, AttackEnv, names_of, predict, run_pgd
from .distributed import assemble
from .metrics import ROBUST_ATTACK
from .models import fingerprint


def _accuracy(correct: torch.Tensor) -> float:
    """Accuracy of per-sample verdicts over the whole split (already assembled from every rank)."""
    return correct.double().mean().item() if len(correct) else 0.0


def _result(id_: int, name: str, passed: Optional[bool], numbers: dict[str, Any], message: str) -> dict[str, Any]:
    status = "skipped" if passed is None else ("passed" if passed else "failed")
    return {"id": id_, "name": name, "status": status, "numbers": numbers, "message": message}


def run_checks(
    model,
    correct: dict[str, torch.Tensor],
    bounds: dict[str, dict[str, float]],
    env: AttackEnv,
    num_classes: int,
    before: Optional[str],
) -> list[dict[str, Any]]:
    """The checks on the first `checks_subset` samples of the split; each rank attacks the ones it owns."""
    s = env.settings
    n = min(len(env.y_all), s.checks_subset)
    mine = env.index[env.index < n]
    on_device = mine.to(env.y_all.device)
    xs, ys = env.x_all[on_device], env.y_all[on_device]
    sub = dataclasses.replace(env, index=mine)
    tol = max(1.0 / max(n, 1), 0.005)

    def acc_of(x_adv) -> float:
        return _accuracy(assemble(predict(model, x_adv, s.batch_size) == ys, mine, n))

    def pgd(eps: float, steps: int, start: str = "uniform") -> float:
        at = dataclasses.replace(sub, settings=s.at_eps(eps))
        return acc_of(run_pgd(model, xs, ys, at, "checks", steps=steps, start=start, restarts=1))

    checks = []
    clean = _accuracy(correct["clean"][:n]) if "clean" in correct else acc_of(xs)
    zero = pgd(0.0, s.pgd_steps)
    checks.append(
        _result(
            1, "eps_zero", zero == clean, {"clean": clean, "pgd_eps0": zero}, "PGD at eps = 0 must equal clean accuracy"
        )
    )

    full = (
        _accuracy(correct[ROBUST_ATTACK][:n])
        if ROBUST_ATTACK in correct and s.restarts == 1
        else pgd(s.eps, s.pgd_steps)
    )
    half = pgd(s.eps / 2, s.pgd_steps)
    few_steps = max(1, s.pgd_steps // 4)
    few = pgd(s.eps, few_steps)
    ok = half + tol >= full and few + tol >= full
    checks.append(
        _result(
            2,
            "monotone",
            ok,
            {"eps/2": half, "eps": full, f"steps={few_steps}": few, f"steps={s.pgd_steps}": full},
            "accuracy must not increase with eps or with the number of steps",
        )
    )

    chance = 1.0 / num_classes
    large = pgd(s.large_eps, s.pgd_steps, start="none")
    checks.append(
        _result(
            3,
            "large_eps",
            large <= chance + tol,
            {"eps": s.large_eps, "accuracy": large, "chance": chance},
            "an unbounded white-box attack must reach chance accuracy or below; otherwise suspect gradient masking",
        )
    )

    if len(correct) > 1:
        accs = {k: _accuracy(v) for k, v in correct.items()}
        worst = _accuracy(torch.stack(list(correct.values())).all(dim=0))
        ok = all(worst <= a for a in accs.values())
        aa = {k: a for k, a in accs.items() if ATTACKS.get(k).autoattack}
        if aa and ROBUST_ATTACK in accs:
            ok = ok and all(a <= accs[ROBUST_ATTACK] + tol for a in aa.values())
        checks.append(
            _result(
                4,
                "worst_case",
                ok,
                {"robust_to_all": worst, **accs},
                "the per-sample worst case must be below every attack, and AutoAttack not above PGD-20",
            )
        )
    else:
        checks.append(_result(4, "worst_case", None, {}, "needs at least two attacks"))

    white = {k: _accuracy(correct[k]) for k in names_of("white-box") if k in correct}
    black = {k: _accuracy(correct[k]) for k in names_of("black-box") if k in correct}
    if white and black:
        strongest = min(white.values())
        ok = all(a + tol >= strongest for a in black.values())
        checks.append(
            _result(
                5,
                "black_box",
                ok,
                {**{f"white:{k}": v for k, v in white.items()}, **{f"black:{k}": v for k, v in black.items()}},
                "a black-box attack stronger than every white-box one points to gradient masking",
            )
        )
    else:
        checks.append(
            _result(
                5,
                "black_box",
                None,
                {},
                f"needs a white-box and a black-box attack ({' or '.join(names_of('black-box'))})",
            )
        )

    bad = {k: b for k, b in bounds.items() if b["max_linf"] > s.eps + 1e-6 or b["min"] < 0.0 or b["max"] > 1.0}
    checks.append(
        _result(
            6,
            "perturbation",
            not bad,
            {k: b for k, b in bounds.items()},
            "every adversarial example must lie in the eps-ball and in [0, 1]"
            + (f"; violated by {', '.join(bad)}" if bad else ""),
        )
    )

    after = fingerprint(model) if before is not None else None
    checks.append(
        _result(
            7,
            "unchanged",
            None if before is None else before == after,
            {"before": before, "after": after},
            "parameters and buffers must be bit-identical before and after the evaluation",
        )
    )

    flags = {k: v for k, v in env.notes.items() if ATTACKS.get(k).autoattack}
    if flags:
        messages = sorted({m for ms in flags.values() for m in ms})
        checks.append(
            _result(
                8,
                "autoattack_flags",
                not messages,
                {k: len(v) for k, v in flags.items()},
                "AutoAttack's own checks must raise no warning"
                + (f"; it warned: {' | '.join(messages)}" if messages else ""),
            )
        )
    else:
        checks.append(_result(8, "autoattack_flags", None, {}, "needs autoattack or autoattack_fast"))
    return checks


def failed(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in checks if c["status"] == "failed"]
