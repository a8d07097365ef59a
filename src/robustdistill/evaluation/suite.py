"""The evaluation suite: run the configured attacks, assemble per-sample
verdicts, compute the metrics, run the sanity checks.

    settings = EvalSettings(ThreatModel(8 / 255), step_size=2 / 255, attacks=("clean", "pgd20"))
    summary = evaluate_model(model, split, settings, num_classes=10)

The attacks are the registered classes of `attacks` (`robustdistill list attacks`); the metrics
come from `metrics`, the checks from `checks`. Per attack: accuracy, class-wise accuracy,
worst/best class, NSD = std / mean of the class-wise accuracies; W-Robust Acc = (clean + robust) / 2
under the strongest attack that ran (`metrics.strongest_attack`, AutoAttack where it ran);
and `robust_to_all`, the per-sample worst case over every attack run (a sample counts only if it
survives all of them). A failed check is reported, never hidden.
Under DDP each rank attacks its blocks of samples and the per-sample verdicts are assembled on
every rank; random starts are drawn per sample from (seed, restart, index), so every number equals
the single-process one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..attacks import AttackEnv, EvalSettings, get_attack, predict
from ..attacks.pgd import l2_norms
from ..core.distributed import all_reduce_max, assemble, owned_indices
from ..data import Split
from ..models import eval_mode, fingerprint
from .checks import CheckContext, run_checks
from .metrics import sample_metrics, w_robust


def _bounds(x_adv: torch.Tensor, x: torch.Tensor, norm: str = "Linf") -> dict[str, float]:
    """Largest perturbation (L-inf, and per-sample L2 under the L2 threat model) and the range of
    the adversarial images, over every rank."""
    local = torch.tensor([0.0, -1.0, 0.0, 0.0], dtype=torch.float64, device=x.device)  # max |delta|, -min, max, L2
    if len(x):
        delta = (x_adv - x).double()
        l2 = l2_norms(delta).amax()
        local = torch.stack([delta.abs().amax(), -x_adv.amin().double(), x_adv.amax().double(), l2])
    out = all_reduce_max(local).tolist()
    bounds = {"max_linf": out[0], "min": -out[1], "max": out[2]}
    return bounds | ({"max_l2": out[3]} if norm == "L2" else {})


def evaluate_model(
    model: nn.Module,
    split: Split,
    settings: EvalSettings,
    num_classes: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    surrogate: Optional[nn.Module] = None,
    state_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """Evaluate `model` on `split` under each of `settings.attacks` (and the sanity checks if
    settings.checks). Under DDP each rank attacks its blocks of samples and the verdicts are
    assembled, so every number equals that of a single process."""
    attacks = list(settings.attacks)
    before = fingerprint(model) if settings.checks else None
    x_all, y_all, n = split.images(), split.y, len(split)
    mine = owned_indices(n, settings.block, rank, world_size)
    on_device = mine.to(y_all.device)
    x, y = x_all[on_device], y_all[on_device]
    env = AttackEnv(
        settings,
        surrogate.eval() if surrogate is not None else None,
        state_dir,
        progress,
        mine,
        x_all,
        y_all,
        rank,
        world_size,
    )
    correct: dict[str, torch.Tensor] = {}
    bounds: dict[str, dict[str, float]] = {}
    with eval_mode(model):
        for name in attacks:
            x_adv, hit = get_attack(name).run(model, x, y, env)
            hit = hit if hit is not None else predict(model, x_adv, settings.batch_size) == y
            correct[name] = assemble(hit, mine, n)
            bounds[name] = _bounds(x_adv, x, settings.norm)
        summary: dict[str, Any] = {
            "attacks": {name: sample_metrics(c, y_all, num_classes) for name, c in correct.items()},
            "settings": {a: get_attack(a).describe(settings) for a in attacks} | {"common": settings.common()},
        }
        if len(attacks) > 1:
            everything = torch.stack(list(correct.values())).all(dim=0)
            summary["robust_to_all"] = {"attacks": attacks, **sample_metrics(everything, y_all, num_classes)}
        weighted = w_robust({name: m["accuracy"] for name, m in summary["attacks"].items()})
        if weighted is not None:
            summary["w_robust"] = weighted
        if env.notes:
            summary["autoattack_flags"] = env.notes
        if env.parts:
            summary["autoattack_parts"] = env.parts
        if settings.checks:
            summary["checks"] = run_checks(CheckContext(model, correct, bounds, env, num_classes, before))
    return summary
