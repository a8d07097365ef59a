"""The one evaluation pipeline: a model source in, a report.json document out.

    source = resolve_model_source("runs/rslad")
    report = evaluate_source(source, dataset, "test", cfg.eval, cfg.eval.resolve(cfg.threat))

A training run's final report (`training.loop.final_report`) and `robustdistill eval`
(`api.evaluate`) both call `evaluate_source`: the same loading, memory format, subset,
surrogate and suite, so `robustdistill eval RUN` computes the verdicts the run's own report holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..attacks import EvalSettings, needs_surrogate
from ..core.distributed import DistInfo
from ..core.errors import CheckpointError, UserError
from ..data import Dataset, subset_of
from ..models import ModelSpec
from ..models.sources import ModelSource, TeacherConfig, load_source, load_teacher
from .config import EvalConfig
from .corruptions import corruption_accuracy, corruption_files
from .report import build_report
from .suite import evaluate_model


def evaluate_source(
    source: ModelSource,
    dataset: Dataset,
    split: str,
    eval_cfg: EvalConfig,
    settings: EvalSettings,
    *,
    spec: Optional[ModelSpec] = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    teachers: Optional[Mapping[str, TeacherConfig]] = None,
    loaded: Optional[dict[str, nn.Module]] = None,
    dist: Optional[DistInfo] = None,
    progress: bool = True,
    state_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """Evaluate the model of `source` on the `split` split of `dataset` (its first `eval_cfg.subset`
    images) under `settings`, and return the report.json document.

    `spec`: the architecture of a foreign state dict; `memory_format`: the one the model was
    trained in (`train.channels_last`), so the attacks' float rounding is training's;
    `teachers` / `loaded`: where the transfer attack's surrogate comes from when `eval.surrogate`
    is unset (the robust teacher's config, or the module training already holds); under DDP
    (`dist`) each rank attacks its blocks and every rank returns the same document;
    `state_dir`: where AutoAttack keeps its resumable state."""
    dist = dist or DistInfo()
    device = dataset.test.y.device
    if eval_cfg.corruptions is not None:
        corruption_files(Path(eval_cfg.corruptions))  # a missing folder is said before any attack runs
    model, spec = load_source(source, dataset, spec)
    _check_finite(model, source)
    model = model.to(device).to(memory_format=memory_format)
    chosen = subset_of(dataset.split(split), eval_cfg.subset, f"the {split} split", "eval.subset")
    surrogate = load_surrogate(eval_cfg, dict(teachers or {}), dataset, device, loaded=loaded)
    if surrogate is not None:
        surrogate = surrogate.to(memory_format=memory_format)
    summary = evaluate_model(
        model,
        chosen,
        settings,
        dataset.num_classes,
        dist.rank,
        dist.world_size,
        progress=progress and dist.is_main,
        surrogate=surrogate,
        state_dir=state_dir,
    )
    if eval_cfg.corruptions is not None:  # every rank predicts every image: no attack, a small cost
        shape = tuple(chosen.shape[1:])
        summary["corruptions"] = corruption_accuracy(
            model.eval(), Path(eval_cfg.corruptions), dataset.num_classes, shape, settings.batch_size
        )
    return build_report(summary, spec, source.checkpoint, dataset, split, len(chosen), settings.seed)


def _check_finite(model: nn.Module, source: ModelSource) -> None:
    """NaN or infinite weights make every prediction meaningless (and every attack look weak or
    strong at random): refused whether or not the sanity checks run."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{source.checkpoint} has non-finite weights ({name} holds NaN or inf): its accuracies would mean "
                "nothing; evaluate a sound checkpoint (a run's last good one is in its checkpoints/ folder)"
            )


def load_surrogate(
    eval_cfg: EvalConfig,
    teacher_cfgs: dict[str, TeacherConfig],
    dataset: Dataset,
    device: torch.device,
    loaded: Optional[dict[str, nn.Module]] = None,
) -> Optional[nn.Module]:
    """The transfer attack's source model: `eval.surrogate`, else the robust teacher (reused from
    `loaded` when training already holds it); None when no attack asked for needs one."""
    if not needs_surrogate(eval_cfg.attacks):
        return None
    if eval_cfg.surrogate is not None:
        return load_teacher(
            "surrogate", TeacherConfig(path=eval_cfg.surrogate, model=eval_cfg.surrogate_model), dataset, device
        )
    if loaded and "robust" in loaded:
        return loaded["robust"]
    if "robust" in teacher_cfgs:
        return load_teacher("robust", teacher_cfgs["robust"], dataset, device)
    raise UserError(
        "the transfer attack needs a surrogate: set eval.surrogate (or --surrogate) to a run folder or checkpoint"
    )
