"""Benchmark: images/s of robustdistill's evaluation against calling the attack libraries directly
on the same model, images and settings, side by side (interleaved rounds, medians).

    python -m benchmarks.eval                      # trains a digits TRADES model for 5 epochs first (~20 s)
    python -m benchmarks.eval --run runs/trades --repeats 5

Rows: pgd20 (torchattacks.PGD), cw30 (CW-inf: PGD on the Carlini-Wagner margin; torchattacks has no
L-inf CW, so the direct side is a plain loop in torchattacks' style), autoattack_fast (pyautoattack,
APGD-CE + APGD-T, called directly on the whole split) and the suite (clean, fgsm, pgd20, cw30,
autoattack_fast: robustdistill's `evaluate` against the direct calls one after the other). The
robustdistill side includes what it adds: per-sample noise streams, the chunked and resumable
AutoAttack, per-sample verdicts and the metrics. torchattacks is optional (it declares torchvision,
which this project cannot depend on): `pip install --no-deps torchattacks`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, settings_line
from robustdistill.attacks import EvalSettings, cw_margin
from robustdistill.data import load_dataset
from robustdistill.evaluation.suite import evaluate_model
from robustdistill.models.sources import load_source, resolve_model_source
from robustdistill.recipes import recipe
from robustdistill.training.config import from_dict, load_config
from robustdistill.training.loop import train

try:
    import torchattacks
except ImportError:  # optional: see the docstring
    torchattacks = None


def batched(fn, x, y, batch):
    return torch.cat([fn(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)])


def accuracy(model, x, y, batch) -> float:
    with torch.no_grad():
        return (batched(lambda a, b: model(a).argmax(1), x, y, batch) == y).float().mean().item()


def direct_cw_inf(model, eps, alpha, steps):
    def attack(x, y):
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(cw_margin(model(x_adv), y).sum(), x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
        return x_adv

    return attack


def direct(name, model, x, y, s: EvalSettings) -> float:
    """The accuracy under `name`, computed by calling the libraries directly."""
    if name == "clean":
        return accuracy(model, x, y, s.batch_size)
    if name == "fgsm":
        return accuracy(model, batched(torchattacks.FGSM(model, eps=s.eps), x, y, s.batch_size), y, s.batch_size)
    if name == "pgd20":
        pgd = torchattacks.PGD(model, eps=s.eps, alpha=s.step_size, steps=20, random_start=True)
        return accuracy(model, batched(pgd, x, y, s.batch_size), y, s.batch_size)
    if name == "cw30":
        cw = direct_cw_inf(model, s.eps, s.step_size, 30)
        return accuracy(model, batched(cw, x, y, s.batch_size), y, s.batch_size)
    if name == "autoattack_fast":
        from pyautoattack import AutoAttack

        adversary = AutoAttack(
            model, norm="Linf", eps=s.eps, version="custom", attacks=["apgd-ce", "apgd-t"], device=x.device, seed=s.seed
        )
        adversary.apgd_targeted.n_target_classes = 9
        adversary.verbose = False
        adv, _ = adversary.run_standard_evaluation(x, y, batch_size=s.batch_size)
        return accuracy(model, adv, y, s.batch_size)
    raise ValueError(name)


def rate(n: int, times: list[float]) -> str:
    """images/s: median [slowest, fastest round]."""
    return f"{n / statistics.median(times):.0f} [{n / max(times):.0f}, {n / min(times):.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder or checkpoint (default: a digits TRADES model trained here)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if torchattacks is None:
        raise SystemExit("benchmarks/eval.py compares against torchattacks: pip install --no-deps torchattacks")
    print(f"{settings_line()}; torchattacks {torchattacks.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train(from_dict(recipe("trades"), [f"out_dir={tmp}", "train.epochs=5", "eval.checks=false"]))
        source = resolve_model_source(str(run))
        cfg = load_config(str(Path(run) / "config.yaml")) if Path(run).is_dir() else from_dict(recipe("trades"))
        dataset = load_dataset(cfg.data)
        model = load_source(source, dataset)[0].eval().requires_grad_(False)
        test = dataset.test
        x, y = test.images(), test.y
        base = EvalSettings(cfg.threat, step_size=cfg.threat.default_step_size)
        rows = []
        suites = {"pgd20": ("pgd20",), "cw30": ("cw30",), "autoattack_fast": ("autoattack_fast",)}
        suites["suite"] = ("clean", "fgsm", "pgd20", "cw30", "autoattack_fast")
        for row, attacks in suites.items():
            settings = EvalSettings(base.threat, step_size=base.step_size, attacks=attacks)
            times, acc = {"ours": [], "direct": []}, {}
            for r in range(args.repeats):
                for side in ("ours", "direct") if r % 2 == 0 else ("direct", "ours"):
                    start = time.perf_counter()
                    if side == "ours":
                        summary = evaluate_model(model, test, settings, dataset.num_classes)
                        acc[side] = summary["attacks"][attacks[-1]]["accuracy"]
                    else:
                        acc[side] = [direct(a, model, x, y, settings) for a in attacks][-1]
                    times[side].append(time.perf_counter() - start)
            med = {side: statistics.median(t) for side, t in times.items()}
            rows.append(
                [
                    row,
                    rate(len(y), times["ours"]),
                    rate(len(y), times["direct"]),
                    f"{med['direct'] / med['ours']:.2f}x",
                    f"{100 * acc['ours']:.1f} / {100 * acc['direct']:.1f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    header = ["attack", "ours images/s [range]", "direct images/s [range]", "ratio", "accuracy % ours / direct"]
    print()
    print_table(header, rows)
    print(f"model: {source.checkpoint}; {len(y)} test images; eps {base.eps:.4f}; {args.repeats} interleaved rounds")


if __name__ == "__main__":
    main()
