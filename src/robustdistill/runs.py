"""Run folders: creation that never overwrites by accident, checkpoint paths, the metrics log.

A run folder `runs/<name>/` holds:
    config.yaml              the resolved config (re-loadable with `load_config`)
    metrics.jsonl            one JSON object per logged step ("type": "step"), epoch ("epoch")
    checkpoints/last.safetensors, checkpoints/best.safetensors   model weights + architecture
    checkpoints/train_state.pt                                   optimizer, method state, RNG (resume)
    report.json, report.md   the final test evaluation of the best checkpoint
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import CheckpointError, UserError

CHECKPOINTS = "checkpoints"


def check_run_dir(run_dir: Path, force: bool, resume: bool) -> None:
    """Refuse (before anything is written) to reuse a folder unless asked."""
    if resume:
        if not (run_dir / CHECKPOINTS / "train_state.pt").is_file():
            raise UserError(f"cannot resume: {run_dir} has no {CHECKPOINTS}/train_state.pt")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise UserError(
                f"run folder {run_dir} already exists; pass --force to replace it, --resume to continue it, "
                "or choose another name (name=...)"
            )
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--force refuses to delete {run_dir}: it does not look like a run folder (no config.yaml)")


def create_run_dir(run_dir: Path, force: bool, resume: bool) -> None:
    check_run_dir(run_dir, force, resume)
    if force and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)


def model_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The model file of a run folder (or `path` itself if it is a file)."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / CHECKPOINTS / f"{which}.safetensors"
        if not ckpt.is_file():
            raise CheckpointError(f"run folder {path} has no {CHECKPOINTS}/{which}.safetensors (did its training finish an epoch?)")
        return ckpt
    if not path.is_file():
        raise CheckpointError(f"no run folder or checkpoint file at {path}")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl (a no-op on non-main DDP ranks)."""

    def __init__(self, path: Optional[Path]):
        self.path = path

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_plain(record)) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
