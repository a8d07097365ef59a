"""Benchmark: robustdistill's training step against a reference-style step (benchmarks/reference.py)
on the same model, data, batch and hyperparameters, measured side by side in one run.

    python -m benchmarks.train_step                                   # CPU: digits CNN and ResNet-18, 3 methods
    python -m benchmarks.train_step --workloads digits --methods absld --repeats 9
    python -m benchmarks.train_step --compile                         # robustdistill with train.compile
    python -m benchmarks.train_step --device cuda                     # CIFAR-10 shapes, WRN-34-10 / ResNet-56 teachers

Workloads (synthetic data where no dataset is at hand; the numbers are about speed, not accuracy):
    digits    the digits recipes: small CNN student (width 16), teachers width 32, batch 64, 8x8 images
    resnet18  ResNet-18 student on CIFAR-shaped 32x32 random images; on CPU at batch 8 with a ResNet-18
              robust teacher and a ResNet-56 clean teacher (a WRN-34-10 teacher would take seconds a
              step), on CUDA at batch 128 with the papers' WRN-34-10 and ResNet-56 teachers
Per (workload, method): `repeats` rounds, each timing `steps` consecutive steps of one side then the
other (the order alternates between rounds); the median and the range of the per-step times; the
ratio reference / robustdistill (above 1: robustdistill is faster); FLOPs of one step of each side
counted by operator (matmul, convolution: torch's flop formulas) and the achieved GFLOP/s, also as
a fraction of the best dense kernel measured in the same run, before and after (a large matmul and a large
convolution); the step's own matmuls and convolutions replayed alone, back to back with nothing
between them (`Kernels`: the time the step would take if every other operator cost nothing, so
its fraction of the best dense kernel bounds what any implementation calling the same kernels can
reach), interleaved like the steps; the peak memory of each side (CUDA: allocator peak; CPU: growth
of the process's peak resident set over a few steps after a warm-up step, its peak reset first where
Linux allows, each side in a fresh process). The thread settings are printed; OMP_WAIT_POLICY is
set to PASSIVE unless given (the spinning default made contended steps many times slower on a
shared machine). Its last line is the summary:
    slowest ratio: 1.02x compute-bound (bmtard, resnet18 cpu), 1.61x overhead-bound (absld, digits cpu)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import flop_registry

from benchmarks.common import print_table, settings_line
from benchmarks.workloads import (
    METHOD_NAMES,
    add_build_options,
    build,
    build_options,
    fake_cifar10,
    sync,
    workload,
)
from robustdistill.core.timing import FlopCount

COMPUTE_BOUND = 0.35  # fraction of the best dense kernel's GFLOP/s above which a workload counts as compute-bound


class Batches:
    def __init__(self, factory):
        self.factory, self.it = factory, factory()

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = self.factory()
            return next(self.it)


def timed(step, batches: Batches, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*batches.next())
    sync(device)
    return (time.perf_counter() - start) / steps


class Kernels(FlopCount):
    """FlopCount that also records the sequence of counted calls (the matmuls and convolutions of
    a step, forward and backward), to time them alone: `replay` runs exactly those calls back to back
    and nothing else, so its time is what the step would take if everything but its dense kernels
    cost nothing; no implementation calling the same kernels can run the step faster. Calls with
    the same operator and argument layouts (the PGD iterations repeat theirs) share one set of
    arguments, the step's own tensors of the first such call, so memory stays that of one pass."""

    def __init__(self):
        super().__init__()
        self.sequence: list = []  # the key of each call, in order
        self.arguments: dict = {}  # key -> (func, args, kwargs) of its first call

    @staticmethod
    def _layout(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.stride(), value.dtype, str(value.device))
        if isinstance(value, (list, tuple)):
            return tuple(Kernels._layout(v) for v in value)
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if flop_registry.get(func._overloadpacket) is not None:
            key = (func, self._layout(args), self._layout(sorted(kwargs.items())))
            detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.arguments.setdefault(key, (func, [detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()}))
            self.sequence.append(key)
        return out

    def replay(self, device: str) -> float:
        """Seconds to run the recorded calls once, in the step's order."""
        calls = [self.arguments[key] for key in self.sequence]
        with torch.inference_mode():
            sync(device)
            start = time.perf_counter()
            for func, args, kwargs in calls:
                func(*args, **kwargs)
            sync(device)
        return time.perf_counter() - start


def count_flops(step, batches: Batches) -> Kernels:
    counter = Kernels()
    with counter:
        step(*batches.next())
    return counter


def dense_peak(device: str) -> float:
    """The best GFLOP/s of a large fp32 matmul and a large convolution on this device (the fastest of
    5 runs: on a shared machine contention only ever slows a run down)."""
    best = 0.0
    n = 2048 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x = torch.randn(32, 64, 32, 32, device=device)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device)
    kernels = [
        (lambda: a @ b, 2 * n**3),
        (lambda: conv(x), 2 * 32 * 64 * 32 * 32 * 64 * 9),
    ]
    with torch.no_grad():
        for fn, flops in kernels:
            fn()
            times = []
            for _ in range(5):
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t)
            best = max(best, flops / min(times) / 1e9)
    return best


def _memory_child(side, method, wname, tmp, args, queue):
    torch.set_num_threads(args.threads)
    w = workload(wname, args.device, args.batch)
    built = build(side, method, w, Path(tmp), args)
    step, batches = built.step, Batches(built.batches)
    step(*batches.next())  # warm-up (allocations of the first step are part of the steady state)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one, so
        # the setup's transients do not count; elsewhere the lifetime peak (ru_maxrss) stands in
        try:
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    for _ in range(3):
        step(*batches.next())
    if args.device.startswith("cuda"):
        queue.put((torch.cuda.max_memory_allocated() - base) / 2**20)
    elif reset:
        status = Path("/proc/self/status").read_text()
        hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
        queue.put(max(0, hwm - base) / 2**20)
    else:  # ru_maxrss: KiB on Linux
        queue.put(max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20)


def peak_memory(side, method, wname, tmp, args) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(side, method, wname, str(tmp), args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def cells(row: tuple, peak: float) -> list[str]:
    """A table row, its fractions of the best dense kernel taken at `peak` (GFLOP/s)."""
    measured, gflops, memory = row
    *timed, alone = measured
    fraction = lambda a, b: f"{gflops[a] / peak:.2f} / {gflops[b] / peak:.2f}"  # noqa: E731
    return [*timed, fraction("ours", "ref"), alone, fraction("ours alone", "ref alone"), memory]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["digits", "resnet18"], choices=["digits", "resnet18"])
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=list(METHOD_NAMES))
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per side")
    parser.add_argument("--steps", type=int, default=0, help="steps per round (default: 10 digits, 2 resnet18 cpu)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_build_options(parser)
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the workload's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", help="also write the measurements to this file (benchmarks.gpu_kit reads it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(settings_line(args.device) + "; " + build_options(args))
    # measured before and after the workloads; the better of the two is the reference (a busy
    # moment on a shared machine lowers one measurement, never raises it)
    peaks = [dense_peak(args.device)]
    print(f"best dense kernel: {peaks[0]:.1f} GFLOP/s (before)", flush=True)
    rows, results, measurements = [], [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake_cifar10(tmp / "data", per_batch=200)
        for wname in args.workloads:
            w = workload(wname, args.device, args.batch)
            steps = args.steps or (10 if wname == "digits" else (2 if args.device == "cpu" else 10))
            for method in args.methods:
                sides = {side: build(side, method, w, tmp, args) for side in ("ours", "ref")}
                batches = {side: Batches(sides[side].batches) for side in sides}
                kernels = {side: count_flops(sides[side].step, batches[side]) for side in sides}
                flops = {side: kernels[side].total for side in sides}
                for side in sides:  # warm-up (compilation, allocator, caches)
                    timed(sides[side].step, batches[side], 2, args.device)
                times = {"ours": [], "ref": []}
                for r in range(args.repeats):
                    order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
                    for side in order:
                        times[side].append(timed(sides[side].step, batches[side], steps, args.device))
                med = {side: statistics.median(t) for side, t in times.items()}
                alone = {side: [] for side in sides}  # the step's dense kernels alone, interleaved likewise
                for r in range(args.repeats + 1):
                    for side in ("ours", "ref") if r % 2 == 0 else ("ref", "ours"):
                        seconds = kernels[side].replay(args.device)
                        if r:  # the first replay warms up
                            alone[side].append(seconds)
                alone = {side: statistics.median(t) for side, t in alone.items()}
                del kernels
                memory = (
                    {side: float("nan") for side in sides}
                    if args.no_memory
                    else {side: peak_memory(side, method, wname, tmp, args) for side in sides}
                )
                ratio = med["ref"] / med["ours"]
                gflops = {side: flops[side] / med[side] / 1e9 for side in sides}
                gflops.update({f"{side} alone": flops[side] / alone[side] / 1e9 for side in sides})
                results.append((ratio, gflops, method, f"{wname} {args.device.split(':')[0]}"))
                measurements.append(
                    {
                        "workload": wname,
                        "method": method,
                        "batch": w["batch"],
                        "ratio": ratio,
                        "seconds_per_step": med,
                        "flops_per_step": flops,
                        "gflop_per_s": {side: gflops[side] for side in sides},
                    }
                )
                measured = [
                    wname,
                    str(w["batch"]),
                    method,
                    f"{1e3 * med['ours']:.1f} [{1e3 * min(times['ours']):.1f}, {1e3 * max(times['ours']):.1f}]",
                    f"{1e3 * med['ref']:.1f} [{1e3 * min(times['ref']):.1f}, {1e3 * max(times['ref']):.1f}]",
                    f"{ratio:.2f}x",
                    f"{flops['ours'] / 1e9:.2f} / {flops['ref'] / 1e9:.2f}",
                    f"{gflops['ours']:.1f} / {gflops['ref']:.1f}",
                    f"{1e3 * alone['ours']:.1f} / {1e3 * alone['ref']:.1f}",
                ]
                rows.append((measured, gflops, f"{memory['ours']:.0f} / {memory['ref']:.0f}"))
                print(" | ".join(cells(rows[-1], peaks[0])), flush=True)
    peaks.append(dense_peak(args.device))
    peak = max(peaks)
    print(f"best dense kernel: {peaks[1]:.1f} GFLOP/s (after); used: {peak:.1f} GFLOP/s")
    results = [(ratio, gflops["ours"] / peak, method, where) for ratio, gflops, method, where in results]
    header = [
        "workload",
        "batch",
        "method",
        "ours ms/step [range]",
        "reference ms/step [range]",
        "ratio",
        "GFLOP/step ours / ref",
        "GFLOP/s ours / ref",
        "of best dense",
        "kernels alone ms/step ours / ref",
        "kernels alone of best dense",
        "peak MiB ours / ref",
    ]
    print()
    print_table(header, [cells(row, peak) for row in rows])
    parts = []
    for kind, compute in (("compute-bound", True), ("overhead-bound", False)):
        chosen = [r for r in results if (r[1] >= COMPUTE_BOUND) == compute]
        if chosen:
            ratio, _, method, where = min(chosen)
            parts.append(f"{ratio:.2f}x {kind} ({method}, {where})")
    print("slowest ratio: " + ", ".join(parts))
    if args.json:
        document = {"device": args.device, "amp": args.amp, "compile": args.compile, "dense_gflop_per_s": peak}
        Path(args.json).write_text(json.dumps({**document, "measurements": measurements}, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
