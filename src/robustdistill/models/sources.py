"""Models this tool did not just train (teachers, the transfer attack's surrogate, models to
evaluate): what a model path means, and loading it; the `teachers.<role>` config section.

    source = resolve_model_source("runs/trades")                   # a run folder: its best checkpoint
    source = resolve_model_source("teacher.pt")                     # a checkpoint file
    source = resolve_model_source("robustbench:Standard", dataset="cifar10")   # a local zoo entry

Training (its preflight, its teachers and `train.init_from`), `robustdistill eval` and the
surrogate all go through `resolve_model_source`; a missing file is a `CheckpointError` that says what to put where.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from ..core.errors import CheckpointError, UserError, require
from ..data import Dataset
from ..recipes import recipe_names
from ..storage.runs import model_checkpoint
from .base import Classifier, ModelConfig, ModelSpec
from .checkpoint import ModelMeta, load_model, read_model_meta
from .robustbench import is_robustbench, load_robustbench, zoo_file

log = logging.getLogger("robustdistill")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model path: `kind` run (a run folder of this tool; `run_dir` holds its
    config.yaml), file (a checkpoint file) or robustbench (a local zoo entry); `checkpoint` is
    the file to load."""

    target: str
    kind: Literal["run", "file", "robustbench"]
    checkpoint: Path
    run_dir: Optional[Path] = None
    model_dir: Optional[str] = None


def resolve_model_source(
    target: str | Path, which: str = "best", dataset: Optional[str] = None, model_dir: Optional[str] = None
) -> ModelSource:
    """What `target` means: `robustbench:<Name>[@<threat>]` (needs the dataset's name, for the zoo
    layout under `model_dir`), a run folder (its `which` checkpoint) or a checkpoint file."""
    target = str(target)
    if is_robustbench(target):
        if dataset is None:
            raise UserError(f"{target}: a RobustBench entry needs its dataset; pass --data NAME")
        return ModelSource(target, "robustbench", zoo_file(target, dataset, model_dir), model_dir=model_dir)
    path = Path(target)
    checkpoint = model_checkpoint(path, which)
    return ModelSource(target, "run" if path.is_dir() else "file", checkpoint, path if path.is_dir() else None)


def load_source(
    source: ModelSource, dataset: Dataset, spec: Optional[ModelSpec] = None
) -> tuple[Classifier, ModelSpec]:
    """The model of a resolved source and its spec (`spec`: the architecture of a foreign state dict)."""
    if source.kind == "robustbench":
        model, spec, _ = load_robustbench(source.target, dataset, source.model_dir)
        return model, spec
    model, meta = load_model(source.checkpoint, spec)
    return model, spec or meta.spec


@dataclass
class TeacherConfig:
    """A teacher: a run folder of this tool, or a checkpoint file.

    A safetensors file written by this tool carries its architecture; a plain state dict
    (`.pt`/`.pth`, read with weights_only=True) or a foreign safetensors file needs `model`.
    """

    path: str = ""  # run folder, checkpoint file, or robustbench:<Name>[@<threat>]
    checkpoint: Literal["best", "last"] = "best"  # which checkpoint of a run folder
    model: Optional[ModelConfig] = None  # the architecture of a plain state dict (a file of this tool records its own)
    model_dir: Optional[str] = None  # RobustBench's local model directory (default: models)

    def validate(self, key: str) -> None:
        require(bool(self.path), f"{key}.path", "is required")
        if self.model is not None:
            self.model.validate(f"{key}.model")


def model_spec(model_cfg: ModelConfig, dataset: Dataset) -> ModelSpec:
    normalize = model_cfg.normalize
    return ModelSpec(
        model_cfg.name,
        dataset.num_classes,
        dataset.channels,
        dict(model_cfg.kwargs),
        dataset.mean if normalize else None,
        dataset.std if normalize else None,
    )


def resolve_teacher(role: str, tcfg: TeacherConfig, dataset: str) -> ModelSource:
    try:
        return resolve_model_source(tcfg.path, tcfg.checkpoint, dataset, tcfg.model_dir)
    except CheckpointError as exc:
        raise CheckpointError(f"teacher '{role}' (teachers.{role}.path): {exc}{_how_to_train(tcfg.path)}") from None


def _how_to_train(path: str) -> str:
    """For a missing teacher named like a shipped recipe, the command that trains it there."""
    where = Path(path)
    if where.exists() or where.name not in recipe_names():
        return ""
    out = f" out_dir={where.parent}" if str(where.parent) != "runs" else ""
    also = "or robustdistill demo, which trains natural and trades"
    return f"; train it first: robustdistill train {where.name}{out} ({also})"


def load_teacher(role: str, tcfg: TeacherConfig, dataset: Dataset, device: torch.device) -> Classifier:
    """A teacher from a run folder, a checkpoint file or a local RobustBench entry, frozen, in
    eval mode, on `device`."""
    source = resolve_teacher(role, tcfg, dataset.name)
    meta = _recorded(source)
    trained_on = meta.data.get("name") if meta is not None and isinstance(meta.data, dict) else None
    if trained_on is not None and trained_on != dataset.name:
        raise CheckpointError(
            f"teacher '{role}' ({source.checkpoint}) was trained on {trained_on}, not on {dataset.name}: "
            "give a teacher of this dataset"
        )
    if role == "robust" and meta is not None and meta.method == "natural":  # an ablation may mean it: a warning
        log.warning(
            "WARNING: the robust teacher %s was trained by natural training (no adversarial examples): its soft "
            "labels carry no robustness to distil; give an adversarially trained teacher",
            source.checkpoint,
        )
    # `model` is the architecture of a plain state dict: a file of this tool records its own, which wins
    # (a recipe names the official file's architecture; a teacher trained here may stand in for it)
    if tcfg.model is not None and meta is not None:
        recorded = (meta.spec.name, meta.spec.kwargs)
        if (tcfg.model.name, dict(tcfg.model.kwargs)) != recorded:
            log.warning(
                "teachers.%s.model (%s %s) is not used: %s records its own architecture (%s %s)",
                role,
                tcfg.model.name,
                dict(tcfg.model.kwargs),
                source.checkpoint,
                *recorded,
            )
    given = model_spec(tcfg.model, dataset) if tcfg.model is not None and meta is None else None
    model, _ = load_source(source, dataset, given)
    model = model.to(device).eval().requires_grad_(False)
    probe = dataset.val if len(dataset.val) else dataset.train
    try:
        with torch.no_grad():
            out = model(probe.images(torch.arange(1, device=probe.y.device)))
    except RuntimeError as exc:
        raise CheckpointError(
            f"teacher '{role}' ({source.checkpoint}) does not accept {dataset.name} images: {str(exc).splitlines()[0]}"
        ) from None
    if not torch.isfinite(out).all():
        raise CheckpointError(
            f"teacher '{role}' ({source.checkpoint}) gives non-finite outputs (NaN or infinite weights?): "
            "the students it teaches would learn nothing; give a sound teacher"
        )
    if out.shape[-1] != dataset.num_classes:
        raise CheckpointError(
            f"teacher '{role}' ({source.checkpoint}) has {out.shape[-1]} outputs "
            f"but {dataset.name} has {dataset.num_classes} classes"
        )
    return model


def _recorded(source: ModelSource) -> Optional[ModelMeta]:
    """What a checkpoint of this tool records (None: a foreign file or a RobustBench entry)."""
    if source.kind == "robustbench" or source.checkpoint.suffix != ".safetensors":
        return None
    return read_model_meta(source.checkpoint)
