"""The training loop: one loop for every method.

    robustdistill train configs/digits/rslad.yaml train.epochs=5 seed=1          # CPU or one GPU
    torchrun --standalone --nproc_per_node=4 -m robustdistill train configs/cifar10/rslad_resnet18.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m robustdistill train configs/cifar10/rslad_resnet18.yaml                 # two nodes

Per batch: `loss, stats = method.loss(x, y)`, backward, SGD step, `method.on_step_end`. Per epoch:
`method.on_epoch_end`, a validation evaluation that picks the best checkpoint by the method's
selection metric, and atomic checkpoints (`last`, `best`, and the full state for `--resume`).
The learning rate is a pure function of the epoch (multi-step), so resuming needs no scheduler.
Under DDP the global batch is split over the ranks and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..attacks import EvalSettings
from ..core.distributed import (
    DistInfo,
    any_rank,
    barrier,
    broadcast_buffers,
    check_ranks_agree,
    init_distributed,
    resolve_device,
    restore_rng,
    rng_states,
)
from ..core.errors import ConfigError, TrainingError
from ..core.timing import FlopCount, duration, intra_op_threads, time_left
from ..data import Augment, BatchLoader, Dataset, Split, load_dataset, subset_of
from ..evaluation.checks import failed
from ..evaluation.metrics import needed_attacks, selection_score
from ..evaluation.pipeline import evaluate_source
from ..evaluation.report import write_report
from ..evaluation.suite import evaluate
from ..methods import Context, FrozenTeacher, Method, Progress, create_method, update_average
from ..models import Classifier, ModelSpec, create_model, eval_mode, fingerprint
from ..models.checkpoint import ModelMeta, save_model
from ..models.sources import ModelSource, load_teacher, model_spec
from ..storage.files import FolderLock, atomic_write, load_torch, save_torch
from ..storage.runs import CHECKPOINTS, MetricsLog, create_run_dir, foreign_entries, keep_previous_report
from .config import RESUMABLE, Config, config_changes, from_dict
from .preflight import initialise, preflight, record_changes

log = logging.getLogger("robustdistill")


def lr_decays(epoch: int, milestones: list[int]) -> int:
    """How many milestones the (0-based) epoch has reached: lr = base * gamma ** lr_decays."""
    return sum(epoch >= m for m in milestones)


def _autocast(cfg: Config, device: torch.device):
    """bf16 autocast around the method's loss (attacks, teachers, training passes); the weights,
    the optimizer and the backward's accumulation stay fp32."""
    if cfg.train.amp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compiled(model: nn.Module, cfg: Config) -> nn.Module:
    if not cfg.train.compile:
        return model
    return torch.compile(model, mode=cfg.train.compile_mode, backend=cfg.train.compile_backend)


@dataclass
class Run:
    """Everything one training run holds between its steps."""

    cfg: Config
    dist: DistInfo
    device: torch.device
    dataset: Dataset
    teachers: dict[str, nn.Module]
    spec: ModelSpec
    student: Classifier  # the bare model: attacks, checkpoints
    method: Method
    optimizer: torch.optim.Optimizer
    loader: BatchLoader
    progress: Progress
    metrics: MetricsLog
    select_split: Split
    select_metric: str
    settings: EvalSettings  # the final evaluation's; selection runs a subset of its attacks, no checks
    start_epoch: int = 0  # the first epoch this process trains (0-based; a resumed run's next one)
    epochs_done: int = 0  # epochs trained so far, by this process or before the resume
    best_score: float = -math.inf
    best_epoch: Optional[int] = None
    flops_per_step: Optional[int] = None  # counted on the run's first step (attack, teachers, backward)
    average: Optional[Classifier] = None  # the method's weight average of the student, once it has started
    lock: Optional[FolderLock] = None  # rank 0's hold on the run folder, until `release`
    teacher_prints: dict[str, str] = field(default_factory=dict)  # each teacher's weights' SHA-256

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def release(self) -> None:
        """Let another process write the run folder (the end of `train`)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def model_meta(self, epoch: int) -> ModelMeta:
        """What a model file of the run records (`robustdistill eval FILE` reads dataset and eps from it)."""
        cfg = self.cfg
        return ModelMeta(self.spec, epoch, cfg.to_dict()["data"], cfg.default_eps, cfg.method.name, str(self.run_dir))

    def state_dict(self) -> dict[str, Any]:
        """The whole training state after `epochs_done` epochs, for `--resume` (collective under DDP:
        it gathers every rank's random streams)."""
        return {
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "average": None if self.average is None else self.average.state_dict(),
            "epoch": self.epochs_done - 1,  # the last trained epoch, 0-based
            "step": self.progress.step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            # what the state belongs to, checked on --resume (`check_state_belongs`)
            "config": self.cfg.to_dict(),
            "teachers": self.teacher_prints,
            **rng_states(self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the next epoch to train is the one after the saved one."""
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        if state.get("average") is not None:  # files of versions before weight averaging lack it
            self.average = copy.deepcopy(self.student)
            self.average.load_state_dict(state["average"])
        self.start_epoch = self.epochs_done = state["epoch"] + 1
        self.progress.step, self.best_score, self.best_epoch = state["step"], state["best_score"], state["best_epoch"]
        restore_rng(state, self.dist, self.device)


def train(cfg: Config, *, force: bool = False, resume: bool = False) -> Path:
    """Train `cfg` into `cfg.run_dir` (`out_dir/name`) and write its report; returns the run folder."""
    with intra_op_threads(cfg.train.threads):
        run = setup(cfg, force, resume)
        try:
            fit(run)
            finish(run)
        except BaseException:
            if not resume and run.dist.is_main and _remove_if_nothing_saved(run.run_dir) and run.lock is not None:
                run.lock.discard()
            raise
        finally:
            run.release()
    return run.run_dir


def _remove_if_nothing_saved(run_dir: Path) -> bool:
    """A run that failed before its first checkpoint leaves no folder behind: it held only what this
    call wrote (config, metrics, marker), nothing to resume from. Returns whether it was removed."""
    if run_dir.is_dir() and not (run_dir / CHECKPOINTS / "train_state.pt").exists() and not foreign_entries(run_dir):
        shutil.rmtree(run_dir)
        log.debug("removed %s: the run failed before its first checkpoint", run_dir)
        return True
    return False


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


# keys a run folder may change without changing what its checkpoint is: its place and its inputs' paths
_MOVABLE = ("name", "out_dir", "data.root", "data.cache_dir")


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
            if k not in RESUMABLE and not k.startswith(_MOVABLE) and not k.endswith(".path")
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


def fit(run: Run) -> None:
    """The epochs still to train: each one's steps, its validation and selection, its checkpoints."""
    cfg, started = run.cfg, time.perf_counter()
    for epoch in range(run.start_epoch, cfg.train.epochs):
        record = train_epoch(run, epoch)
        if validates_after(cfg, epoch):
            validate_and_select(run, epoch, record)
        done, remaining = epoch + 1 - run.start_epoch, cfg.train.epochs - epoch - 1
        save(run, record, left=time_left(time.perf_counter() - started, done, remaining))


def finish(run: Run) -> dict[str, Any]:
    """The final report: the best checkpoint on the test split, with the sanity checks."""
    selection = {
        "metric": run.select_metric,
        "split": run.cfg.train.select_on,
        "best_epoch": run.best_epoch,
        "best_score": run.best_score,
    }
    report = final_report(run.cfg, run.dataset, run.dist, run.settings, teachers=run.teachers, selection=selection)
    barrier()  # no rank returns before rank 0 has written the report
    return report


def validates_after(cfg: Config, epoch: int) -> bool:
    """Whether the loop validates (and selects) after `epoch` (0-based): every `train.eval_every`
    epochs, and after the last."""
    return (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs


def setup(cfg: Config, force: bool, resume: bool, write: bool = True) -> Run:
    """Check everything that can fail on the user's input, then build data, teachers, student,
    method and optimizer, restore a resumed run's state, and only then create the run folder.
    `write=False` (`estimate`): a new run's folder is neither checked nor created, nothing is written."""
    run_dir = cfg.run_dir
    dist_info = init_distributed(cfg.train.device)
    changes = preflight(cfg, force, resume, check_folder=write or resume)
    barrier()  # every rank has checked the folder before rank 0 may create it
    device = resolve_device(cfg.train.device, dist_info)
    torch.manual_seed(cfg.seed * 1000 + dist_info.rank)

    dataset = load_dataset(cfg.data, device)
    memory_format = cfg.train.memory_format
    teachers = {
        role: load_teacher(role, t, dataset, device).to(memory_format=memory_format) for role, t in cfg.teachers.items()
    }
    spec = model_spec(cfg.model, dataset)
    student = create_model(spec)
    _check_accepts(student, dataset, cfg)
    if cfg.train.init_from is not None and not resume:
        initialise(student, cfg, dataset, spec)
    student = student.to(device).to(memory_format=memory_format)
    forward: nn.Module = student
    if dist_info.world_size > 1:
        forward = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    # compiled (train.compile): the training passes, the attacks' model and the teachers; checkpoints,
    # validation and the final evaluation keep the bare student
    forward = _compiled(forward, cfg)
    attacked = _compiled(student, cfg) if dist_info.world_size > 1 else forward  # never through DDP
    context = Context(
        forward,
        attacked,
        dataset.num_classes,
        cfg.attack,
        {role: FrozenTeacher(_compiled(t, cfg)) for role, t in teachers.items()},
    )
    method = create_method(cfg.method, context)
    optimizer = torch.optim.SGD(
        student.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    loader = BatchLoader(
        dataset.train,
        cfg.train.batch_size,
        shuffle=True,
        augment=Augment(cfg.data.crop_padding, cfg.data.flip),
        seed=cfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    if len(loader) == 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training split ({len(dataset.train)} images)"
        )
    select_split = subset_of(
        dataset.split(cfg.train.select_on),
        cfg.train.eval_subset,
        f"the {cfg.train.select_on} split",
        "train.eval_subset",
    )
    subset_of(dataset.test, cfg.eval.subset, "the test split", "eval.subset")  # the final report's, checked now
    run = Run(
        cfg,
        dist_info,
        device,
        dataset,
        teachers,
        spec,
        student,
        method,
        optimizer,
        loader,
        Progress(),
        MetricsLog(run_dir / "metrics.jsonl" if dist_info.is_main and write else None),
        select_split,
        cfg.train.select_metric or method.selection_metric,
        cfg.eval.resolve(cfg.default_eps),
    )
    run.teacher_prints = {role: fingerprint(t) for role, t in teachers.items()}
    if resume:
        state = load_torch(run_dir / CHECKPOINTS / "train_state.pt")
        check_state_belongs(state, cfg, run.teacher_prints, run_dir)
        run.load_state_dict(state)
        log.info("resuming %s after epoch %d", run_dir, run.start_epoch)
    # Everything that can fail on the user's input has run: only now is the run folder written, by
    # one process at a time (rank 0 holds its lock for the group until the run ends: a second
    # `train`, `--resume` or `--force` of the folder meanwhile is refused in one line)
    if dist_info.is_main and write:
        run.lock = FolderLock(run_dir, "training").acquire()
        try:
            create_run_dir(run_dir, force, resume)
            if not resume:
                atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
            else:
                run.metrics.trim(run.progress.step)  # records written after the checkpoint are written again
                if changes:
                    record_changes(run_dir, cfg, changes, run.start_epoch)
        except BaseException:
            run.release()
            raise
    barrier()
    return run


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the training split; returns the epoch's metrics record."""
    cfg, progress, method = run.cfg, run.progress, run.method
    lr = start_epoch(run, epoch)
    tally = Tally(run.device)
    started = time.perf_counter()
    bar = tqdm(
        run.loader,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        leave=False,
        disable=None if run.dist.is_main else True,
    )
    for x, y in bar:
        counter = FlopCount() if run.flops_per_step is None else contextlib.nullcontext()
        with counter:
            loss, stats = train_batch(run, x, y, tally)
        if run.flops_per_step is None:
            run.flops_per_step = counter.total
        if progress.step % cfg.train.log_every == 0:
            _stop_if_non_finite(run, tally.first_bad, epoch)
            run.metrics.write(
                type="step", epoch=epoch + 1, step=progress.step, lr=lr, loss=loss, **stats, **method.log_state()
            )
    _stop_if_non_finite(run, tally.first_bad, epoch)  # before anything of this epoch is saved
    broadcast_buffers(run.student)
    method.on_epoch_end(progress)
    check_ranks_agree(method.log_state(), f"the {cfg.method.name} state after epoch {epoch + 1}")
    run.epochs_done = epoch + 1
    seconds = time.perf_counter() - started
    steps, world = len(run.loader), run.dist.world_size
    return {
        "type": "epoch",
        "epoch": epoch + 1,
        "step": progress.step,
        "lr": lr,
        "loss": (tally.loss_sum / steps).item(),
        "seconds": seconds,
        "images_per_s": steps * run.loader.local_batch * world / seconds,
        # every FLOP of a step (inner maximisation, teachers, student forward and backward), all ranks
        "gflop_per_s": run.flops_per_step * steps * world / seconds / 1e9,
        **method.log_state(),
    }


def start_epoch(run: Run, epoch: int) -> float:
    """The method's progress, the learning rate and the loader set for `epoch`; returns the lr."""
    cfg, progress = run.cfg, run.progress
    progress.epoch = epoch
    progress.lr_decays = lr_decays(epoch, cfg.train.milestones)
    progress.next_lr_decays = lr_decays(epoch + 1, cfg.train.milestones)
    lr = cfg.train.lr * cfg.train.lr_gamma**progress.lr_decays
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.loader.set_epoch(epoch)
    run.method.on_epoch_start(progress)
    run.student.train()
    return lr


class Tally:
    """What an epoch accumulates on the device, read back only at log steps and at its end: the
    loss sum and the step of the first non-finite loss (-1: none)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)


def train_batch(run: Run, x: torch.Tensor, y: torch.Tensor, tally: Tally) -> tuple[torch.Tensor, dict[str, Any]]:
    """One batch of the loop, without host-device synchronisation: the step and the tally."""
    loss, stats = _step(run, x.contiguous(memory_format=run.cfg.train.memory_format), y)
    tally.first_bad = torch.where((tally.first_bad < 0) & ~torch.isfinite(loss), run.progress.step, tally.first_bad)
    tally.loss_sum += loss
    return loss, stats


def _stop_if_non_finite(run: Run, first_bad: torch.Tensor, epoch: int) -> None:
    """Raise on every rank (none waits forever) if any rank has seen a non-finite loss; nothing of
    the epoch has been saved yet, so the last checkpoint on disk is the last good one."""
    step = int(first_bad.item())
    if any_rank(step >= 0, run.device):
        where = f"step {step}" if step >= 0 else "a step on another rank"
        saved = (run.run_dir / CHECKPOINTS / "train_state.pt").is_file()
        kept = f"the last good checkpoint is in {run.run_dir / CHECKPOINTS}" if saved else "no checkpoint was written"
        raise TrainingError(f"non-finite loss at epoch {epoch + 1}, {where}; {kept} (try a lower train.lr)")


def _step(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimisation step of the method's loss, with no host-device synchronisation (the loop
    checks the returned loss for non-finite values every log_every steps)."""
    with _autocast(run.cfg, run.device):
        loss, stats = run.method.loss(x, y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.progress.step += 1
    run.method.on_step_end(run.progress)
    return loss.detach(), stats


def validate_and_select(run: Run, epoch: int, record: dict[str, Any]) -> None:
    """Evaluate on the selection split; a better score makes this epoch's model the best checkpoint.
    A weight-averaging method updates its average from the student's validation, and the average
    (the student until the average has started) is then validated and selected instead."""
    cfg, method = run.cfg, run.method
    summary = validate(run, run.student)
    method.on_validation(summary, run.progress)
    where = cfg.train.select_on
    _record_validation(record, summary, where)
    candidate = run.student
    if method.averages_weights(method.options):
        decay = method.average_decay(summary, run.progress)
        if decay is not None:
            if run.average is None:
                run.average = copy.deepcopy(run.student).eval()
            else:
                update_average(run.average, run.student, decay)
        record["average_updated"] = decay is not None
        if run.average is not None:
            candidate, summary = run.average, validate(run, run.average)
            _record_validation(record, summary, f"{where}_average")
    score = selection_score(summary, run.select_metric)
    record[f"{where}_{run.select_metric}"] = score
    if score > run.best_score:
        run.best_score, run.best_epoch = score, epoch + 1
        if run.dist.is_main:
            save_model(run.run_dir / CHECKPOINTS / "best.safetensors", candidate, run.model_meta(epoch + 1))


def validate(run: Run, model: nn.Module) -> dict[str, Any]:
    """One validation of `model`: the attacks the selection metric and the method need, no checks."""
    attacks = tuple(dict.fromkeys(needed_attacks(run.select_metric) + run.method.validation_attacks))
    settings = replace(run.settings, attacks=attacks, checks=False)
    return evaluate(model, run.select_split, settings, run.dataset.num_classes, run.dist.rank, run.dist.world_size)


def _record_validation(record: dict[str, Any], summary: dict[str, Any], prefix: str) -> None:
    for name, result in summary["attacks"].items():
        record[f"{prefix}_{name}_acc"] = result["accuracy"]
        record[f"{prefix}_{name}_worst_class_acc"] = result["worst_class_accuracy"]


def save(run: Run, record: dict[str, Any], left: float = float("nan")) -> None:
    """After `run.epochs_done` epochs: the epoch's record, the last model and the full state for
    `--resume`, all written atomically; the log line ends with the time the run's other epochs are
    estimated to take (`left`)."""
    state = run.state_dict()  # collective: every rank's random streams
    if run.dist.is_main:
        epoch, folder = run.epochs_done, run.run_dir / CHECKPOINTS
        run.metrics.write(**record)
        save_model(folder / "last.safetensors", run.student, run.model_meta(epoch))
        if run.average is not None:
            save_model(folder / "average.safetensors", run.average, run.model_meta(epoch))
        save_torch(state, folder / "train_state.pt")
        metric = f"{run.cfg.train.select_on}_{run.select_metric}"
        to_go = f", about {duration(left)} to go before the final evaluation" if math.isfinite(left) and left else ""
        log.info(
            "epoch %d/%d  loss %.4f  %s %.4f  (%.1fs%s)",
            epoch,
            run.cfg.train.epochs,
            record["loss"],
            run.select_metric,
            record.get(metric, float("nan")),
            record["seconds"],
            to_go,
        )
    barrier()


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
