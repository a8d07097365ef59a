"""Attacks: the PGD (L-inf or L2) of training's inner maximisation, and every evaluation attack as a
registered class.

    pgd.py         the primitives `PGD` and `FGSM`, and the `attack` config section (training's attack)
    base.py        `Attack`, its registry ATTACKS, the resolved `EvalSettings`, batched PGD with restarts

    white_box.py   clean, fgsm, pgd<N> and cw<N> (N steps: pgd20, pgd100, cw30)
    autoattack.py  autoattack, autoattack_fast, autoattack_rand, and the parts apgd_ce, apgd_t, fab_t
                   (pyautoattack, resumable, rank-independent; its Square part is `square`)
    black_box.py   square, transfer (crafted on a surrogate)

A new attack is one subclass of `Attack` with `@register`, in one of these files or a new one
imported below: its `name`, `kind`, `help` and `parameters()` are what the CLI, the report and
the sanity checks read.
"""

from . import autoattack, black_box, white_box  # noqa: E402,F401  (register the attacks)
from .base import (
    ATTACKS,
    ROBUST_ATTACK,
    Attack,
    AttackEnv,
    EvalSettings,
    get_attack,
    names_of,
    needs_surrogate,
    of_kind,
    predict,
    register,
    run_pgd,
)
from .pgd import FGSM, PGD, AttackConfig, Loss, Start, attack_loss, cw_margin, project, sample_noise

__all__ = [
    "ATTACKS",
    "ROBUST_ATTACK",
    "FGSM",
    "PGD",
    "Attack",
    "AttackConfig",
    "AttackEnv",
    "EvalSettings",
    "Loss",
    "Start",
    "attack_loss",
    "cw_margin",
    "get_attack",
    "names_of",
    "of_kind",
    "needs_surrogate",
    "predict",
    "project",
    "register",
    "run_pgd",
    "sample_noise",
]
