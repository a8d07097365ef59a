"""The parts of a training run, one builder each, every one usable alone:

    models = build_models(cfg, dataset, dist, device)        # student (bare, DDP, compiled), teachers
    method = build_method(cfg, models, dataset.num_classes)
    optimiser = Optimiser.build(cfg.train, models.student)    # SGD and its lr schedule
    loader = build_loader(cfg, dataset, dist)
    selection = build_selection(cfg, dataset, method)          # what picks the best checkpoint

`loop.setup` calls them in this order (the order the global random stream is drawn in: teachers,
then the student's initial weights, then the method), after the preflight and before anything is
written; `restore` continues a run from its train_state.pt.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..attacks import EvalSettings
from ..core.distributed import DistInfo
from ..core.errors import CheckpointError, ConfigError
from ..data import Augment, BatchLoader, Dataset, Split, StreamingLoader, subset_of
from ..methods import METHODS, Context, FrozenTeacher, Method, create_method, label_free_methods
from ..models import Classifier, ModelSpec, create_model, eval_mode, fingerprint
from ..models.sources import load_teacher, model_spec
from ..storage.files import load_torch
from ..storage.runs import CHECKPOINTS
from .config import Config, TrainConfig, config_changes, from_dict, resumable
from .preflight import initialise

log = logging.getLogger("robustdistill")


@dataclass
class Models:
    """The run's networks: `student` is the bare model (attacks, checkpoints, evaluation);
    `forward` what the training passes call (DDP-wrapped under DDP, compiled with train.compile);
    `attacked` the student the inner maximisation runs on (compiled, never through DDP);
    `teachers` the frozen teachers by role, and `fingerprints` their weights' SHA-256 (a resume
    checks them)."""

    spec: ModelSpec
    student: Classifier
    forward: nn.Module
    attacked: nn.Module
    teachers: dict[str, nn.Module] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)


def _compiled(model: nn.Module, cfg: Config) -> nn.Module:
    if not cfg.train.compile:
        return model
    return torch.compile(model, mode=cfg.train.compile_mode, backend=cfg.train.compile_backend)


def build_models(cfg: Config, dataset: Dataset, dist: DistInfo, device: torch.device, initialise_student=True):
    """Teachers (loaded, checked, frozen), then the student (created, checked against the data,
    started from `train.init_from` when `initialise_student`), on `device` in the run's memory format."""
    memory_format = cfg.train.memory_format
    teachers = {
        role: load_teacher(role, t, dataset, device).to(memory_format=memory_format) for role, t in cfg.teachers.items()
    }
    spec = model_spec(cfg.model, dataset)
    student = create_model(spec)
    _check_accepts(student, dataset, cfg)
    if cfg.train.init_from is not None and initialise_student:
        initialise(student, cfg, dataset, spec)
    student = student.to(device).to(memory_format=memory_format)
    forward: nn.Module = student
    if dist.world_size > 1:
        forward = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    # compiled (train.compile): the training passes, the attacks' model and the teachers; checkpoints,
    # validation and the final evaluation keep the bare student
    forward = _compiled(forward, cfg)
    attacked = _compiled(student, cfg) if dist.world_size > 1 else forward  # never through DDP
    prints = {role: fingerprint(t) for role, t in teachers.items()}
    return Models(spec, student, forward, attacked, teachers, prints)


def _check_accepts(student: nn.Module, dataset: Dataset, cfg: Config) -> None:
    """The student takes the dataset's images (an image_size too small for its pooling fails here, in
    one line, not at the first step)."""
    x = dataset.train.images(torch.arange(1, device=dataset.train.y.device)).cpu()
    try:
        with torch.no_grad(), eval_mode(student):
            student(x)
    except RuntimeError as exc:
        raise ConfigError(
            f"model {cfg.model.name} does not accept {dataset.name} images of shape {tuple(x.shape[1:])} "
            f"(data.image_size={cfg.data.image_size}): {str(exc).splitlines()[0]}"
        ) from None


def build_method(cfg: Config, models: Models, num_classes: int) -> Method:
    """The method, on the student's training and attacked views and the (compiled) frozen teachers."""
    teachers = {role: FrozenTeacher(_compiled(t, cfg)) for role, t in models.teachers.items()}
    context = Context(models.forward, models.attacked, num_classes, cfg.attack, teachers)
    return create_method(cfg.method, context)


@dataclass
class Optimiser:
    """SGD with momentum and its learning-rate schedule, a pure function of the epoch (a resumed run
    needs no scheduler state): `step`, lr = base * gamma ** (milestones reached); `cosine_exp`
    (CIARD's), lr = base until `decay_from`, then base * cosine_exp_factor."""

    optimizer: torch.optim.Optimizer
    train: TrainConfig

    @classmethod
    def build(cls, train: TrainConfig, student: nn.Module) -> Optimiser:
        sgd = torch.optim.SGD(
            student.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
        return cls(sgd, train)

    def decays(self, epoch: int) -> int:
        """How many milestones the (0-based) epoch has reached."""
        return lr_decays(epoch, self.train.milestones)

    def set_epoch(self, epoch: int) -> float:
        """The learning rate of `epoch`, set in every parameter group; returns it."""
        t = self.train
        if t.schedule == "cosine_exp":
            lr = t.lr * cosine_exp_factor(epoch, t.decay_from, t.epochs)
        else:
            lr = t.lr * t.lr_gamma ** self.decays(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def cosine_exp_factor(epoch: int, start: int, epochs: int) -> float:
    """CIARD's smooth decay: 1 before the (0-based) epoch `start`, then, with t = (epoch - start) /
    (epochs - 1 - start) going from 0 to 1 at the last epoch, (1/2 + 1/2 cos(pi t)) exp(-0.01 t^2):
    the official script's lr at its 1-based epoch e, t = (e - 150) / (300 - 150), for start 149 of 300."""
    if epoch < start:
        return 1.0
    t = (epoch - start) / (epochs - 1 - start)
    return (0.5 + 0.5 * math.cos(math.pi * t)) * math.exp(-0.01 * t**2)


def lr_decays(epoch: int, milestones: list[int]) -> int:
    """How many milestones the (0-based) epoch has reached: lr = base * gamma ** lr_decays."""
    return sum(epoch >= m for m in milestones)


def build_loader(cfg: Config, dataset: Dataset, dist: DistInfo) -> BatchLoader:
    """The training batches: shuffled by (seed, epoch), augmented on the device, this rank's shard;
    read from the host by a background thread when the dataset is streamed."""
    kind, where = (StreamingLoader, {"device": dataset.test.y.device}) if dataset.streamed else (BatchLoader, {})
    loader = kind(
        dataset.train,
        cfg.train.batch_size,
        shuffle=True,
        augment=Augment(cfg.data.crop_padding, cfg.data.flip),
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        extra=dataset.extra,
        fraction=dataset.extra_fraction,
        **where,
    )
    if dataset.extra is not None:
        if dataset.extra_info.get("labels") is False and METHODS.get(cfg.method.name).uses_labels(cfg.method):
            raise ConfigError(
                f"method {cfg.method.name} uses the training labels, and data.extra ({cfg.data.extra.source.root}) "
                f"has none: give the file its labels, or train a method that learns from its teachers alone "
                f"({', '.join(label_free_methods())})"
            )
        added = round(dataset.extra_fraction * cfg.train.batch_size)
        if not 0 < added < cfg.train.batch_size or added % dist.world_size or cfg.train.batch_size % dist.world_size:
            raise ConfigError(
                f"data.extra.fraction={dataset.extra_fraction} of train.batch_size={cfg.train.batch_size} is {added} "
                f"extra images a batch: it must leave both kinds in every batch, split evenly over the "
                f"{dist.world_size} process(es)"
            )
    if len(loader) == 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training split ({len(dataset.train)} images)"
        )
    return loader


@dataclass
class Selection:
    """What picks the best checkpoint: the split and metric of the validation after each epoch, and
    the final evaluation's settings (the validation runs a subset of their attacks, no checks)."""

    split: Split
    metric: str
    settings: EvalSettings


def build_selection(cfg: Config, dataset: Dataset, method: Method) -> Selection:
    split = subset_of(
        dataset.split(cfg.train.select_on),
        cfg.train.eval_subset,
        f"the {cfg.train.select_on} split",
        "train.eval_subset",
    )
    subset_of(dataset.test, cfg.eval.subset, "the test split", "eval.subset")  # the final report's, checked now
    return Selection(split, cfg.train.select_metric or method.selection_metric, cfg.eval.resolve(cfg.threat))


# what a train_state.pt holds (`loop.Run.state_dict`); "average" came later and may be absent
STATE_KEYS = ("model", "optimizer", "method", "epoch", "step", "best_score", "best_epoch", "rng")
# keys a run folder may change without changing what its checkpoint is: its place and its inputs' paths
_MOVABLE = ("name", "out_dir", "data.root", "data.cache_dir")


def read_state(run_dir: Path, cfg: Config, fingerprints: dict[str, str]) -> dict[str, Any]:
    """A run's train_state.pt, checked to be a whole training state of this run (`check_state_belongs`)
    and not behind the epochs the config asks for; one line naming the file otherwise."""
    where = run_dir / CHECKPOINTS / "train_state.pt"
    state = load_torch(where)
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state["model"], dict) or not isinstance(state["epoch"], int):
        lacks = f"it lacks {', '.join(missing)}" if missing else "its model or epoch is not what this tool writes"
        raise CheckpointError(
            f"{where} is not a training state of this tool ({lacks}); restore the file, or start a new run"
        )
    check_state_belongs(state, cfg, fingerprints, run_dir)
    trained = state["epoch"] + 1
    if cfg.train.epochs < trained:
        raise ConfigError(
            f"train.epochs={cfg.train.epochs} but {run_dir} has already trained {trained} epochs: its weights "
            f"cannot go back; resume with train.epochs >= {trained}"
        )
    return state


def check_state_belongs(state: dict[str, Any], cfg: Config, prints: dict[str, str], run_dir: Path) -> None:
    """Refuse to resume from a train_state.pt that is not this run's: trained with another config
    than the folder's config.yaml (beyond what a resume may change, the folder's place and paths),
    or with other teachers' weights than the files the config names now. (States written before
    these were recorded are taken as they are.)"""
    where = run_dir / CHECKPOINTS / "train_state.pt"
    if "config" in state:
        recorded = from_dict(state["config"])
        changes = {
            k: v
            for k, v in config_changes(recorded, cfg).items()
            if not resumable(k) and not k.startswith(_MOVABLE) and not k.endswith(".path")
        }
        if changes:
            keys = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:3])
            raise ConfigError(
                f"{where} was not trained with this config ({keys}): config.yaml was edited, or the checkpoint "
                "comes from another run; restore the one that belongs, or start a new run"
            )
    for role, recorded in state.get("teachers", {}).items():
        if role in prints and prints[role] != recorded:
            raise ConfigError(
                f"teacher '{role}' ({cfg.teachers[role].path}) is not the one {run_dir} was trained with: "
                "its weights changed since; restore that file, or start a new run"
            )
