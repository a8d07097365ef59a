"""`robustdistill demo`: the whole story on the embedded digits, in a few minutes on a laptop CPU.

It trains a clean teacher (natural training) and a robust teacher (TRADES), distills RSLAD,
ABSLD, MTARD and B-MTARD students from them, evaluates everything on the test split and prints
one comparison table (clean, PGD-20, worst-class PGD-20, NSD, W-Robust Acc).

The digits recipes live here as data so that the demo works from any install; the files in
`configs/digits/` are the same recipes for `robustdistill train` (a test keeps them equal).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from .config import from_dict
from .errors import UserError
from .report import comparison_table, read_report
from .train import train

log = logging.getLogger("robustdistill")

# eps = 0.2 on [0,1] digits shows the class disparity under attack that the fairness methods
# are about (TRADES small CNN: ~96% clean, ~67% PGD-20, worst class ~35%).
DIGITS_BASE: dict[str, Any] = {
    "seed": 0,
    "data": {"name": "digits", "val_fraction": 0.2, "test_fraction": 0.2, "crop_padding": 1, "flip": False},
    "model": {"name": "small_cnn", "kwargs": {"width": 16}},
    "attack": {"eps": 0.2, "step_size": 0.05, "steps": 10},
    "train": {"epochs": 30, "batch_size": 64, "lr": 0.1, "weight_decay": 5e-4, "milestones": [20, 25]},
    "eval": {"attacks": ["clean", "pgd20"]},
}

TEACHER_MODEL = {"name": "small_cnn", "kwargs": {"width": 32}}

# The adaptive mechanisms get the budget the papers give them on CIFAR-10, where the first lr decay
# comes after 215 epochs x 391 steps = 84,065 steps; digits has 20 epochs x 17 steps = 340 (ratio 247):
# - EBB (bmtard): tau moves 0.001 per step, up to 84 units on its range [1, 10] before the decay;
#   0.001 x 247 ~ 0.25 per step gives digits the same travel.
# - NLB (mtard, bmtard): eta_w = 0.025 is a relaxation rate towards the loss-ratio target (time constant
#   40 steps, 12 % of digits' pre-decay steps, so the weights reach their target within 3 epochs);
#   scaled by 247 it would exceed 1 and overshoot, so it stays at the paper's 0.025.
# - ABSLD: the hardest class's tau moves r per epoch, r = 0.1 x 215 epochs = 21.5 units on [0.5, 5]
#   before the decay; digits has 20 epochs: r = 0.25 gives 5 units (the whole range) while a step stays
#   6 % of the range (2 % on CIFAR-10); the strict ratio (1.07) would cross the range in 4 epochs.
# role -> (overrides of DIGITS_BASE, teachers it needs)
# Students use lr 0.5: the elementwise-mean KL of the seed methods is 1/C of the batch-mean KL,
# and 30 epochs is too short a budget for that small a step (lr 0.1 leaves RSLAD ~10 points lower).
RECIPES: dict[str, dict[str, Any]] = {
    "natural": {"method": {"name": "natural"}, "model": TEACHER_MODEL},
    "trades": {"method": {"name": "trades", "beta": 6.0}, "model": TEACHER_MODEL},
    "pgd_at": {"method": {"name": "pgd_at"}, "model": TEACHER_MODEL},
    "rslad": {"method": {"name": "rslad"}, "train": {"lr": 0.5}, "teachers": {"robust": {"path": "runs/trades"}}},
    "absld": {"method": {"name": "absld", "rate": 0.25}, "train": {"lr": 0.5}, "teachers": {"robust": {"path": "runs/trades"}}},
    "mtard": {
        "method": {"name": "mtard"},
        "train": {"lr": 0.5},
        "teachers": {"robust": {"path": "runs/trades"}, "clean": {"path": "runs/natural"}},
    },
    "bmtard": {
        "method": {"name": "bmtard", "temperature_lr": 0.25},
        "train": {"lr": 0.5},
        "teachers": {"robust": {"path": "runs/trades"}, "clean": {"path": "runs/natural"}},
    },
}

TEACHERS = {"clean": "natural", "robust": "trades"}
STUDENTS = ["rslad", "absld", "mtard", "bmtard"]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("model", "teachers", "method"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def recipe(name: str) -> dict[str, Any]:
    """The raw config mapping of a digits recipe (what configs/digits/<name>.yaml holds)."""
    return _merge(DIGITS_BASE, RECIPES[name]) | {"name": name}


def run_demo(out_dir: str | Path = "runs/demo", force: bool = False, epochs: int | None = None) -> str:
    """Train teachers and students on digits under `out_dir`; return the comparison table."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace the demo runs, or --out another folder")
    extra = [f"out_dir={out_dir}"] + ([f"train.epochs={epochs}", "train.milestones=[]"] if epochs else [])
    teacher_paths = {role: str(out_dir / name) for role, name in TEACHERS.items()}
    rows = []
    for label, name in [("clean teacher (natural)", "natural"), ("robust teacher (TRADES)", "trades")] + [
        (f"student ({s})", s) for s in STUDENTS
    ]:
        raw = recipe(name)
        for role in raw.get("teachers", {}):
            raw["teachers"][role]["path"] = teacher_paths[role]
        cfg = from_dict(raw, extra)
        log.info("demo: training %s -> %s", label, out_dir / name)
        run_dir = train(cfg, force=force)
        rows.append((label, read_report(run_dir / "report.json")))
    table = comparison_table(rows)
    (out_dir / "comparison.md").write_text(
        "# robustdistill demo on digits (test split, eps = 0.2)\n\n" + table + "\n"
    )
    return table
