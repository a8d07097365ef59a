"""FLOPs per training sample of every method, counted by operator on the meta device (shapes only,
nothing computed), and the cost model built on them: time per epoch from dataset size, PGD steps,
processes and a sustained FLOP rate.

    python -m benchmarks.flops                       # both settings, PGD 5 / 10 / 20 steps
    python -m benchmarks.flops --rate 93             # also the epoch time at 93 GFLOP/s (e.g. this CPU's best kernel)
                                                     # and how it grows with images, PGD steps and processes

Settings: `digits` (small CNN student width 16, teachers width 32, 8x8 images) and `cifar10` (ResNet-18
student, WRN-34-10 robust teacher, ResNet-56 clean teacher, 32x32 images), the methods' default
options. Counted: every matmul and convolution forward and backward (torch's flop formulas), the
inner maximisation's input gradients included, in one step of `method.loss` + backward; divided by
the batch. Elementwise operations are not counted (they are memory-bound, not FLOP-bound).
"""

from __future__ import annotations

import argparse

import torch

from robustdistill.attacks import AttackConfig
from robustdistill.core.timing import FlopCount
from robustdistill.methods import METHODS, Context, create_method
from robustdistill.models import ModelSpec, create_model
from robustdistill.training.config import load_config

SETTINGS = {
    "digits": (
        ModelSpec("small_cnn", 10, 1, {"width": 16}),
        ModelSpec("small_cnn", 10, 1, {"width": 32}),
        ModelSpec("small_cnn", 10, 1, {"width": 32}),
        (1, 8, 8),
        0.2,
        1_000,  # about the digits training split
    ),
    "cifar10": (
        ModelSpec("resnet18", 10, 3, {}),
        ModelSpec("wrn34_10", 10, 3, {}),
        ModelSpec("resnet56", 10, 3, {}),
        (3, 32, 32),
        8 / 255,
        50_000,
    ),
}
H100_BF16 = 989e12  # dense bf16 peak, FLOP/s


def flops_per_sample(setting: str, method: str, steps: int, batch: int = 2) -> float:
    student_spec, robust_spec, clean_spec, shape, eps, _ = SETTINGS[setting]
    with torch.device("meta"):
        student = create_model(student_spec)
        teachers = {"robust": create_model(robust_spec).eval(), "clean": create_model(clean_spec).eval()}
    attack = AttackConfig(eps=eps, step_size=eps / 4, steps=steps)
    m = create_method(load_config(None, [f"method={method}"]).method, Context(student, student, 10, attack, teachers))
    x = torch.empty(batch, *shape, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    counter = FlopCount()
    with counter:
        loss, _ = m.loss(x, y)
        loss.backward()
    return counter.total / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20], help="PGD steps of the training attack")
    parser.add_argument("--rate", type=float, help="a sustained GFLOP/s for the epoch-time column")
    args = parser.parse_args()
    for setting, (*_, n) in SETTINGS.items():
        header = ["method"] + [f"GFLOP/sample, PGD-{k}" for k in args.steps]
        header += [f"epoch PFLOP ({n} images, PGD-10)", "epoch s at H100 bf16 peak", "at 35 % of it"]
        if args.rate:
            header.append(f"epoch s at {args.rate:g} GFLOP/s")
        print(f"\n{setting}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for method in METHODS.names():
            per = {k: flops_per_sample(setting, method, k) for k in args.steps}
            ten = per.get(10, flops_per_sample(setting, method, 10))
            epoch = ten * n
            row = [method] + [f"{per[k] / 1e9:.3g}" for k in args.steps]
            row += [f"{epoch / 1e15:.3g}", f"{epoch / H100_BF16:.3g}", f"{epoch / (0.35 * H100_BF16):.3g}"]
            if args.rate:
                row.append(f"{epoch / (args.rate * 1e9):.3g}")
            print("| " + " | ".join(row) + " |")
        if args.rate:
            growth(setting, n, args.rate)


def growth(setting: str, n: int, rate: float, method: str = "bmtard") -> None:
    """How one epoch's time grows with each factor, from the cost model: time = images x FLOPs per
    sample (at the PGD steps) / (processes x rate). FLOPs per sample do not depend on the batch size;
    the rate does (small batches leave the device idle), which this model cannot know: the measured
    rates are benchmarks/train_step.py's. Processes: ideal data-parallel scaling, gradient all-reduce
    and stragglers not counted (each process has its own rate)."""
    base = flops_per_sample(setting, method, 10)
    cases = [("as above", n, 10, 1)]
    cases += [(f"{k:g}x the images", int(n * k), 10, 1) for k in (0.5, 2, 4)]
    cases += [(f"PGD-{k}", n, k, 1) for k in (5, 20)]
    cases += [(f"{p} processes", n, 10, p) for p in (2, 4, 8)]
    print(f"\n{setting}, {method}: epoch time from the cost model at {rate:g} GFLOP/s per process\n")
    print("| change | images | PGD steps | processes | epoch PFLOP | epoch s | vs as above |")
    print("|---|---|---|---|---|---|---|")
    reference = n * base / (rate * 1e9)
    for label, images, steps, procs in cases:
        per = base if steps == 10 else flops_per_sample(setting, method, steps)
        seconds = images * per / (procs * rate * 1e9)
        cells = [label, str(images), str(steps), str(procs), f"{images * per / 1e15:.3g}", f"{seconds:.3g}"]
        print("| " + " | ".join(cells + [f"{seconds / reference:.2f}x"]) + " |")


if __name__ == "__main__":
    main()
