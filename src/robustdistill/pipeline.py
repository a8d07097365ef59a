"""The one evaluation pipeline: a model source in, a report.json document out.

    source = resolve_model_source("runs/rslad")
    report = evaluate_source(source, dataset, "test", cfg.eval, cfg.eval.resolve(cfg.default_eps))

A training run's final report (`final_report`, called by `train`) and `robustdistill eval`
(`api.evaluate_path`) both call `evaluate_source`: the same loading, memory format, subset,
surrogate and suite, so `robustdistill eval RUN` computes the verdicts the run's own report holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .attacks import EvalSettings
from .checks import failed
from .config import Config, EvalConfig, TeacherConfig
from .data import Dataset, subset_of
from .distributed import DistInfo
from .evaluate import evaluate
from .models import ModelSpec
from .report import build_report, write_report
from .runs import CHECKPOINTS, keep_previous_report
from .teachers import ModelSource, load_source, load_surrogate

log = logging.getLogger("robustdistill")


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
    model, spec = load_source(source, dataset, spec)
    model = model.to(device).to(memory_format=memory_format)
    chosen = subset_of(dataset.split(split), eval_cfg.subset, f"the {split} split", "eval.subset")
    surrogate = load_surrogate(eval_cfg, dict(teachers or {}), dataset, device, loaded=loaded)
    if surrogate is not None:
        surrogate = surrogate.to(memory_format=memory_format)
    summary = evaluate(
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
    return build_report(summary, spec, source.checkpoint, dataset, split, len(chosen), settings.seed)


def final_report(
    cfg: Config,
    dataset: Dataset,
    dist_info: DistInfo,
    settings: EvalSettings,
    teachers: dict[str, nn.Module],
    selection: dict[str, Any],
) -> dict[str, Any]:
    """Evaluate the run's best checkpoint on the test split with `settings` (and the sanity checks),
    in the memory format it was trained in; write report.json/.md. The transfer attack's surrogate
    defaults to the robust teacher."""
    ckpt = cfg.run_dir / CHECKPOINTS / "best.safetensors"
    report = evaluate_source(
        ModelSource(str(cfg.run_dir), "run", ckpt, cfg.run_dir),
        dataset,
        "test",
        cfg.eval,
        settings,
        memory_format=cfg.train.memory_format,
        teachers=cfg.teachers,
        loaded=teachers,
        dist=dist_info,
        state_dir=cfg.run_dir,
    )
    report["selection"] = selection
    if dist_info.is_main:
        kept = keep_previous_report(cfg.run_dir)  # a finished run resumed: its report is kept, not replaced
        if kept is not None:
            log.info("the run's previous report is kept as %s", kept)
        write_report(cfg.run_dir, report, title=f"{cfg.run_dir.name}: {cfg.method.name} on {dataset.name}")
        for check in failed(report.get("checks", [])):
            log.warning(
                "WARNING: sanity check %d (%s) FAILED for %s: %s",
                check["id"],
                check["name"],
                cfg.run_dir,
                check["message"],
            )
    return report
