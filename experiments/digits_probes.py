"""Two measurements behind the README's digits experiment that a comparison table cannot hold:
the teachers' soft-label entropy, and the robust teacher on the students' adversarial examples.

    robustdistill compare digits_methods --out runs/digits_methods --into docs/experiments/digits-methods.md
    python experiments/digits_probes.py runs/digits_methods --into docs/experiments/digits-methods.md

It reads the grid's folder (`OUT/teachers/{clean,robust}`, `OUT/runs/<cell>__seed<k>`):
- the mean entropy (nats) of each teacher's softmax on the training split, at tau = 1 and at the
  temperature EBB settles on in the B-MTARD runs (the mean of their last logged value);
- the robust teacher on the adversarial examples MTARD's adversarial target is computed on: the
  training attack (PGD on the student's cross-entropy with the hard label, the training eps and
  steps) against each final student of `PROBED`, on the training split: how right t(x_adv) is as a
  target, against the teacher's clean accuracy; the student's own accuracy for scale.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from robustdistill.attacks import PGD
from robustdistill.data import load_dataset
from robustdistill.models.checkpoint import load_model
from robustdistill.recipes import recipe
from robustdistill.storage.runs import read_metrics
from robustdistill.training.config import from_dict

PROBED = ["rslad", "rslad_tadv", "baseline_rt", "bmtard"]
SEEDS = [0, 1, 2, 3, 4]
BEGIN, END = "<!-- digits-probes:begin -->", "<!-- digits-probes:end -->"


def _best(run: Path) -> torch.nn.Module:
    model, _ = load_model(run / "checkpoints" / "best.safetensors")
    return model.eval()


def teacher_entropies(out: Path, x: torch.Tensor) -> str:
    last = [read_metrics(out / "runs" / f"bmtard__seed{s}")[-1] for s in SEEDS]
    settled = {
        "robust": float(np.mean([r["temperature_adv"] for r in last])),
        "clean": float(np.mean([r["temperature_nat"] for r in last])),
    }
    parts = []
    for role in ("clean", "robust"):
        with torch.no_grad():
            logits = _best(out / "teachers" / role)(x)
        for tau in (1.0, settled[role]):
            p = torch.softmax(logits / tau, dim=1)
            h = -(p * p.clamp_min(1e-12).log()).sum(dim=1).mean().item()
            parts.append(f"{role} teacher at tau {tau:.2f}: {h:.2f}")
    return "; ".join(parts)


def teacher_on_adversarial(out: Path, x: torch.Tensor, y: torch.Tensor, attack: dict) -> str:
    teacher = _best(out / "teachers" / "robust")
    with torch.no_grad():
        clean = (teacher(x).argmax(1) == y).float().mean().item()
    parts = [f"robust teacher on clean training images: {100 * clean:.1f} %"]
    for name in PROBED:
        t_acc, s_acc, ent = [], [], []
        for seed in SEEDS:
            student = _best(out / "runs" / f"{name}__seed{seed}")
            generator = torch.Generator().manual_seed(seed)
            pgd = PGD(
                student, attack["eps"], attack["step_size"], attack["steps"], "ce", "gaussian", generator=generator
            )
            x_adv = pgd(x, y)
            with torch.no_grad():
                p = torch.softmax(teacher(x_adv), dim=1)
                t_acc.append((p.argmax(1) == y).float().mean().item())
                s_acc.append((student(x_adv).argmax(1) == y).float().mean().item())
                ent.append(-(p * p.clamp_min(1e-12).log()).sum(1).mean().item())
        parts.append(
            f"on the {name} students' adversarial examples: teacher {100 * np.mean(t_acc):.1f} % "
            f"(entropy {np.mean(ent):.2f} nats), student {100 * np.mean(s_acc):.1f} %"
        )
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the digits_methods grid's folder (robustdistill compare --out)")
    parser.add_argument("--into", type=Path, help="also write them into this markdown file, between its markers")
    args = parser.parse_args()
    dataset = load_dataset(from_dict(recipe("rslad")).data)
    x, y = dataset.train.images(), dataset.train.y
    text = "\n".join(
        [
            f"Mean soft-label entropy on the training split (nats; uniform over 10 classes: {np.log(10):.2f}; "
            f"tau other than 1: where EBB settles in the B-MTARD runs): {teacher_entropies(args.out, x)}.",
            "",
            "The robust teacher on the training attack's adversarial examples (PGD-10 on each final student's "
            f"cross-entropy, training split, mean over seeds): "
            f"{teacher_on_adversarial(args.out, x, y, recipe('rslad')['attack'])}.",
        ]
    )
    print(text)
    if args.into is not None:
        old = args.into.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        if not pattern.search(old):
            raise SystemExit(f"{args.into} has no {BEGIN} ... {END} section to rewrite")
        args.into.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", old))
        print(f"\nrewrote the probes section of {args.into}")


if __name__ == "__main__":
    main()
