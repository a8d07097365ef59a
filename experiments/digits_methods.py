"""Experiment: the seed methods and their papers' ablations on digits, with 95 % intervals.

    python experiments/digits_methods.py                 # the papers' ablations, 5 seeds: ~10 min, 2 cores
    python experiments/digits_methods.py --investigate   # and 6 investigation variants: about 8 min more
    python experiments/digits_methods.py --baselines     # and eight baselines: about 12 min more
    python experiments/digits_methods.py --investigate --update-readme   # rewrite the README's results section
    python experiments/digits_methods.py --seeds 0 1 2 --out runs/quick

The demo's clean (natural) and robust (TRADES) teachers are trained once (seed 0); every variant
below is trained with each seed (student initialisation, data order and attack noise change; the
data split does not) and evaluated on the test split (clean and PGD-20; per-sample verdicts are in
each report.json). Finished runs in --out are reused, never overwritten (--force retrains them).

Variants (the ablations of the two papers):
    rslad        RSLAD (ABSLD with every temperature 1)
    absld        ABSLD (class-wise adaptive temperatures)
    absld_fixed  ABSLD with adaptive: false at temperature 1: must not differ from RSLAD
    baseline     MTARD's Baseline: clean + robust teacher, ebb and nlb off (w = 1/2, tau = 1)
    mtard        + NLB (Normalization Loss Balance)
    ebb          + EBB only (Entropy-Based Balance)
    bmtard       B-MTARD: EBB + NLB
Investigations (not the papers' variants): where B-MTARD's gap to RSLAD on W-Robust comes from.
MTARD's Baseline differs from RSLAD in four places; each variant changes one of them:
    bmtard_rt    B-MTARD with the robust teacher in both roles (what the clean teacher costs or buys)
    baseline_rt  the Baseline with the robust teacher in both roles (= RSLAD with the three below)
    rslad_half   RSLAD weighted 1/2 : 1/2 (the Baseline's weights) instead of 5/6 : 1/6
    rslad_ce     RSLAD whose inner max is the cross-entropy with the hard label (MTARD's attack)
    rslad_tadv   RSLAD whose adversarial target is the teacher on the adversarial input, t(x_adv)
    bmtard_tx    B-MTARD whose adversarial target is the robust teacher on the clean input, t(x) (RSLAD's)
Baselines (`--baselines`; their digits recipes, the TRADES teacher where they need one):
    mart, ard, iad, adaad, fair_ard, frl, cfa, bat
--variants picks any subset of all of these.

Intervals and paired differences: `robustdistill.stats` (2000 draws; `stats.HOW` says how they are made).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from robustdistill.attacks import PGD
from robustdistill.checkpoint import load_model
from robustdistill.config import from_dict
from robustdistill.data import load_dataset
from robustdistill.demo import TEACHERS, recipe
from robustdistill.methods import METHODS
from robustdistill.metrics import unpack_verdicts
from robustdistill.report import markdown_table
from robustdistill.runs import read_metrics
from robustdistill.stats import bootstrap, differences, interval, is_ratio, metric_names
from robustdistill.train import train

# name -> (recipe, overrides, teacher roles taken by another role's teacher)
VARIANTS = {
    "rslad": ("rslad", [], {}),
    "absld": ("absld", [], {}),
    "absld_fixed": ("absld", ["method.adaptive=false"], {}),
    "baseline": ("bmtard", ["method.ebb=false", "method.nlb=false"], {}),
    "mtard": ("bmtard", ["method.ebb=false", "method.nlb=true"], {}),
    "ebb": ("bmtard", ["method.ebb=true", "method.nlb=false"], {}),
    "bmtard": ("bmtard", ["method.ebb=true", "method.nlb=true"], {}),
    "bmtard_rt": ("bmtard", ["method.ebb=true", "method.nlb=true"], {"clean": "robust"}),
    "baseline_rt": ("bmtard", ["method.ebb=false", "method.nlb=false"], {"clean": "robust"}),
    "rslad_half": ("rslad", ["method.adv_weight=0.5"], {}),
    "rslad_ce": ("rslad", ["method.attack_loss=ce"], {}),
    "rslad_tadv": ("rslad", ["method.adversarial_target=adversarial"], {}),
    "bmtard_tx": ("bmtard", ["method.ebb=true", "method.nlb=true", "method.adversarial_target=clean"], {}),
    # the baselines the seed papers compare against (their digits recipes)
    "mart": ("mart", [], {}),
    "ard": ("ard", [], {}),
    "iad": ("iad", [], {}),
    "adaad": ("adaad", [], {}),
    "fair_ard": ("fair_ard", [], {}),
    "frl": ("frl", [], {}),
    "cfa": ("cfa", [], {}),
    "bat": ("bat", [], {}),
}
PAPER = ["rslad", "absld", "absld_fixed", "baseline", "mtard", "ebb", "bmtard"]
INVESTIGATION = ["bmtard_rt", "baseline_rt", "rslad_half", "rslad_ce", "rslad_tadv", "bmtard_tx"]
BASELINES = ["mart", "ard", "iad", "adaad", "fair_ard", "frl", "cfa", "bat"]
# (variant, reference): the comparisons the papers make
PAIRS = [
    ("absld", "rslad"),
    ("absld_fixed", "rslad"),
    ("mtard", "baseline"),
    ("ebb", "baseline"),
    ("bmtard", "baseline"),
    ("bmtard", "mtard"),
    ("bmtard", "rslad"),
    ("bmtard", "bmtard_rt"),
    ("bmtard_rt", "rslad"),
    ("baseline", "baseline_rt"),
    ("baseline_rt", "rslad"),
    ("rslad_half", "rslad"),
    ("rslad_ce", "rslad"),
    ("rslad_tadv", "rslad"),
    ("bmtard_tx", "bmtard"),
    ("bmtard_tx", "rslad"),
    # the seed methods against the baselines of their papers' tables
    ("absld", "fair_ard"),
    ("absld", "ard"),
    ("bmtard", "ard"),
    ("bmtard", "adaad"),
    ("fair_ard", "ard"),
    ("absld", "frl"),
    ("absld", "cfa"),
    ("absld", "bat"),
]
METRICS = metric_names(["clean", "pgd20"])  # clean, pgd20, worst pgd20, NSD pgd20, W-Robust
# What each method's paper reports on CIFAR-10, for the day a GPU run of configs/cifar10/ can be set
# beside it: method -> (where in the paper, the numbers as printed there). Only numbers read off the
# paper itself belong here, with the table they come from; None: not transcribed yet.
PAPER_CIFAR10: dict[str, Optional[tuple[str, str]]] = {
    name: None
    for name in ["rslad", "absld", "mtard", "bmtard", "mart", "ard", "iad", "adaad", "fair_ard", "frl", "cfa", "bat"]
}
README_BEGIN, README_END = "<!-- digits-experiment:begin -->", "<!-- digits-experiment:end -->"


def run_variant(name: str, seed: int, teachers: dict[str, Path], out: Path, force: bool) -> Path:
    base, overrides, swap = VARIANTS[name]
    run = out / f"{name}_seed{seed}"
    if (run / "report.json").is_file() and not force:
        return run
    roles = {role: teachers[swap.get(role, role)] for role in teachers}
    cfg = from_dict(recipe(base, roles), [f"out_dir={out}", f"seed={seed}", f"name={run.name}", *overrides])
    return train(cfg, force=force or run.exists())


def verdicts(run: Path) -> dict[str, np.ndarray]:
    report = json.loads((run / "report.json").read_text())
    n = report["data"]["num_samples"]
    return {a: unpack_verdicts(report["attacks"][a]["verdicts"], n) for a in ("clean", "pgd20")}


def cell(samples: np.ndarray, column: int, nsd: bool) -> str:
    fmt = "{:.3f}" if nsd else "{:.1f}"
    point, lo, hi = interval(samples, column)
    return f"{fmt.format(point)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def tables(boot: dict[str, np.ndarray]) -> tuple[str, str, list[str]]:
    rows = [[name] + [cell(boot[name], j, METRICS[j].startswith("NSD")) for j in range(len(METRICS))] for name in boot]
    main = markdown_table(["variant"] + [f"{m}{'' if m.startswith('NSD') else ' %'}" for m in METRICS], rows)
    diff_rows, findings = [], []
    found = differences(boot, PAIRS, METRICS)
    for k in range(0, len(found), len(METRICS)):
        pair = found[k : k + len(METRICS)]
        cells = []
        for d in pair:
            fmt = "{:.3f}" if is_ratio(d.metric) else "{:.1f}"
            mark = "*" if d.significant else ""
            cells.append(f"{fmt.format(d.estimate)} [{fmt.format(d.lo)}, {fmt.format(d.hi)}]{mark}")
            if mark:
                unit = "" if is_ratio(d.metric) else " points"
                sign = "+" if d.estimate > 0 else ""
                findings.append(f"{d.a} vs {d.b}: {d.metric} {sign}{d.estimate:.3g}{unit} [{d.lo:.3g}, {d.hi:.3g}]")
        diff_rows.append([f"{pair[0].a} - {pair[0].b}"] + cells)
    diffs = markdown_table(["difference"] + METRICS, diff_rows)
    return main, diffs, findings


def paper_table(boot: dict[str, np.ndarray]) -> str:
    """One row per method (the variants that are a method's default recipe): its digits result beside
    its paper, the CIFAR-10 config that reproduces the paper's setting here, and what the paper reports."""
    configs = Path(__file__).resolve().parents[1] / "configs" / "cifar10"
    rows = []
    for name, reported in PAPER_CIFAR10.items():
        if name not in boot:
            continue
        paper = METHODS.get(name).summary
        paper = paper[paper.rfind("(") + 1 : -1] if paper.endswith(")") else paper
        config = ", ".join(f"`{c.name}`" for c in sorted(configs.glob(f"{name}_*.yaml"))) or "-"
        if name == "mtard":  # MTARD is B-MTARD without EBB
            config = "`bmtard_resnet18.yaml` method.ebb=false"
        shown = f"{reported[1]} ({reported[0]})" if reported else "not transcribed yet"
        digits = [cell(boot[name], j, METRICS[j].startswith("NSD")) for j in range(len(METRICS))]
        rows.append([name, *digits, paper, config, shown])
    header = ["method", *[f"digits {m}{'' if m.startswith('NSD') else ' %'}" for m in METRICS]]
    return markdown_table(header + ["paper", "CIFAR-10 config", "paper's CIFAR-10 numbers"], rows)


def teacher_entropies(teachers: dict[str, Path], x: torch.Tensor, settled: dict[str, float]) -> str:
    """Mean soft-label entropy (nats) of each teacher on the training split, at tau = 1 and at the
    temperature EBB settles on in the B-MTARD runs (mean of their last logged value)."""
    parts = []
    for role, run in teachers.items():
        model, _ = load_model(run / "checkpoints" / "best.safetensors")
        with torch.no_grad():
            logits = model.eval()(x)
        for tau in (1.0, settled.get(role)):
            if tau is not None:
                p = torch.softmax(logits / tau, dim=1)
                h = -(p * p.clamp_min(1e-12).log()).sum(dim=1).mean().item()
                parts.append(f"{role} teacher at tau {tau:.2f}: {h:.2f}")
    return "; ".join(parts)


TEACHER_PROBE = ["rslad", "rslad_tadv", "baseline_rt", "bmtard"]


def teacher_on_adversarial(
    teacher_run: Path, out: Path, variants: list[str], seeds: list[int], x: torch.Tensor, y: torch.Tensor, attack: dict
) -> str:
    """The robust teacher on the adversarial examples that MTARD's adversarial target is computed on:
    the training attack (PGD on the student's cross-entropy with the hard label, the training eps and
    steps) against each final student, on the training split. Its accuracy there, against its clean
    accuracy, says how right t(x_adv) is as a target; the student's own accuracy is for scale."""
    teacher, _ = load_model(teacher_run / "checkpoints" / "best.safetensors")
    teacher.eval()
    with torch.no_grad():
        clean = (teacher(x).argmax(1) == y).float().mean().item()
    parts = [f"robust teacher on clean training images: {100 * clean:.1f} %"]
    for name in [v for v in TEACHER_PROBE if v in variants]:
        t_acc, s_acc, ent = [], [], []
        for seed in seeds:
            student, _ = load_model(out / f"{name}_seed{seed}" / "checkpoints" / "best.safetensors")
            student.eval()
            pgd = PGD(
                student,
                attack["eps"],
                attack["step_size"],
                attack["steps"],
                loss="ce",
                start="gaussian",
                generator=torch.Generator().manual_seed(seed),
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: the papers' ablations")
    parser.add_argument("--investigate", action="store_true", help="add the investigation variants")
    parser.add_argument(
        "--baselines", action="store_true", help="add the baselines (MART, ARD, IAD, AdaAD, Fair-ARD, FRL, CFA, BAT)"
    )
    parser.add_argument("--out", default="runs/digits_methods")
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap draws")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the README section between its markers")
    args = parser.parse_args()
    args.variants = args.variants or PAPER + (INVESTIGATION if args.investigate else []) + (
        BASELINES if args.baselines else []
    )
    started = time.perf_counter()
    out = Path(args.out)
    teachers = {}
    for role, name in TEACHERS.items():
        run = out / name
        teachers[role] = (
            run
            if (run / "report.json").is_file() and not args.force
            else train(from_dict(recipe(name), [f"out_dir={out}"]), force=args.force or run.exists())
        )
    results = {
        name: [verdicts(run_variant(name, s, teachers, out, args.force)) for s in args.seeds] for name in args.variants
    }
    dataset = load_dataset(from_dict(recipe("rslad")).data)
    labels = dataset.test.y.numpy()
    boot = bootstrap(results, labels, dataset.num_classes, METRICS, args.draws, seed=0)
    main_table, diff_table, findings = tables(boot)
    settled = {}
    if "bmtard" in args.variants:
        last = [read_metrics(out / f"bmtard_seed{s}")[-1] for s in args.seeds]
        settled = {
            "robust": float(np.mean([r["temperature_adv"] for r in last])),
            "clean": float(np.mean([r["temperature_nat"] for r in last])),
        }
    entropies = teacher_entropies(teachers, dataset.train.images(), settled)
    probe = teacher_on_adversarial(
        teachers["robust"],
        out,
        args.variants,
        args.seeds,
        dataset.train.images(),
        dataset.train.y,
        recipe("rslad")["attack"],
    )
    runs = [out / f"{name}_seed{s}" for name in args.variants for s in args.seeds] + list(teachers.values())
    trained = sum(r.get("seconds", 0.0) for run in runs for r in read_metrics(run) if r["type"] == "epoch") / 60
    minutes = (time.perf_counter() - started) / 60
    text = "\n".join(
        [
            f"`python experiments/digits_methods.py --seeds {' '.join(map(str, args.seeds))}"
            f"{' --investigate' if args.investigate else ''}{' --baselines' if args.baselines else ''}` "
            f"({len(args.seeds)} seeds, teachers fixed; digits test split, {len(labels)} images, eps = 0.2; "
            f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}; the runs' training epochs "
            f"took {trained:.0f} min in all (from their metrics.jsonl), this invocation {minutes:.0f} min). "
            "Each cell: mean over seeds [95 % interval, hierarchical bootstrap over seeds and test images].",
            "",
            main_table,
            "",
            "Paired differences (same seed, same images); `*`: the 95 % interval excludes 0.",
            "",
            diff_table,
            "",
            "Significant differences: " + ("; ".join(findings) if findings else "none") + ".",
            "",
            "Every method with its paper: the digits result above (the `mtard` row is the MTARD ablation, NLB "
            "without EBB) beside the CIFAR-10 config that sets up the paper's experiment here and the numbers "
            "the paper reports for it.",
            "",
            paper_table(boot),
            "",
            f"Mean soft-label entropy on the training split (nats; uniform over 10 classes: {np.log(10):.2f}; "
            f"tau other than 1: where EBB settles in the B-MTARD runs): {entropies}.",
            "",
            "The robust teacher on the training attack's adversarial examples (PGD-10 on each final student's "
            f"cross-entropy, training split, mean over seeds): {probe}.",
        ]
    )
    print(text)
    (out / "results.md").write_text(text + "\n")
    if args.update_readme:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        old = readme.read_text()
        pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
        if not pattern.search(old):
            raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} section to rewrite")
        readme.write_text(pattern.sub(lambda _: f"{README_BEGIN}\n{text}\n{README_END}", old))
        print(f"\nrewrote the results section of {readme}")


if __name__ == "__main__":
    main()
