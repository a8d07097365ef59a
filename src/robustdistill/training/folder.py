"""A run folder's life around the loop: opened only after every check has passed (locked, created,
its config written, or for a resume its metrics trimmed back to the checkpoint), and removed again
when the run fails before its first checkpoint, which leaves nothing to resume from."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from ..storage.files import FolderLock, atomic_write
from ..storage.runs import CHECKPOINTS, MetricsLog, create_run_dir, foreign_entries, keep_previous_states
from .config import Config
from .preflight import record_changes

log = logging.getLogger("robustdistill")


def open_folder(
    cfg: Config,
    force: bool,
    resume: bool,
    changes: dict[str, tuple[Any, Any]],
    metrics: MetricsLog,
    at: tuple[int, int],
) -> FolderLock:
    """Lock and write the run folder (rank 0): a new run's config.yaml, or, for a resume from the
    checkpoint at `at` = (step, next epoch), the metrics trimmed to that step, the accepted config
    changes recorded and, when it trains on, its last evaluation's AutoAttack states moved to
    previous/. The lock is held for the group until the run ends: a second `train`,
    `--resume` or `--force` of the folder meanwhile is refused in one line."""
    run_dir = cfg.run_dir
    lock = FolderLock(run_dir, "training").acquire()
    try:
        create_run_dir(run_dir, force, resume)
        if not resume:
            atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
        else:
            step, epoch = at
            metrics.trim(step)  # records written after the checkpoint are written again
            if changes:
                record_changes(run_dir, cfg, changes, epoch)
            if epoch < cfg.train.epochs:  # the model changes: its last evaluation's AutoAttack states are stale
                for kept in keep_previous_states(run_dir):
                    log.info("the AutoAttack state of the run's last evaluation is kept as %s", kept)
    except BaseException:
        lock.release()
        raise
    return lock


def after_failure(run_dir: Path, lock: Optional[FolderLock], resume: bool, exc: BaseException, epochs: int) -> None:
    """A new run that failed before its first checkpoint leaves no folder behind: it held only what
    this call wrote (config, metrics, marker), nothing to resume from. A run interrupted after a
    checkpoint says how to continue it (`epochs`: the epochs it has trained)."""
    saved = (run_dir / CHECKPOINTS / "train_state.pt").exists()
    if not resume and not saved and run_dir.is_dir() and not foreign_entries(run_dir):
        shutil.rmtree(run_dir)
        if lock is not None:
            lock.discard()
        level = logging.INFO if isinstance(exc, KeyboardInterrupt) else logging.DEBUG
        log.log(level, "%s was removed: the run stopped before its first checkpoint", run_dir)
    elif saved and isinstance(exc, KeyboardInterrupt):
        log.info("interrupted after epoch %d; to continue: robustdistill train %s --resume", epochs, run_dir)
