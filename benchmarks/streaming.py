"""Benchmark: the streaming loader (`data.loader=stream`) against the on-device loader
(`data.loader=device`): training throughput, and host memory while streaming a file larger than
the memory the process may take.

    python -m benchmarks.streaming                     # both parts, 5 rounds, a 128 MiB limit
    python -m benchmarks.streaming --rounds 3 --limit-mib 32 --parts memory

Throughput: `robustdistill train` (natural training, small_cnn, the lightest work per image, so the
loader's share is largest) on the same .npy files through both loaders, interleaved rounds (the
order alternates), each round a few epochs; the epochs' images/s come from the runs' metrics.jsonl
(the first epoch left out), the round's figure is their median. Workloads: digits (written to an
.npy, 8x8 gray, 1,797 images of which the run trains on 1,366) and a CIFAR-shaped synthetic set
(10,000 random uint8 32x32x3 images, 9,500 trained on). Target: stream / device >= 0.9.

Memory: a synthetic CIFAR-shaped .npy 10x the limit is streamed for one epoch (batch 512, crop and
flip) in a fresh process whose data segment may grow by at most the limit (RLIMIT_DATA: the heap
and every private mapping; the file is read, not mapped). The peak resident memory above the
process's level after the first batch is measured (VmHWM, reset through /proc/self/clear_refs),
and the same for the on-device loader iterating a set held in memory for as many batches (what
the training step's side of the loop takes on a CPU: the batch turned to float, the crop's
padding). The streaming loader's own memory is the difference; "one batch-queue" is the
`prefetch` batches its queue holds, as the training step receives them (float32). Target: the
difference under 2x one batch-queue. Both processes run glibc's malloc with a fixed 1 MiB mmap
threshold (MALLOC_MMAP_THRESHOLD_), so that a freed batch leaves the process: the peak then
measures memory in use, not how much of it the allocator keeps for reuse (with the default
threshold the peaks of the same run vary by +-25 MiB from run to run, both loaders alike).
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

import numpy as np

from benchmarks.common import print_table, settings_line

MEMORY_BATCH, PREFETCH = 512, 2


def _synthetic(path: Path, n: int, seed: int = 0) -> None:
    """A CIFAR-shaped .npy of n random uint8 images (N,32,32,3) and its labels, written in chunks."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    for start in range(0, n, 20_000):
        stop = min(n, start + 20_000)
        images[start:stop] = np.random.default_rng(seed + start).integers(0, 256, (stop - start, 32, 32, 3))
    images.flush()
    del images
    np.save(path.with_name(path.name.replace("_images", "_labels")), np.arange(n) % 10)


def _digits(folder: Path) -> None:
    from robustdistill.data import DATASETS, DataConfig

    pool = DATASETS.get("digits")(DataConfig(name="digits")).train
    np.save(folder / "train_images.npy", (pool.x * 255).round().to(dtype=__import__("torch").uint8).numpy())
    np.save(folder / "train_labels.npy", pool.y.numpy())


# ------------------------------------------------------------------------------------------ throughput


def _images_per_s(tmp: Path, root: Path, loader: str, tag: str, epochs: int, threads: int, extra: list[str]) -> float:
    from robustdistill.storage.runs import read_metrics

    overrides = [
        f"out_dir={tmp / 'runs'}",
        f"name={tag}",
        "method.name=natural",
        "model.name=small_cnn",
        "data.name=arrays",
        f"data.root={root}",
        f"data.loader={loader}",
        "data.val_fraction=0.05",
        f"train.epochs={epochs}",
        "train.milestones=[]",
        f"train.threads={threads}",
        "train.eval_every=1000",
        "eval.attacks=[clean]",
        "eval.checks=false",
        *extra,
    ]
    argv = [sys.executable, "-m", "robustdistill", "train", "natural", "--force", *overrides]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    rates = [r["images_per_s"] for r in read_metrics(tmp / "runs" / tag) if r["type"] == "epoch"][1:]
    return statistics.median(rates)


def throughput(tmp: Path, rounds: int, epochs: int, threads: int) -> list[list[str]]:
    digits, cifar = tmp / "digits", tmp / "cifar"
    digits.mkdir()
    cifar.mkdir()
    _digits(digits)
    _synthetic(cifar / "train_images.npy", 10_000)
    workloads = {
        "digits (8x8x1, batch 64)": (digits, ["model.kwargs.width=16", "train.batch_size=64"]),
        "CIFAR-shaped (32x32x3, batch 128)": (cifar, ["model.kwargs.width=16", "train.batch_size=128"]),
    }
    rows = []
    for name, (root, extra) in workloads.items():
        rates: dict[str, list[float]] = {"device": [], "stream": []}
        for k in range(rounds):
            order = ("device", "stream") if k % 2 == 0 else ("stream", "device")
            for loader in order:
                rates[loader].append(_images_per_s(tmp, root, loader, f"{loader}{k}", epochs, threads, extra))
            print(f"{name} round {k + 1}: " + ", ".join(f"{s} {rates[s][-1]:.0f}/s" for s in rates), flush=True)
        med = {s: statistics.median(v) for s, v in rates.items()}
        ratios = [s / d for s, d in zip(rates["stream"], rates["device"])]
        rows.append(
            [
                name,
                f"{med['device']:.0f} [{min(rates['device']):.0f}, {max(rates['device']):.0f}]",
                f"{med['stream']:.0f} [{min(rates['stream']):.0f}, {max(rates['stream']):.0f}]",
                f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]",
            ]
        )
    return rows


# ---------------------------------------------------------------------------------------------- memory


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(kind: str, path: Path, limit: int, steps: int) -> None:
    """`steps` batches of `kind`'s loader over the file at `path` (epoch after epoch), under a data
    limit; prints JSON."""
    import resource

    import torch

    from robustdistill.data import Augment, BatchLoader, HostSplit, StreamingLoader
    from robustdistill.data.mapped import open_npy

    source = open_npy(path)
    labels = torch.from_numpy(np.load(path.with_name(path.name.replace("_images", "_labels"))))
    split = HostSplit(source, labels, "NHWC", path)
    common = dict(shuffle=True, augment=Augment(4, True), seed=0)
    if kind == "stream":
        loader = StreamingLoader(split, MEMORY_BATCH, prefetch=PREFETCH, **common)
    else:
        loader = BatchLoader(split.materialise(), MEMORY_BATCH, **common)
    batches = iter(loader)
    next(batches)  # the thread, the allocator's first batch
    data = _status("VmData")
    resource.setrlimit(resource.RLIMIT_DATA, (data + limit, data + limit))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here
    base, started, done, epoch = _status("VmRSS"), time.perf_counter(), 1, 0
    while done < steps:
        for _ in batches:
            done += 1
            if done == steps:
                break
        epoch += 1
        loader.set_epoch(epoch)
        batches = iter(loader)
    seconds = time.perf_counter() - started
    print(json.dumps({"growth": _status("VmHWM") - base, "steps": done, "seconds": seconds}))


def _child(kind: str, path: Path, limit: int, steps: int) -> dict:
    argv = [sys.executable, "-m", "benchmarks.streaming", "--child", kind, str(path), str(limit), str(steps)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{kind} under a {limit / 2**20:.0f} MiB data limit failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(tmp: Path, rounds: int, limit_mib: int) -> list[list[str]]:
    limit = limit_mib * 2**20
    image = 32 * 32 * 3
    big, small = tmp / "big_images.npy", tmp / "small_images.npy"
    _synthetic(big, 10 * limit // image + 1)
    _synthetic(small, limit // (4 * image))  # held in memory (uint8) by the on-device loader, within the limit
    queue = PREFETCH * MEMORY_BATCH * image * 4
    steps = (10 * limit // image + 1) // MEMORY_BATCH  # one epoch of the big file
    rows = []
    growth: dict[str, list[int]] = {"stream": [], "device": []}
    for k in range(rounds):
        for kind in ("stream", "device") if k % 2 == 0 else ("device", "stream"):
            got = _child(kind, big if kind == "stream" else small, limit, steps)
            growth[kind].append(got["growth"])
            print(
                f"memory round {k + 1}: {kind} peak +{got['growth'] / 2**20:.1f} MiB, {got['steps']} batches",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in growth.items()}
    own = med["stream"] - med["device"]
    mib = 2**20
    rows.append(
        [
            f"{big.stat().st_size / mib:.0f} MiB ({big.stat().st_size / limit:.1f}x the limit)",
            f"{limit_mib} MiB",
            f"{MEMORY_BATCH} x {PREFETCH}: {queue / mib:.1f} MiB",
            f"{med['stream'] / mib:.1f} [{min(growth['stream']) / mib:.1f}, {max(growth['stream']) / mib:.1f}]",
            f"{med['device'] / mib:.1f} [{min(growth['device']) / mib:.1f}, {max(growth['device']) / mib:.1f}]",
            f"{own / mib:.1f} MiB = {own / queue:.2f}x",
        ]
    )
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("throughput", "memory"), default=["throughput", "memory"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8, help="epochs a throughput round trains (the first left out)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="train.threads of the runs")
    parser.add_argument("--limit-mib", type=int, default=128, help="the data limit of the memory part")
    args = parser.parse_args()
    print(settings_line(), f"train.threads={args.threads}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if "throughput" in args.parts:
            rows = throughput(tmp, args.rounds, args.epochs, args.threads)
            print()
            print_table(["workload", "device images/s [range]", "stream images/s [range]", "stream / device"], rows)
        if "memory" in args.parts:
            rows = memory(tmp, args.rounds, args.limit_mib)
            print()
            header = ["file", "data limit", "batch x prefetch: batch-queue", "stream peak MiB", "device peak MiB"]
            print_table([*header, "stream's own / batch-queue"], rows)


if __name__ == "__main__":
    main()
