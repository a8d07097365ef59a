"""What the step and epoch benchmarks train: the workloads (digits, ResNet-18 on CIFAR-shaped data),
synthetic CIFAR-10 files, and both sides of a comparison built from identical initial weights."""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.reference import REFERENCES
from robustdistill.methods import METHODS
from robustdistill.models import ModelSpec, create_model
from robustdistill.models.checkpoint import load_model, save_model
from robustdistill.training.config import from_dict
from robustdistill.training.loop import Run, Tally, setup

METHOD_NAMES = ("rslad", "absld", "bmtard")


def _workload(name: str, device: str) -> dict:
    cuda = device.startswith("cuda")
    if name == "digits":
        return {
            "data": {"name": "digits", "val_fraction": 0.2, "test_fraction": 0.2, "crop_padding": 1, "flip": False},
            "student": ModelSpec("small_cnn", 10, 1, {"width": 16}),
            "robust": ModelSpec("small_cnn", 10, 1, {"width": 32}),
            "clean": ModelSpec("small_cnn", 10, 1, {"width": 32}),
            "batch": 64,
            "attack": {"eps": 0.2, "step_size": 0.05, "steps": 10},
            "lr": 0.5,
        }
    if name == "resnet18":
        return {
            "data": {"name": "cifar10", "val_fraction": 0.02, "crop_padding": 4, "flip": True},
            "student": ModelSpec("resnet18", 10, 3, {}),
            "robust": ModelSpec("wrn34_10", 10, 3, {}) if cuda else ModelSpec("resnet18", 10, 3, {}),
            "clean": ModelSpec("resnet56", 10, 3, {}),
            "batch": 128 if cuda else 8,
            "attack": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10},
            "lr": 0.1,
        }
    raise SystemExit(f"unknown workload {name}")


def workload(name: str, device: str, batch: int = 0) -> dict:
    """The workload's settings; `batch` (if given) replaces its batch size."""
    w = _workload(name, device)
    if batch:
        w["batch"] = batch
    return w


def fake_cifar10(root: Path, per_batch: int) -> None:
    """CIFAR-10's python layout with random images: the reader, the split and the loader are real."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data = {b"data": images, b"labels": [j % 10 for j in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(data))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))


@dataclass
class Side:
    step: Callable  # one optimisation step on (x, y)
    batches: Callable  # a fresh iterator over one epoch's batches
    student: torch.nn.Module
    run: Run  # robustdistill's run (the reference side's supplies the data and the model spec)


def add_build_options(parser: argparse.ArgumentParser) -> None:
    """The robustdistill options `build` reads from `args` (train_step.py and epoch.py)."""
    parser.add_argument("--compile", action="store_true", help="robustdistill with train.compile=true")
    parser.add_argument("--amp", action="store_true", help="robustdistill with bf16 autocast")
    parser.add_argument("--channels-last", choices=["on", "off"], default="on", help="train.channels_last")
    parser.add_argument(
        "--fold-batchnorm", choices=["on", "off"], default="on", help="attack.fold_batchnorm (the PGD steps)"
    )


def build_options(args) -> str:
    """The options of `add_build_options` as the benchmarks' first line prints them."""
    return (
        f"robustdistill options: compile={args.compile} amp={args.amp} channels_last={args.channels_last} "
        f"fold_batchnorm={args.fold_batchnorm}"
    )


def build(side: str, method: str, w: dict, tmp: Path, args) -> Side:
    """One side ("ours" or "ref") of a comparison, both from identical initial weights."""
    torch.manual_seed(0)
    teacher_file = lambda role: tmp / f"{w['data']['name']}_{role}.safetensors"  # noqa: E731 (one per workload)
    for role in ("robust", "clean"):
        path = teacher_file(role)
        if not path.exists():
            save_model(path, create_model(w[role]), w[role])
    raw = {
        "seed": 0,
        "name": f"{side}_{method}",
        "out_dir": str(tmp / "runs"),
        "method": {"name": method},
        "model": {"name": w["student"].name, "kwargs": w["student"].kwargs},
        "data": {**w["data"], **({"root": str(tmp / "data")} if w["data"]["name"] == "cifar10" else {})},
        "attack": {**w["attack"], "fold_batchnorm": args.fold_batchnorm == "on"},
        "teachers": {role: {"path": str(teacher_file(role))} for role in METHODS.get(method).teachers},
        "train": {
            "batch_size": w["batch"],
            "lr": w["lr"],
            "device": args.device,
            "compile": args.compile,
            "amp": args.amp,
            "channels_last": args.channels_last == "on",
        },
    }
    run = setup(from_dict(raw), force=True, resume=False)
    run.release()  # only stepped from here on: the next workload may build a run of the same name
    if side == "ours":
        tally = Tally(run.device)
        run.student.train()

        def step(x, y):
            run.step(x, y, tally)

        return Side(step, lambda: iter(run.loader), run.student, run)
    teachers = {role: load_model(teacher_file(role))[0].to(run.device).eval() for role in raw["teachers"]}
    student = create_model(run.models.spec).to(run.device)
    student.load_state_dict(run.student.state_dict())  # the same initial weights as robustdistill's
    hp = {
        **{k: w["attack"][k] for k in ("eps", "step_size", "steps")},
        "lr": w["lr"],
        "weight_decay": 2e-4,
        "batch_size": w["batch"],
        "padding": w["data"]["crop_padding"],
        "flip": w["data"]["flip"],
        "num_classes": run.dataset.num_classes,
    }
    train_split = run.dataset.train
    ref = REFERENCES[method](student, teachers, (train_split.images().cpu(), train_split.y.cpu()), hp, run.device)
    return Side(ref.step, lambda: iter(ref.loader()), student, run)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
