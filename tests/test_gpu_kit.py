"""The GPU kit (benchmarks/gpu_kit.py): its peak table and summary arithmetic, and, without a GPU, its
dry run of every part on the CPU, so that the kit works the day a GPU is lent."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks.gpu_kit import _summaries, peaks

ROOT = Path(__file__).resolve().parent.parent


def test_the_peaks_are_looked_up_from_the_device_name():
    assert peaks("NVIDIA H200") == (989.0, 67.0)
    assert peaks("NVIDIA H100 PCIe") == (756.0, 51.0) and peaks("NVIDIA H100 80GB HBM3") == (989.0, 67.0)
    assert peaks("NVIDIA A100-SXM4-80GB") == (312.0, 19.5) and peaks("NVIDIA L40S")[0] == 362.0
    assert peaks("NVIDIA L4") == (121.0, 30.3) and peaks("Some New GPU") is None


def test_the_summary_computes_mfu_ratio_and_projection_from_the_parts_files(tmp_path):
    step = {
        "measurements": [{"method": "bmtard", "workload": "resnet18", "ratio": 1.25, "gflop_per_s": {"ours": 33500.0}}]
    }
    (tmp_path / "train_step.json").write_text(json.dumps(step))
    runs = {"bmtard": {"images_per_s": 2450.0, "tflop_per_s": 98.9, "projected_hours": 300 * 49000 / 2450 / 3600}}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    (tmp_path / "tests.txt").write_text("5 passed in 12.0s\n")
    lines, summary = _summaries(tmp_path, "NVIDIA H200", {"tests": True, "train_step": True, "runs": False})
    assert "33.50 TFLOP/s, 50 % of the fp32 peak" in lines[1]
    assert "MFU 10.0 % of bf16" in lines[2]
    assert lines[-1] == (
        "gpu kit: 2 passed, 1 failed; MFU 10.0 %; ratio vs reference 1.25x; 300-epoch B-MTARD ResNet-18 projected 1.7 h"
    )
    assert summary["mfu_percent"] == pytest.approx(10.0)


@pytest.mark.slow
def test_without_a_gpu_the_kit_dry_runs_every_part_on_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the kit runs for real (python -m benchmarks.gpu_kit)")
    out = tmp_path / "kit"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_kit", "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("gpu kit: no CUDA GPU here; a dry run of every part on the CPU")
    assert re.match(r"gpu kit: 3 passed, 0 failed; MFU n/a; ratio vs reference [0-9.]+x; 300-epoch B-MTARD", lines[-1])
    assert "tests: passed (5 passed" in done.stdout  # the cuda tests ran on the CPU, none skipped
    for name in ("gpu_kit.txt", "tests.txt", "train_step.txt", "train_step.json", "runs.json", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "gpu_kit.txt").read_text().strip().splitlines()[-1] == lines[-1]
    assert set(json.loads((out / "runs.json").read_text())) == {"bmtard", "absld", "igdm"}
