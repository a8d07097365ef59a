"""What every benchmark prints: the thread settings it measured under, and the final markdown table
(record.py keeps the lines that start with `|`)."""

from __future__ import annotations

import os

import torch


def settings_line(device: str = "cpu") -> str:
    """torch, device, the intra- and inter-op thread counts, the OpenMP policy and the CPU count."""
    return (
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"interop {torch.get_num_interop_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus {os.cpu_count()}"
    )


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
