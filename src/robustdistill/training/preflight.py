"""Before a run is built: every check that can fail on the user's input, the student's starting
weights (`train.init_from`), and what a `--resume` may change and how the change is recorded.

Training calls `preflight` before it reads data or writes anything, so a mistake costs nothing
and leaves no folder behind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..attacks import needs_surrogate
from ..core.errors import CheckpointError, ConfigError
from ..data import Dataset
from ..data.own import has_own_validation
from ..evaluation.corruptions import corruption_files
from ..evaluation.report import now
from ..methods import METHODS
from ..models import Classifier, ModelSpec
from ..models.sources import ModelSource, load_source, resolve_model_source, resolve_teacher
from ..storage.files import atomic_write
from ..storage.runs import check_run_dir
from .config import RESUMABLE, Config, config_changes, load_config, resumable
from .trackers import check_trackers

log = logging.getLogger("robustdistill")


def preflight(cfg: Config, force: bool, resume: bool, check_folder: bool = True) -> dict[str, tuple[Any, Any]]:
    """Every check that can fail on user input, before anything is read or written; returns the
    config keys a resume changes (only those of RESUMABLE are accepted)."""
    method_cls = METHODS.get(cfg.method.name)
    for role in method_cls.required_teachers(cfg.method):
        if role not in cfg.teachers:
            raise ConfigError(
                f"method '{cfg.method.name}' needs a '{role}' teacher: set teachers.{role}.path "
                "to a run folder of this tool or a checkpoint file"
            )
    for role, tcfg in cfg.teachers.items():
        resolve_teacher(role, tcfg, cfg.data.name)
    if cfg.train.init_from is not None:
        _init_source(cfg)
    if method_cls.validates(cfg.method) and (cfg.train.eval_every != 1 or cfg.train.select_on != "val"):
        raise ConfigError(
            f"method '{cfg.method.name}' adapts to the validation split every epoch: "
            "it needs train.eval_every=1 and train.select_on=val"
        )
    if needs_surrogate(cfg.eval.attacks) and cfg.eval.surrogate is None and "robust" not in cfg.teachers:
        raise ConfigError(
            "eval.attacks has transfer: set eval.surrogate to a run folder or checkpoint (no robust teacher to use)"
        )
    if cfg.eval.corruptions is not None:  # said now, not after the training
        corruption_files(Path(cfg.eval.corruptions))
    check_trackers(cfg.logging)  # a tracker's missing package is said before anything is written
    if cfg.train.select_on == "val" and cfg.data.val_fraction <= 0 and not has_own_validation(cfg.data):
        raise ConfigError("train.select_on=val needs data.val_fraction > 0 (a validation split)")
    if check_folder:
        check_run_dir(cfg.run_dir, force, resume)
    if not resume:
        return {}
    changes = config_changes(load_config(cfg.run_dir / "config.yaml"), cfg)
    refused = [k for k in changes if not resumable(k)]
    if refused:
        shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused[:4])
        raise ConfigError(
            f"--resume refuses to change what {cfg.run_dir} was trained with ({shown}); only "
            f"{', '.join(RESUMABLE)} and logging.* may change; start a new run (name=...) instead"
        )
    return changes


def _init_source(cfg: Config) -> ModelSource:
    try:
        return resolve_model_source(cfg.train.init_from, "best", cfg.data.name)
    except CheckpointError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None


def initialise(student: Classifier, cfg: Config, dataset: Dataset, spec: ModelSpec) -> None:
    """The student starts from the weights of `train.init_from` (the FRL scripts fine-tune a
    pre-trained robust model); they must be the student's own architecture."""
    source = _init_source(cfg)
    try:
        weights, _ = load_source(source, dataset, spec)
    except CheckpointError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None
    own, given = student.state_dict(), weights.state_dict()
    if own.keys() != given.keys() or any(own[k].shape != given[k].shape for k in own):
        raise CheckpointError(
            f"train.init_from: {source.checkpoint} does not fit the student ({cfg.model.name}); "
            "give weights of the same architecture"
        )
    student.load_state_dict(given)
    log.info("student initialised from %s", source.checkpoint)


def record_changes(run_dir: Path, cfg: Config, changes: dict[str, tuple[Any, Any]], epoch: int) -> None:
    """A resume with changed keys rewrites config.yaml and appends the change to config_history.jsonl."""
    entry = {"time": now(), "resumed_after_epoch": epoch, "changes": {k: list(v) for k, v in changes.items()}}
    with open(run_dir / "config_history.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
