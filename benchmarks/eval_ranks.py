"""Benchmark: `robustdistill eval` of one checkpoint in one process against the same command under
`torchrun --nproc_per_node=2`, which splits the samples between the ranks: wall time and speed-up.

    python -m benchmarks.eval_ranks                      # ResNet-18, 512 synthetic CIFAR-10 images, PGD-3
    python -m benchmarks.eval_ranks --images 1024 --attacks clean,pgd10 --repeats 3

Sides, in interleaved rounds (the order alternates): one process on one intra-op thread (1x1), one
process on two threads (1x2: the whole machine for one process), two ranks on one thread each (2x1).
Wall time is the whole command's, as a user waits for it; its fixed part (start-up, loading data and
model, writing the report) is measured by the same command evaluating clean accuracy on one batch,
and the rest is the evaluation the ranks share. The batch size makes the samples fall in whole
blocks (4 batches each) that the two ranks share evenly. Every side's report must be the same (its
verdicts and every number; the creation time and thread count aside).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, settings_line
from benchmarks.workloads import fake_cifar10
from robustdistill.core.threat import ThreatModel
from robustdistill.models import ModelSpec, create_model
from robustdistill.models.checkpoint import ModelMeta, save_model

SIDES = {
    "1x1": ([sys.executable], "1"),
    "1x2": ([sys.executable], "2"),
    "2x1": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "1"),
}


def evaluate(side: str, model: Path, out: Path, args, attacks: str, images: int) -> float:
    """Seconds of one `robustdistill eval` on `side`."""
    launch, threads = SIDES[side]
    command = [*launch, "-m", "robustdistill", "eval", str(model), "--out", str(out), "--no-checks"]
    command += ["--attacks", attacks, "--subset", str(images), "--batch-size", str(args.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS=threads, TQDM_DISABLE="1")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{side}: {done.stderr[-2000:]}")
    return seconds


def report(folder: Path) -> dict:
    document = json.loads((folder / "report.json").read_text())
    return {k: v for k, v in document.items() if k not in ("created", "threads")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--attacks", default="clean,pgd3")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch; a block is 4 batches")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(settings_line())
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        fake_cifar10(tmp / "data", per_batch=args.images)
        spec = ModelSpec(args.model, 10, 3)
        data = {"name": "cifar10", "root": str(tmp / "data")}
        meta = ModelMeta(spec, data=data, threat=ThreatModel(8 / 255))
        save_model(tmp / "model.safetensors", create_model(spec), meta)
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        fixed: dict[str, list[float]] = {side: [] for side in SIDES}
        reports = {}
        for r in range(args.repeats):
            order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
            for side in order:
                out = tmp / f"{side}-{r}"
                times[side].append(evaluate(side, tmp / "model.safetensors", out, args, args.attacks, args.images))
                reports[side] = report(out)
                empty = tmp / f"{side}-{r}-fixed"
                fixed[side].append(evaluate(side, tmp / "model.safetensors", empty, args, "clean", args.batch_size))
    same = all(reports[side] == reports["1x1"] for side in SIDES)
    total = {side: statistics.median(t) for side, t in times.items()}
    work = {side: statistics.median(a - b for a, b in zip(times[side], fixed[side])) for side in SIDES}
    rows = [
        [
            side,
            f"{total[side]:.1f} [{min(times[side]):.1f}, {max(times[side]):.1f}]",
            f"{statistics.median(fixed[side]):.1f}",
            f"{work[side]:.1f}",
            f"{total['2x1'] / total[side]:.2f}",
            f"{work['2x1'] / work[side]:.2f}",
        ]
        for side in SIDES
    ]
    print(f"{args.model}, {args.images} images, attacks {args.attacks}, batch {args.batch_size}, {args.repeats} rounds")
    header = ["processes x threads", "seconds [range]", "fixed part", "evaluation", "2x1 / this", "(evaluation)"]
    print_table(header, rows)
    print(
        f"two ranks take {work['2x1'] / work['1x1']:.2f}x the evaluation time of one process on one thread "
        f"({total['2x1'] / total['1x1']:.2f}x the wall time), {work['2x1'] / work['1x2']:.2f}x that of one process "
        f"on two threads; reports identical: {same}"
    )


if __name__ == "__main__":
    main()
