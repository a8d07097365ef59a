"""Run folders: creation that never overwrites by accident, checkpoint paths, the metrics log.

A run folder `runs/<name>/` holds:
    config.yaml              the resolved config (re-loadable with `load_config`)
    metrics.jsonl            one JSON object per logged step ("type": "step"), epoch ("epoch")
    checkpoints/last.safetensors, checkpoints/best.safetensors   model weights + architecture
    checkpoints/train_state.pt                                   optimizer, method state, RNG (resume)
    report.json, report.md   the final test evaluation of the best checkpoint
    plots/                   the figures (`robustdistill plot`, and at the end of a tracked run)
    trackers.json, tensorboard/, wandb/   what the trackers of `logging.*` keep there
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.errors import CheckpointError, UserError
from .files import INSIDE_LOCK, atomic_write

CHECKPOINTS = "checkpoints"
# an AutoAttack's resumable progress, one file per attack of the AutoAttack family (tests/test_attacks.py
# checks the list against the attacks registered)
AUTOATTACK_STATES = (
    "autoattack_state.json",
    "autoattack_fast_state.json",
    "autoattack_rand_state.json",
    "apgd_ce_state.json",
    "apgd_t_state.json",
    "fab_t_state.json",
)
MARKER = ".robustdistill-run"  # written into every run folder this tool creates
TRACKERS_FILE = "trackers.json"  # the ids of a run's tracker runs (W&B, MLflow), for a resume
TRACKER_DIRS = ("tensorboard", "wandb")  # what the trackers write inside a run folder: all of it theirs
# what the tool itself writes into a run folder (and its eval-* folders): --force deletes only these
_RUN_FILES = {
    MARKER,
    "config.yaml",
    "config_history.jsonl",
    "metrics.jsonl",
    TRACKERS_FILE,
    "report.json",
    "report.md",
    *AUTOATTACK_STATES,
}
_RUN_DIRS = {
    CHECKPOINTS: {"best.safetensors", "last.safetensors", "average.safetensors", "train_state.pt"},
    "plots": {"temperatures.png", "balance.png", "class_state.png", "classwise.png"},
}
_EVAL_FILES = {
    "report.json",
    "report.md",
    "classwise.png",
    *AUTOATTACK_STATES,
    INSIDE_LOCK,
}


PREVIOUS = "previous"  # a resumed run's earlier reports (and AutoAttack states), kept when replaced


def keep_previous_report(run_dir: Path) -> Optional[Path]:
    """Move the run's report.json (and report.md) to previous/report-<its time>.json before a new
    one is written (a finished run resumed, evaluated again); returns where, or None (no report)."""
    old = run_dir / "report.json"
    if not old.is_file():
        return None
    try:
        created = str(json.loads(old.read_text()).get("created", ""))
    except ValueError:
        created = ""
    stamp = "".join(c for c in created if c.isdigit())[:14] or _now()
    target = _free_previous(run_dir, f"report-{stamp}")
    if (run_dir / "report.md").is_file():
        os.replace(run_dir / "report.md", target.with_suffix(".md"))
    os.replace(old, target)
    return target


def keep_previous_states(run_dir: Path) -> list[Path]:
    """Move the AutoAttack states of the run's last evaluation to previous/<name>-<time>.json before
    the run trains on (they belong to the model it had: its next evaluation starts afresh); returns
    where they went."""
    kept, stamp = [], _now()
    for old in (run_dir / name for name in AUTOATTACK_STATES):
        if old.is_file():
            kept.append(_free_previous(run_dir, f"{old.stem}-{stamp}"))
            os.replace(old, kept[-1])
    return kept


def _now() -> str:
    return datetime.datetime.now().strftime("%Y%m%d%H%M%S")


def _free_previous(run_dir: Path, stem: str) -> Path:
    """previous/<stem>.json in `run_dir` (the folder created), or <stem>-2.json, -3 ... when taken."""
    folder = run_dir / PREVIOUS
    folder.mkdir(exist_ok=True)
    target, k = folder / f"{stem}.json", 1
    while target.exists():
        k += 1
        target = folder / f"{stem}-{k}.json"
    return target


def _ours(folder: str, name: str) -> bool:
    """Whether a file of a run folder's subfolder is one this tool writes there."""
    if folder == PREVIOUS:
        kept_state = name.startswith(tuple(Path(s).stem + "-" for s in AUTOATTACK_STATES)) and name.endswith(".json")
        return kept_state or (name.startswith("report-") and name.endswith((".json", ".md")))
    return name in _RUN_DIRS.get(folder, _EVAL_FILES)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # an interrupted atomic write


def foreign_entries(run_dir: Path) -> list[str]:
    """Paths under `run_dir` that this tool did not write (empty: the folder may be replaced)."""
    found = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if entry.is_file() and not entry.is_symlink() and (name in _RUN_FILES or _is_temp(name)):
            continue
        if entry.is_dir() and not entry.is_symlink() and name in TRACKER_DIRS:
            continue  # a tracker's own files (TensorBoard's events, W&B's offline runs)
        if (
            entry.is_dir()
            and not entry.is_symlink()
            and (name in _RUN_DIRS or name.startswith("eval-") or name == PREVIOUS)
        ):
            inner = [
                f"{name}/{e.name}"
                for e in sorted(entry.iterdir())
                if not (e.is_file() and not e.is_symlink() and (_ours(name, e.name) or _is_temp(e.name)))
            ]
            found.extend(inner)
            continue
        found.append(name)
    return found


def check_run_dir(run_dir: Path, force: bool, resume: bool) -> None:
    """Refuse (before anything is written) to reuse a folder unless asked; --force replaces only a
    folder this tool created (its marker) holding nothing but what the tool writes."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is an existing file; choose another name (name=...) or out_dir")
    if resume:
        if not (run_dir / CHECKPOINTS / "train_state.pt").is_file():
            raise UserError(f"cannot resume: {run_dir} has no {CHECKPOINTS}/train_state.pt")
        check_no_links_out(run_dir)
        for folder in (run_dir, run_dir / CHECKPOINTS):  # a resume writes both: refused before it changes either
            check_writable(folder)
        for log in ("metrics.jsonl", "config_history.jsonl"):  # appended to, not replaced
            if (run_dir / log).exists() and not os.access(run_dir / log, os.W_OK):
                raise UserError(f"cannot resume: {run_dir / log} is read-only; make it writable first")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise UserError(
                f"run folder {run_dir} already exists; pass --force to replace it, --resume to continue it, "
                "or choose another name (name=...)"
            )
        if run_dir.is_symlink():
            raise UserError(
                f"--force refuses to delete {run_dir}: it is a symbolic link (to {run_dir.resolve()}); "
                "remove the link yourself, or choose another name (name=...)"
            )
        if not (run_dir / MARKER).is_file():
            raise UserError(
                f"--force refuses to delete {run_dir}: this tool did not create it (no {MARKER}); "
                "move or delete it yourself, or choose another name (name=...)"
            )
        foreign = foreign_entries(run_dir)
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise UserError(
                f"--force refuses to delete {run_dir}: it holds files this tool did not write "
                f"({', '.join(foreign[:3])}{more}); move them out or choose another name (name=...)"
            )
    check_writable(run_dir)


def check_no_links_out(folder: Path) -> None:
    """Refuse a run or evaluation folder holding a symbolic link that leads out of it (metrics.jsonl
    linked to a file elsewhere, ...): the tool would read or write what the link points to."""
    root = folder.resolve()
    for entry in [
        *folder.iterdir(),
        *(e for d in folder.iterdir() if d.is_dir() and not d.is_symlink() for e in d.iterdir()),
    ]:
        if entry.is_symlink():
            target = entry.resolve()
            if target != root and root not in target.parents:
                raise UserError(
                    f"{entry} is a symbolic link to {target}, outside {folder}: the tool writes only into the "
                    "folder itself; replace the link with the file, or start a new run"
                )


def check_writable(path: Path) -> None:
    """Fail early if `path` (a folder, possibly not yet there) cannot be created or written."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is a file, not a folder")
    if _read_only_file_system(existing):
        raise UserError(f"cannot write {path}: {existing} is on a read-only file system")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: no write permission in {existing}")


def _read_only_file_system(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def create_run_dir(run_dir: Path, force: bool, resume: bool) -> None:
    check_run_dir(run_dir, force, resume)
    if force and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    if not marker.exists():
        marker.write_text(
            json.dumps({"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}) + "\n"
        )


def model_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The model file of a run folder (or `path` itself if it is a file)."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / CHECKPOINTS / f"{which}.safetensors"
        if not ckpt.is_file():
            raise CheckpointError(
                f"run folder {path} has no {CHECKPOINTS}/{which}.safetensors (did its training finish an epoch?)"
            )
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

    def write(self, **record: Any) -> dict[str, Any]:
        """Append the record (tensors as numbers, non-finite floats as null); returns it so (empty
        where nothing is written: no tensor is read back to the host on the other ranks)."""
        if self.path is None:
            return {}
        plain = _plain(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(plain) + "\n")
        return plain

    def trim(self, step: int) -> None:
        """Drop the records written after the checkpoint of `step` (a resumed run writes them again)."""
        if self.path is None or not self.path.exists():
            return
        lines = self.path.read_text(errors="replace").splitlines(keepends=True)
        kept = [line for line, record in _records(self.path, lines) if record.get("step", -1) <= step]
        if len(kept) != len(lines):
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(kept)))


def _records(path: Path, lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each non-blank line of metrics.jsonl; a last line cut by a crash is left
    out (a resumed run writes it again), a damaged line before it refused."""
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if i == last:
                continue
            raise UserError(
                f"{path} line {i + 1} is not a JSON record: the file was damaged or edited; "
                "restore it (or remove that line)"
            )
        out.append((line, record))
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's records (`_records`: a last line cut by a crash left out, a damaged one refused)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [record for _, record in _records(path, path.read_text(errors="replace").splitlines())]
