"""Benchmark: one training epoch of robustdistill's loop against a reference-style epoch
(benchmarks/reference.py), side by side in one run: every step of the epoch, then the per-epoch
robust evaluation (robustdistill: its validation and model selection, checkpoints written;
reference: the scripts' PGD-20 loop on the same images), interleaved rounds, medians.

    python -m benchmarks.epoch                         # digits, RSLAD / ABSLD / B-MTARD, CPU
    python -m benchmarks.epoch --methods absld --repeats 5 --channels-last on
    python -m benchmarks.epoch --device cuda --workloads resnet18      # CIFAR-10 shapes, 50 000 random images

The same workloads and options as benchmarks/train_step.py; on CPU the ResNet-18 epoch runs on the
1 000 random images of its small fake CIFAR-10 (the digits epoch is the real digits training split).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, settings_line
from benchmarks.reference import reference_robust_eval
from benchmarks.workloads import METHOD_NAMES, add_build_options, build, build_options, fake_cifar10, sync, workload


def compare(wname: str, method: str, w: dict, tmp: Path, args) -> list[str]:
    """One table row: `repeats` interleaved epochs of each side after one warm-up epoch each."""
    run = build("ours", method, w, tmp, args).run
    ref = build("ref", method, w, tmp, args)
    val = run.selection.split
    images, labels, eps = val.images(), val.y, w["attack"]["eps"]

    def ours(epoch):
        record = run.train_epoch(epoch)
        run.validate_and_select(epoch, record)
        run.save(record)

    def reference(epoch):
        for x, y in ref.batches():
            ref.step(x, y)
        reference_robust_eval(ref.student, images, labels, eps, eps / 4)

    times = {"ours": [], "ref": []}
    for r in range(args.repeats + 1):  # round 0 warms both sides up
        for side in ("ours", "ref") if r % 2 == 0 else ("ref", "ours"):
            sync(args.device)
            start = time.perf_counter()
            (ours if side == "ours" else reference)(r)
            sync(args.device)
            if r:
                times[side].append(time.perf_counter() - start)
    med = {side: statistics.median(t) for side, t in times.items()}
    return [
        wname,
        method,
        f"{med['ours']:.2f} [{min(times['ours']):.2f}, {max(times['ours']):.2f}]",
        f"{med['ref']:.2f} [{min(times['ref']):.2f}, {max(times['ref']):.2f}]",
        f"{med['ref'] / med['ours']:.2f}x",
        f"{len(run.loader)} steps + {len(labels)} validation images",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["digits"], choices=["digits", "resnet18"])
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=list(METHOD_NAMES))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved epochs per side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_build_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(settings_line(args.device) + "; " + build_options(args))
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake_cifar10(tmp / "data", per_batch=10_000 if args.device.startswith("cuda") else 200)
        for wname in args.workloads:
            w = workload(wname, args.device)
            for method in args.methods:
                rows.append(compare(wname, method, w, tmp, args))
                print(" | ".join(rows[-1]), flush=True)
    header = ["workload", "method", "ours s/epoch [range]", "reference s/epoch [range]", "ratio", "epoch"]
    print()
    print_table(header, rows)


if __name__ == "__main__":
    main()
