"""Benchmark: `robustdistill train --estimate` of the CIFAR configs of the newer methods (IGDM, SAAD,
CIARD) at their full size, with synthetic stand-ins for the files they read.

Each config is estimated as `robustdistill train CONFIG --estimate` estimates it, with its data root
and its teachers pointed at stand-ins of the same shapes: the CIFAR-10 / CIFAR-100 python files with
random images (50,000 training and 10,000 test images: the epoch's steps and the validation split
are the real ones) and teachers with random weights in the configured architectures (a RobustBench
entry's own, in RobustBench's layout). A step's time depends on the shapes, not on the values.

    python -m benchmarks.paper_estimates                      # the five configs, on this machine's CPU
    python -m benchmarks.paper_estimates --device cuda        # on one GPU (10 timed steps each)
    python -m benchmarks.paper_estimates --configs configs/cifar10/saad_resnet18.yaml --steps 3

On a CPU the default is 2 timed steps after 1 warm-up (a step of a WRN-28-10 teacher and a ResNet-18
student at batch 128 takes minutes there); the validation (PGD-20 on the 1,000 validation images)
is timed once. The total is the estimate's: steps x step time + validations + epochs' checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_table, settings_line
from robustdistill.models import ModelSpec, create_model
from robustdistill.models.robustbench import parse, zoo_spec
from robustdistill.training.config import load_config
from robustdistill.training.estimate import estimate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    "configs/cifar10/igdm_resnet18.yaml",
    "configs/cifar100/igdm_resnet18.yaml",
    "configs/cifar10/saad_resnet18.yaml",
    "configs/cifar100/saad_resnet18.yaml",
    "configs/cifar10/ciard_resnet18.yaml",
]


def fake_cifar(root: Path, dataset: str) -> None:
    """The dataset's python layout with random images (full sizes)."""
    rng = np.random.default_rng(0)
    classes = 10 if dataset == "cifar10" else 100

    def batch(n: int, key: str) -> bytes:
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return pickle.dumps({b"data": images, key.encode(): [j % classes for j in range(n)]})

    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            (folder / f"data_batch_{i}").write_bytes(batch(10_000, "labels"))
        (folder / "test_batch").write_bytes(batch(10_000, "labels"))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train").write_bytes(batch(50_000, "fine_labels"))
        (folder / "test").write_bytes(batch(10_000, "fine_labels"))


def stand_in_overrides(cfg, tmp: Path) -> list[str]:
    """Overrides that point the config's data and teachers at stand-ins, written under `tmp`."""
    dataset, classes = cfg.data.name, 10 if cfg.data.name == "cifar10" else 100
    data = tmp / "data"
    if not (data / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")).exists():
        fake_cifar(data, dataset)
    overrides = [f"data.root={data}"]
    for role, teacher in cfg.teachers.items():
        if teacher.path.startswith("robustbench:"):
            name, threat = parse(teacher.path)
            path = tmp / "models" / dataset / threat / f"{name}.pt"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(create_model(zoo_spec(dataset, threat, name, classes, 3)).net.state_dict(), path)
            overrides.append(f"teachers.{role}.model_dir={tmp / 'models'}")
        else:
            spec = ModelSpec(teacher.model.name, classes, 3, dict(teacher.model.kwargs))
            path = tmp / "teachers" / dataset / f"{role}_{teacher.model.name}.pt"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(create_model(spec).net.state_dict(), path)
            overrides.append(f"teachers.{role}.path={path}")
    return overrides


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--device", default="cpu", help="train.device (cpu, cuda)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 2 on a CPU, 10 on a GPU)")
    args = parser.parse_args()
    logging.getLogger("robustdistill").setLevel(logging.WARNING)
    cpu = args.device == "cpu"
    steps, warmup = (args.steps or (2 if cpu else 10)), (1 if cpu else 2)
    print(settings_line(args.device))
    print(f"{steps} timed steps after {warmup} warm-up per config, one validation")
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for name in args.configs:
            base = load_config(ROOT / name)
            extra = stand_in_overrides(base, tmp) + [f"train.device={args.device}", f"out_dir={tmp / 'runs'}"]
            cfg = load_config(ROOT / name, extra)
            e = estimate(cfg, steps=steps, warmup=warmup)
            rows.append(
                [
                    name,
                    e.device,
                    f"{e.step:.2f}",
                    str(e.steps_per_epoch),
                    f"{e.validation:.0f}",
                    f"{e.epochs} / {e.validations}",
                    hours(e.total),
                ]
            )
    print_table(
        ["config", "device", "s / step", "steps / epoch", "validation s", "epochs / validations", "total"], rows
    )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
