"""The library's front door: train a config, evaluate any model path.

    from robustdistill.api import load_config, train, estimate, evaluate
    cfg = load_config("configs/digits/rslad.yaml", ["train.epochs=5"])
    print(estimate(cfg).total)        # seconds the training will take, from 10 timed steps; writes nothing
    run = train(cfg)
    report = evaluate(run, ["eval.attacks=[clean,pgd20,autoattack_fast]", "eval.subset=200"])

`evaluate` takes a run folder, a checkpoint file or `robustbench:<Name>` (resolved by
`models.sources.resolve_model_source`, as training resolves its teachers) and dotted overrides in
`robustdistill train`'s grammar, read by the same parser: `eval.*`, and where they apply `model.*`
(the architecture of a foreign state dict: `model.name`, `model.kwargs.width=16`, a user's
factory), `data.*` and `teachers.*` (the transfer attack's surrogate).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .core.distributed import DistInfo, resolve_device
from .core.errors import ConfigError, UserError
from .core.progress import shown
from .core.schema import apply_overrides, build
from .core.threat import ThreatModel
from .core.timing import intra_op_threads
from .data import DataConfig, load_dataset
from .evaluation.config import EvalConfig
from .evaluation.pipeline import evaluate_source
from .models import ModelConfig
from .models.checkpoint import read_model_meta
from .models.robustbench import is_robustbench, zoo_threat
from .models.sources import ModelSource, TeacherConfig, model_spec, resolve_model_source
from .training.config import Config, TrainConfig, load_config
from .training.estimate import estimate
from .training.loop import train

__all__ = ["estimate", "evaluate", "eval_config", "load_config", "resolve_model_source", "train"]


EVAL_SECTIONS = ("eval", "model", "data", "teachers")  # what `eval` takes of train's grammar


def _sections(overrides: list[str]) -> dict[str, list[str]]:
    """The overrides by section; one that `eval` cannot use is refused in one line."""
    out: dict[str, list[str]] = {s: [] for s in EVAL_SECTIONS}
    for item in overrides:
        section = item.split("=", 1)[0].strip().split(".", 1)[0]
        if section not in out:
            raise ConfigError(
                f"eval takes eval.*, model.*, data.* and teachers.* overrides, as train does "
                f"(e.g. eval.subset=100 model.kwargs.width=16), got '{item}'"
            )
        out[section].append(item)
    return out


def _sets(overrides: list[str], key: str) -> bool:
    """Whether one of `overrides` sets `key`."""
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def eval_config(base: EvalConfig, overrides: list[str]) -> EvalConfig:
    """`base` with dotted `eval.<key>=<value>` overrides applied, typed and validated like a config file."""
    raw = apply_overrides({"eval": dataclasses.asdict(base)}, overrides, Config)["eval"]
    cfg = build(EvalConfig, raw, "eval")
    cfg.validate()
    return cfg


def _section(cls: type, key: str, base: Any, overrides: list[str]) -> Any:
    """Section `key` of train's config (a dataclass `cls`) from `base` with its overrides, validated."""
    start = dataclasses.asdict(base) if dataclasses.is_dataclass(base) else dict(base or {})
    cfg = build(cls, apply_overrides({key: start}, overrides, Config)[key], key)
    cfg.validate()
    return cfg


def _teachers(base: dict[str, TeacherConfig], overrides: list[str]) -> dict[str, TeacherConfig]:
    raw = {"teachers": {role: dataclasses.asdict(t) for role, t in base.items()}}
    raw = apply_overrides(raw, overrides, Config)["teachers"]
    teachers = {role: build(TeacherConfig, value, f"teachers.{role}") for role, value in raw.items()}
    for role, teacher in teachers.items():
        teacher.validate(f"teachers.{role}")
    return teachers


@dataclass
class _Recorded:
    """What a model path says about itself: a run folder its whole config, a checkpoint of this tool
    its dataset and threat model, a foreign file or a RobustBench entry nothing (`source` None: resolved later,
    with the dataset's name)."""

    source: Optional[ModelSource]
    data: Optional[DataConfig] = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    threat: Optional[ThreatModel] = None
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    memory_format: torch.memory_format = TrainConfig().memory_format  # the training default
    threads: Optional[int] = None


def _recorded(target: str, which: str) -> _Recorded:
    if is_robustbench(target):
        return _Recorded(None)
    source = resolve_model_source(target, which)
    if source.kind == "run":
        cfg = load_config(source.run_dir / "config.yaml")
        meta = read_model_meta(source.checkpoint)  # what the weights were trained with wins over config.yaml
        if meta is not None and meta.threat is not None and meta.threat != cfg.threat:
            raise ConfigError(
                f"{source.run_dir / 'config.yaml'} says {cfg.threat.describe()} but {source.checkpoint.name} was "
                f"trained at {meta.threat.describe()}: config.yaml was edited; restore it (or evaluate at another "
                "budget with --eps and --norm, which the report records)"
            )
        train = cfg.train
        return _Recorded(source, cfg.data, cfg.eval, cfg.threat, cfg.teachers, train.memory_format, train.threads)
    meta = read_model_meta(source.checkpoint) if source.checkpoint.suffix == ".safetensors" else None
    data = build(DataConfig, meta.data, "data") if meta and meta.data is not None else None
    return _Recorded(source, data, threat=meta.threat if meta else None)


def evaluate(
    target: str | Path,
    overrides: Optional[list[str]] = None,
    *,
    which: str = "best",
    split: str = "test",
    data: Optional[str] = None,
    data_root: Optional[str] = None,
    model: Optional[str] = None,
    device: str = "auto",
    model_dir: Optional[str] = None,
    state_dir: Optional[Path] = None,
    progress: bool = True,
    dist: Optional[DistInfo] = None,
) -> dict[str, Any]:
    """Evaluate a run folder, a checkpoint file or a RobustBench entry; returns the report.json document.

    A run folder supplies its config (dataset, eps, eval settings); a checkpoint written by this
    tool carries dataset and eps in its metadata; a foreign checkpoint needs `data`, `model` (or
    `model.name`, with `model.kwargs.*` its options) and `eval.eps`. `overrides`: dotted
    `eval.<key>=<value>` (attacks, eps, subset, ...), `model.*`, `data.*`, `teachers.*`. Under DDP
    (`dist`, the process group joined) each rank attacks its blocks of samples and every rank
    returns the same document, equal to one process's.
    """
    with shown(progress):
        target, dist = str(target), dist or DistInfo()
        given = _sections(list(overrides or []))
        recorded = _recorded(target, which)
        data_cfg = recorded.data
        if data is not None and (data_cfg is None or data_cfg.name != data):
            data_cfg = DataConfig(name=data)
        if data_cfg is None and not _sets(given["data"], "data.name"):
            raise UserError(f"{target} does not say which dataset it belongs to; pass --data NAME (and --data-root)")
        if data_root is not None:
            given["data"].append(f"data.root={json.dumps(data_root)}")
        data_cfg = _section(DataConfig, "data", data_cfg, given["data"])
        eval_cfg = eval_config(recorded.eval, given["eval"])
        threat = recorded.threat or (zoo_threat(target, data_cfg.name) if is_robustbench(target) else None)
        settings = eval_cfg.resolve(threat)
        model_cfg = None
        if model is not None or given["model"]:
            if model is None and not _sets(given["model"], "model.name"):
                raise UserError("model.* overrides need the architecture's name: --model NAME or model.name=NAME")
            start = {"name": model} if model is not None else {}
            model_cfg = _section(ModelConfig, "model", start, given["model"])
        teachers = _teachers(recorded.teachers, given["teachers"])
        source = recorded.source or resolve_model_source(target, which, data_cfg.name, model_dir)
        dataset = load_dataset(data_cfg, resolve_device(device, dist, "device"), extra=False)
        spec = model_spec(model_cfg, dataset) if model_cfg is not None else None
        with intra_op_threads(recorded.threads):  # a run's own thread count, as its final report used
            return evaluate_source(
                source,
                dataset,
                split,
                eval_cfg,
                settings,
                spec=spec,
                memory_format=recorded.memory_format,
                teachers=teachers,
                state_dir=state_dir,
                dist=dist,
            )
