"""Teachers (and the transfer attack's surrogate): models this tool did not just train, loaded
from a run folder, a checkpoint file or a local RobustBench entry, frozen and in eval mode.
Training and `robustdistill eval` both resolve them here."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .checkpoint import load_model
from .config import EvalConfig, TeacherConfig
from .data import Dataset
from .errors import CheckpointError, UserError
from .models import Classifier, ModelSpec
from .robustbench import is_robustbench, load_robustbench
from .runs import model_checkpoint


def model_spec(model_cfg, dataset: Dataset) -> ModelSpec:
    normalize = model_cfg.normalize
    return ModelSpec(
        model_cfg.name,
        dataset.num_classes,
        dataset.channels,
        dict(model_cfg.kwargs),
        dataset.mean if normalize else None,
        dataset.std if normalize else None,
    )


def load_teacher(role: str, tcfg: TeacherConfig, dataset: Dataset, device: torch.device) -> Classifier:
    """A teacher from a run folder, a checkpoint file or a local RobustBench entry, frozen, in
    eval mode, on `device`."""
    if is_robustbench(tcfg.path):
        model, _, path = load_robustbench(tcfg.path, dataset, tcfg.model_dir)
    else:
        path = model_checkpoint(tcfg.path, tcfg.checkpoint)
        spec = model_spec(tcfg.model, dataset) if tcfg.model is not None else None
        model, _ = load_model(path, spec)
    model = model.to(device).eval().requires_grad_(False)
    probe = dataset.val if len(dataset.val) else dataset.train
    try:
        with torch.no_grad():
            out = model(probe.images(torch.arange(1, device=probe.y.device)))
    except RuntimeError as exc:
        raise CheckpointError(f"teacher '{role}' ({path}) does not accept {dataset.name} images: {str(exc).splitlines()[0]}") from None
    if out.shape[-1] != dataset.num_classes:
        raise CheckpointError(
            f"teacher '{role}' ({path}) has {out.shape[-1]} outputs but {dataset.name} has {dataset.num_classes} classes"
        )
    return model


def load_surrogate(eval_cfg: EvalConfig, teacher_cfgs: dict[str, TeacherConfig], dataset: Dataset,
                   device: torch.device, loaded: Optional[dict[str, nn.Module]] = None) -> Optional[nn.Module]:
    """The transfer attack's source model: `eval.surrogate`, else the robust teacher (reused from
    `loaded` when training already holds it); None when no transfer attack is asked for."""
    if "transfer" not in eval_cfg.attacks:
        return None
    if eval_cfg.surrogate is not None:
        return load_teacher("surrogate", TeacherConfig(path=eval_cfg.surrogate, model=eval_cfg.surrogate_model), dataset, device)
    if loaded and "robust" in loaded:
        return loaded["robust"]
    if "robust" in teacher_cfgs:
        return load_teacher("robust", teacher_cfgs["robust"], dataset, device)
    raise UserError("the transfer attack needs a surrogate: set eval.surrogate (or --surrogate) to a run folder or checkpoint")
