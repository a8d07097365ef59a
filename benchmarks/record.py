"""Runs the speed benchmarks and writes their output verbatim (less the progress rows the final table
repeats) into benchmarks/README.md, each between its own markers, with the command, the commit, the
machine and the wall time: the README's figures are never typed by hand.

    python -m benchmarks.record                        # every benchmark below, one after another (~75 min, 2 CPU cores)
    python -m benchmarks.record --only eval flops      # some of them; the other blocks are kept
    python -m benchmarks.record --outputs DIR --commit "commit abc1234"   # DIR/<key>.txt, written by these commands

Keys and commands:
    train_step          python -m benchmarks.train_step
    train_step_nchw     python -m benchmarks.train_step --channels-last off --fold-batchnorm off
    train_step_1thread  python -m benchmarks.train_step --workloads digits --threads 1 --no-memory
    train_step_active   OMP_WAIT_POLICY=ACTIVE python -m benchmarks.train_step --workloads digits --no-memory
    train_step_compile  python -m benchmarks.train_step --workloads digits --compile
    batch32, batch128   python -m benchmarks.train_step --workloads digits --methods bmtard --no-memory --batch N
    epoch               python -m benchmarks.epoch
    eval                python -m benchmarks.eval
    eval_ranks          python -m benchmarks.eval_ranks
    grid_cost           python -m benchmarks.grid_cost --repeats 1
    aa_cost             python -m benchmarks.grid_cost --cells rslad absld mtard bmtard --repeats 3
    estimate            python -m benchmarks.estimate
    parallel            python -m benchmarks.parallel
    parallel_active     OMP_WAIT_POLICY=ACTIVE python -m benchmarks.parallel
    streaming           python -m benchmarks.streaming
    flops               python -m benchmarks.flops --rate R   (R: train_step's best dense kernel, GFLOP/s)
    gpu_kit             python -m benchmarks.gpu_kit --out OUT  (on a GPU machine; recorded from --outputs only)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
COMMANDS = {
    "train_step": "python -m benchmarks.train_step",
    "train_step_nchw": "python -m benchmarks.train_step --channels-last off --fold-batchnorm off",
    "train_step_1thread": "python -m benchmarks.train_step --workloads digits --threads 1 --no-memory",
    "train_step_active": "OMP_WAIT_POLICY=ACTIVE python -m benchmarks.train_step --workloads digits --no-memory",
    "train_step_compile": "python -m benchmarks.train_step --workloads digits --compile",
    "batch32": "python -m benchmarks.train_step --workloads digits --methods bmtard --no-memory --batch 32",
    "batch128": "python -m benchmarks.train_step --workloads digits --methods bmtard --no-memory --batch 128",
    "epoch": "python -m benchmarks.epoch",
    "eval": "python -m benchmarks.eval",
    "eval_ranks": "python -m benchmarks.eval_ranks",
    "grid_cost": "python -m benchmarks.grid_cost --repeats 1",
    "aa_cost": "python -m benchmarks.grid_cost --cells rslad absld mtard bmtard --repeats 3",
    "estimate": "python -m benchmarks.estimate",
    "paper_estimates": "python -m benchmarks.paper_estimates",
    "paper_estimates_ciard": "python -m benchmarks.paper_estimates --configs configs/cifar10/ciard_resnet18.yaml",
    "parallel": "python -m benchmarks.parallel",
    "parallel_active": "OMP_WAIT_POLICY=ACTIVE python -m benchmarks.parallel",
    "streaming": "python -m benchmarks.streaming",
    "flops": "python -m benchmarks.flops --rate {rate}",
    "gpu_kit": "python -m benchmarks.gpu_kit --out OUT",
    "paper_estimates_gpu": "python -m benchmarks.paper_estimates --device cuda",
}
# measured on a lent GPU machine: recorded from --outputs only, never run here
GPU_ONLY = {"gpu_kit", "paper_estimates_gpu"}
DENSE = re.compile(r"best dense kernel: .*used: ([0-9.]+) GFLOP/s")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") if Path("/proc/cpuinfo").exists() else open(os.devnull) as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
        cpu = names[0]
    return (
        f"{cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.machine()}"
    )


def commit() -> str:
    """The checkout's commit, `+changes` when its tracked files differ from it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True)  # noqa: E731
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "no git checkout"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/README.md").stdout.strip()
    return f"commit {head.stdout.strip()}{'+changes' if dirty else ''}"


def tidy(output: str) -> str:
    """The output without its progress rows (`a | b | c` printed as each row finishes), which the
    benchmarks print again as the markdown table (`| a | b | c |`) at the end."""
    lines = output.strip().splitlines()
    return "\n".join(line for line in lines if line.startswith("|") or " | " not in line)


def block(key: str, command: str, output: str, seconds: float | None, source: str) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    took = f", {seconds / 60:.1f} min" if seconds is not None else ""
    where = "" if key in GPU_ONLY else f"; {machine()}"  # the GPU kit's output names its own machine
    return (
        f"<!-- bench:{key}:begin -->\n`{command}` ({when}, {source}{where}{took}):\n\n"
        f"```text\n{tidy(output)}\n```\n<!-- bench:{key}:end -->"
    )


def replace(text: str, key: str, new: str) -> str:
    pattern = re.compile(rf"<!-- bench:{key}:begin -->.*?<!-- bench:{key}:end -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"benchmarks/README.md has no markers for '{key}' (<!-- bench:{key}:begin/end -->)")
    return pattern.sub(lambda _: new, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(COMMANDS), default=[k for k in COMMANDS if k not in GPU_ONLY])
    parser.add_argument("--outputs", type=Path, help="a folder of <key>.txt outputs of the commands above")
    parser.add_argument("--commit", default="commit not stated", help="with --outputs: the code they ran at")
    args = parser.parse_args()
    text = README.read_text()
    # where --outputs are recorded, the commit they ran at is the user's to state (--commit)
    source = f"recorded from {args.outputs.name}/, {args.commit}" if args.outputs else commit()
    for key in args.only:
        command = COMMANDS[key]
        if key in GPU_ONLY and not args.outputs:
            raise SystemExit(f"{key} runs on a GPU machine: run `{command}` there, then record it with --outputs OUT")
        if "{rate}" in command:
            step_output = (args.outputs / "train_step.txt").read_text() if args.outputs else text
            found = DENSE.search(step_output)
            if not found:
                raise SystemExit("flops needs train_step's 'best dense kernel ... used:' line: record train_step first")
            rate = round(float(found.group(1)))
            command = command.format(rate=rate)
        if args.outputs:
            path = args.outputs / f"{key}.txt"
            if not path.exists():
                raise SystemExit(f"{path} is missing: run `{command}` > {path}")
            output, seconds = path.read_text(), None
            timing = path.with_suffix(".time")  # `time`'s report, where the command was timed with it
            if timing.exists() and (m := re.search(r"real\s+(\d+)m([0-9.]+)s", timing.read_text())):
                seconds = 60 * int(m.group(1)) + float(m.group(2))
        else:
            print(f"record: {command}", flush=True)
            start = time.perf_counter()
            words = shlex.split(command)
            env = dict(os.environ)
            while "=" in words[0]:  # leading NAME=value words, as a shell takes them
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            argv = [sys.executable, *words[1:]]
            done = subprocess.run(argv, cwd=HERE.parent, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode:
                sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
                raise SystemExit(f"`{command}` failed (exit {done.returncode}); nothing recorded for it")
            output = done.stdout
        text = replace(text, key, block(key, command, output, seconds, source))
        README.write_text(text)  # after each one: an interrupted recording keeps what it measured
    print(f"record: {README} updated ({', '.join(args.only)})")


if __name__ == "__main__":
    main()
