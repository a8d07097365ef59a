"""Time the full evaluation suite on a digits model on this machine's CPU (target: under a minute).

    python -m benchmarks.eval_suite_digits RUN_FOLDER        # e.g. runs/trades after `robustdistill demo`

Runs clean, fgsm, pgd20, cw30, autoattack_fast, square (5000 queries) and transfer (from the run's
robust teacher, or the run itself when it has none) on the whole digits test split, then the
sanity checks, and prints the seconds of each attack and the total.
"""

from __future__ import annotations

import sys
import time

import torch

from robustdistill.attacks import AttackEnv, get_attack, predict
from robustdistill.data import load_dataset
from robustdistill.models.sources import load_source, resolve_model_source
from robustdistill.training.config import load_config

ATTACKS = ("clean", "fgsm", "pgd20", "cw30", "autoattack_fast", "square", "transfer")


def main(run: str) -> None:
    cfg = load_config(f"{run}/config.yaml")
    dataset = load_dataset(cfg.data)
    model = load_source(resolve_model_source(run), dataset)[0].eval()
    teacher = cfg.teachers.get("robust")
    surrogate = load_source(resolve_model_source(teacher.path), dataset)[0].eval() if teacher else model
    settings = cfg.eval.resolve(cfg.threat)  # the run's own evaluation settings
    env = AttackEnv(settings, surrogate=surrogate)
    x, y = dataset.test.images(), dataset.test.y
    total = time.perf_counter()
    print(f"{len(y)} test images, eps {settings.eps}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in ATTACKS:
        start = time.perf_counter()
        x_adv, hit = get_attack(name).run(model, x, y, env)
        acc = (hit if hit is not None else predict(model, x_adv, settings.batch_size) == y).float().mean().item()
        print(f"{name:16s} {100 * acc:6.2f} %  {time.perf_counter() - start:6.1f} s")
    print(f"total            {time.perf_counter() - total:6.1f} s (the sanity checks add a few PGD runs on top)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/trades")
