"""The GPU run kit: one command that proves the CUDA paths and measures the GPU figures, in at most
8 minutes on one CUDA GPU, for the few minutes a GPU may be lent.

    python -m benchmarks.gpu_kit --out OUT      # OUT/gpu_kit.txt (everything printed), OUT/<part>.txt, OUT/summary.json
    python -m benchmarks.record --only gpu_kit --outputs OUT --commit "commit abc1234"   # into benchmarks/README.md

Parts, each a subprocess with its own time budget inside an overall one (`--budget`, 470 s):
- `tests`: the tests marked `cuda` (tests/test_cuda.py: bf16 autocast, channels-last and
  torch.compile verdicts, an NCCL group, an exact resume on the GPU, attacks on the GPU against the CPU);
- `train_step`: `benchmarks.train_step` on CUDA, ResNet-18 students with the papers' WRN-34-10 and
  ResNet-56 teachers at batch 128, robustdistill against the reference-style loop (ratio), and the
  achieved TFLOP/s against the GPU's dense peaks (`PEAKS`, looked up from the device name);
- `runs`: short B-MTARD and ABSLD ResNet-18 runs with `train.compile` and `train.amp` on CIFAR-shaped
  synthetic data (written by the kit: no download), then IGDM (AdaAD + IGDM, eager: a third
  compilation would not fit the budget), two epochs each (the first one compiles): the
  second epoch's images/s, its TFLOP/s as a fraction of the bf16 peak (MFU), and the projected
  training time of a 300-epoch run on CIFAR-10's 49,000 training images (validation not counted).
One summary line per part, then
    gpu kit: P passed, F failed; MFU X %; ratio vs reference Y x; 300-epoch B-MTARD ResNet-18 projected H h
Without a GPU it says so in one line and does a dry run of every part on the CPU with tiny sizes
(the cuda tests on the CPU, the digits workload, small-CNN runs without compile), exit 0 when every
part passed: tested in CI, so the kit cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# dense TFLOP/s from NVIDIA's datasheets, without sparsity: (bf16 tensor core, fp32 non-tensor);
# matched in this order against torch.cuda.get_device_name() (the first name it contains)
PEAKS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),
    ("V100", 125.0, 15.7),  # fp16 tensor cores (no bf16)
    ("T4", 65.0, 8.1),  # fp16 tensor cores (no bf16)
]
TRAIN_IMAGES = 49_000  # CIFAR-10's training split less the 2 % validation hold-out
EPOCHS = 300


def peaks(device_name: str) -> tuple[float, float] | None:
    """(bf16, fp32) dense TFLOP/s of the named GPU, None when the table does not know it."""
    return next(((bf16, fp32) for name, bf16, fp32 in PEAKS if name in device_name), None)


def _parts(device: str, out: Path) -> list[tuple[str, float, list[str], dict[str, str]]]:
    """(name, budget in seconds, argv, extra environment) of each part."""
    cuda = device.startswith("cuda")
    py = sys.executable
    tests = [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py")]
    step = [py, "-m", "benchmarks.train_step", "--no-memory", "--json", str(out / "train_step.json")]
    step += (
        ["--device", device, "--workloads", "resnet18", "--methods", "bmtard", "absld", "--repeats", "3"]
        if cuda
        else ["--device", "cpu", "--workloads", "digits", "--methods", "bmtard", "--repeats", "1", "--steps", "1"]
    )
    runs = [py, "-m", "benchmarks.gpu_kit", "--part", "runs", "--device", device, "--out", str(out)]
    return [
        ("tests", 120.0, tests, {} if cuda else {"ROBUSTDISTILL_KIT_DEVICE": "cpu"}),
        ("train_step", 120.0, step, {}),
        ("runs", 220.0, runs, {}),  # two compilations; B-MTARD first, its figures kept if ABSLD runs out of time
    ]


def _run_part(name: str, budget: float, argv: list[str], env: dict[str, str], out: Path, log) -> bool:
    log(f"--- {name} (budget {budget:.0f} s): {' '.join(argv[1:])}")
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=budget)
        text, ok = done.stdout + done.stderr, done.returncode == 0
        why = "" if ok else f"exit {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        ok, why = False, f"over its {budget:.0f} s budget"
    (out / f"{name}.txt").write_text(text)
    log(text.rstrip())
    log(f"--- {name}: {'passed' if ok else 'FAILED (' + why + ')'} in {time.perf_counter() - start:.0f} s")
    return ok


def _summaries(out: Path, device_name: str, passed: dict[str, bool]) -> tuple[list[str], dict]:
    found = peaks(device_name)
    summary: dict = {"device": device_name, "peaks_tflops": found, "parts": passed}
    lines = []
    tests = (out / "tests.txt").read_text().strip().splitlines() if (out / "tests.txt").exists() else []
    lines.append(f"tests: {'passed' if passed.get('tests') else 'FAILED'} ({tests[-1] if tests else 'no output'})")
    ratio = mfu = hours = None
    step_file = out / "train_step.json"
    if step_file.exists():
        document = json.loads(step_file.read_text())
        cells = []
        for m in document["measurements"]:
            tflops = m["gflop_per_s"]["ours"] / 1e3
            of_peak = f", {100 * tflops / found[1]:.0f} % of the fp32 peak" if found else ""
            cells.append(f"{m['method']} {m['workload']}: {m['ratio']:.2f}x, {tflops:.2f} TFLOP/s{of_peak}")
        ratio = min((m["ratio"] for m in document["measurements"]), default=None)
        summary["train_step"] = document
        lines.append("train_step: " + "; ".join(cells) + " (ratio: reference / robustdistill time per step)")
    else:
        lines.append("train_step: FAILED (no measurements)")
    runs_file = out / "runs.json"
    if runs_file.exists():
        runs = json.loads(runs_file.read_text())
        summary["runs"] = runs
        cells = []
        for name, r in runs.items():
            of_peak = f", MFU {100 * r['tflop_per_s'] / found[0]:.1f} % of bf16" if found else ""
            cells.append(
                f"{name}: {r['images_per_s']:.0f} images/s, {r['tflop_per_s']:.2f} TFLOP/s{of_peak}, "
                f"{EPOCHS} epochs {r['projected_hours']:.1f} h"
            )
        if "bmtard" in runs:
            hours = runs["bmtard"]["projected_hours"]
            mfu = 100 * runs["bmtard"]["tflop_per_s"] / found[0] if found else None
        lines.append("runs: " + "; ".join(cells))
    else:
        lines.append("runs: FAILED (no measurements)")
    good, bad = sum(passed.values()), sum(not v for v in passed.values())
    fmt = lambda v, spec, unit="": "n/a" if v is None else f"{v:{spec}}{unit}"  # noqa: E731
    lines.append(
        f"gpu kit: {good} passed, {bad} failed; MFU {fmt(mfu, '.1f', ' %')}; "
        f"ratio vs reference {fmt(ratio, '.2f', 'x')}; "
        f"{EPOCHS}-epoch B-MTARD ResNet-18 projected {fmt(hours, '.1f', ' h')}"
        + ("" if found else " (no GPU peak known: a CPU dry run, or a GPU missing from PEAKS; not GPU figures)")
    )
    summary.update({"mfu_percent": mfu, "ratio": ratio, "projected_hours": hours})
    return lines, summary


def run_part_runs(device: str, out: Path) -> None:
    """The `runs` part: B-MTARD, ABSLD and IGDM, two epochs each on synthetic CIFAR-shaped data."""
    from benchmarks.workloads import fake_cifar10
    from robustdistill.models import ModelSpec, create_model
    from robustdistill.models.checkpoint import save_model
    from robustdistill.storage.runs import read_metrics
    from robustdistill.training.config import from_dict
    from robustdistill.training.loop import train

    cuda = device.startswith("cuda")
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake_cifar10(tmp / "data", per_batch=1280 if cuda else 40)  # 6,400 (200) training images
        specs = {
            "robust": ModelSpec("wrn34_10", 10, 3, {}) if cuda else ModelSpec("small_cnn", 10, 3, {"width": 8}),
            "clean": ModelSpec("resnet56", 10, 3, {}) if cuda else ModelSpec("small_cnn", 10, 3, {"width": 8}),
        }
        student = {"name": "resnet18"} if cuda else {"name": "small_cnn", "kwargs": {"width": 4}}
        torch.manual_seed(0)
        for role, spec in specs.items():
            save_model(tmp / f"{role}.safetensors", create_model(spec), spec)
        for method, roles in (("bmtard", ("robust", "clean")), ("absld", ("robust",)), ("igdm", ("robust",))):
            raw = {
                "name": method,
                "out_dir": str(tmp / "runs"),
                "method": {"name": method},
                "model": student,
                "data": {"name": "cifar10", "root": str(tmp / "data"), "val_fraction": 0.1},
                "attack": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10 if cuda else 2},
                "teachers": {role: {"path": str(tmp / f"{role}.safetensors")} for role in roles},
                "train": {
                    "epochs": 2,
                    "batch_size": 128 if cuda else 32,
                    "device": device,
                    "amp": True,
                    "compile": cuda and method != "igdm",  # the dry run: CPU compilation would take minutes
                    "milestones": [],
                    "eval_subset": 256 if cuda else 16,
                },
                "eval": {"attacks": ["clean"], "checks": False, "subset": 256 if cuda else 32},
            }
            run = train(from_dict(raw))
            second = [r for r in read_metrics(run) if r["type"] == "epoch"][-1]  # after compilation
            rate = second["images_per_s"]
            results[method] = {
                "images_per_s": rate,
                "tflop_per_s": second.get("gflop_per_s", 0.0) / 1e3,
                "projected_hours": EPOCHS * TRAIN_IMAGES / rate / 3600,
                "compile": raw["train"]["compile"],
                "amp": True,
            }
            print(f"{method}: epoch 2 at {rate:.0f} images/s, {results[method]['tflop_per_s']:.3f} TFLOP/s", flush=True)
            (out / "runs.json").write_text(json.dumps(results, indent=1))  # after each: a timeout keeps the first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_kit.txt, each part's output and summary.json")
    parser.add_argument("--budget", type=float, default=470.0, help="overall time limit in seconds")
    parser.add_argument("--part", choices=["runs"], help=argparse.SUPPRESS)  # one part, run by the kit itself
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "runs":
        run_part_runs(args.device, out)
        return 0
    lines_out: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines_out.append(line)

    start = time.perf_counter()
    if torch.cuda.is_available():
        device, name = "cuda", torch.cuda.get_device_name()
        found = peaks(name)
        log(
            f"gpu kit on {name} (torch {torch.__version__}, CUDA {torch.version.cuda}); dense peaks "
            + (f"{found[0]:.0f} TFLOP/s bf16, {found[1]:.1f} TFLOP/s fp32" if found else "unknown (not in PEAKS)")
        )
    else:
        device, name = "cpu", "no GPU"
        log("gpu kit: no CUDA GPU here; a dry run of every part on the CPU with tiny sizes (no GPU figures)")
    passed = {}
    for part, budget, argv, env in _parts(device, out):
        left = args.budget - (time.perf_counter() - start)
        if left < 10:
            log(f"--- {part}: not run (the overall {args.budget:.0f} s budget is spent)")
            passed[part] = False
            continue
        passed[part] = _run_part(part, min(budget, left), argv, env, out, log)
    lines, summary = _summaries(out, name, passed)
    for line in lines:
        log(line)
    summary["seconds"] = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_kit.txt").write_text("\n".join(lines_out) + "\n")
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
