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
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from tqdm.auto import tqdm

from .attacks import EvalSettings, needs_surrogate
from .checkpoint import load_model, load_torch, save_model, save_torch
from .checks import failed
from .config import RESUMABLE, Config, config_changes, load_config
from .data import Augment, BatchLoader, Dataset, Split, load_dataset, subset_of
from .distributed import (
    DistInfo,
    any_rank,
    barrier,
    broadcast_buffers,
    check_ranks_agree,
    gather_objects,
    init_distributed,
    resolve_device,
)
from .errors import CheckpointError, ConfigError, TrainingError, UserError
from .evaluate import evaluate
from .files import atomic_write
from .methods import METHODS, Context, Method, Progress, create_method
from .metrics import needed_attacks, selection_score
from .models import Classifier, ModelSpec, create_model
from .report import build_report, now, write_report
from .runs import CHECKPOINTS, MetricsLog, check_run_dir, create_run_dir
from .teachers import (
    FrozenTeacher,
    load_source,
    load_surrogate,
    load_teacher,
    model_spec,
    resolve_model_source,
    resolve_teacher,
)

log = logging.getLogger("robustdistill")


def lr_decays(epoch: int, milestones: list[int]) -> int:
    """How many milestones the (0-based) epoch has reached: lr = base * gamma ** lr_decays."""
    return sum(epoch >= m for m in milestones)


def _preflight(
    cfg: Config, run_dir: Path, force: bool, resume: bool, check_folder: bool = True
) -> dict[str, tuple[Any, Any]]:
    """Every check that can fail on user input, before anything is read or written; returns the
    config keys a resume changes (only those of RESUMABLE are accepted)."""
    method_cls = METHODS.get(cfg.method.name)
    for role in method_cls.teachers:
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
    if cfg.train.select_on == "val" and cfg.data.val_fraction <= 0:
        raise ConfigError("train.select_on=val needs data.val_fraction > 0 (a validation split)")
    if check_folder:
        check_run_dir(run_dir, force, resume)
    if not resume:
        return {}
    changes = config_changes(load_config(run_dir / "config.yaml"), cfg)
    refused = [k for k in changes if k not in RESUMABLE]
    if refused:
        shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused[:4])
        raise ConfigError(
            f"--resume refuses to change what {run_dir} was trained with ({shown}); only "
            f"{', '.join(RESUMABLE)} may change; start a new run (name=...) instead"
        )
    return changes


def _init_source(cfg: Config):
    try:
        return resolve_model_source(cfg.train.init_from, "best", cfg.data.name)
    except CheckpointError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None


def _initialise(student: Classifier, cfg: Config, dataset: Dataset, spec: ModelSpec) -> None:
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


def _record_changes(run_dir: Path, cfg: Config, changes: dict[str, tuple[Any, Any]], epoch: int) -> None:
    """A resume with changed keys rewrites config.yaml and appends the change to config_history.jsonl."""
    entry = {"time": now(), "resumed_after_epoch": epoch, "changes": {k: list(v) for k, v in changes.items()}}
    with open(run_dir / "config_history.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg.to_yaml()))


def _rng_states(device: torch.device) -> dict[str, list]:
    """Every rank's random state (collective: all ranks call it), so a DDP resume continues each stream."""
    states = {"rng": gather_objects(torch.get_rng_state())}
    if device.type == "cuda":
        states["cuda_rng"] = gather_objects(torch.cuda.get_rng_state(device))
    return states


def _restore_rng(state: dict[str, Any], dist_info: DistInfo, device: torch.device) -> None:
    saved = len(state["rng"])
    if saved != dist_info.world_size:
        log.warning(
            "resuming on %d process(es) a run trained on %d: random streams differ from an uninterrupted run",
            dist_info.world_size,
            saved,
        )
    torch.set_rng_state(state["rng"][dist_info.rank % saved])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"][dist_info.rank % len(state["cuda_rng"])], device)


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


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of the operators torch knows a formula for (matmul, convolution, attention:
    the operators that matter), forward and backward, including `torch.autograd.grad` inside the
    inner maximisation (torch's FlopCounterMode cannot: its module hooks break autograd.grad)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None:
            # under inference mode composite operators (conv2d, linear) arrive undecomposed: count
            # what they decompose into (convolution, addmm), as without it
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


@dataclass
class Run:
    """Everything one training run holds between its steps."""

    cfg: Config
    run_dir: Path
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
    start_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: Optional[int] = None
    memory_format: torch.memory_format = torch.contiguous_format
    flops_per_step: Optional[int] = None  # counted on the run's first step (attack, teachers, backward)
    average: Optional[Classifier] = None  # the method's weight average of the student, once it has started

    @property
    def meta(self) -> dict[str, Any]:
        """What a model file records beside its architecture (eval reads dataset and eps from it)."""
        return {
            "data": self.cfg.to_dict()["data"],
            "eps": self.cfg.attack.eps,
            "method": self.cfg.method.name,
            "run": str(self.run_dir),
        }


def train(cfg: Config, *, force: bool = False, resume: bool = False) -> Path:
    """Train `cfg` into `cfg.out_dir/cfg.name`; returns the run folder."""
    run = setup(cfg, force, resume)
    started = time.perf_counter()
    for epoch in range(run.start_epoch, cfg.train.epochs):
        record = train_epoch(run, epoch)
        if _validates_after(cfg, epoch):
            validate_and_select(run, epoch, record)
        done, remaining = epoch + 1 - run.start_epoch, cfg.train.epochs - epoch - 1
        save(run, epoch, record, left=time_left(time.perf_counter() - started, done, remaining))
    final_report(
        cfg,
        run.run_dir,
        run.dataset,
        run.dist,
        run.settings,
        teachers=run.teachers,
        selection={
            "metric": run.select_metric,
            "split": cfg.train.select_on,
            "best_epoch": run.best_epoch,
            "best_score": run.best_score,
        },
    )
    barrier()  # no rank returns before rank 0 has written the report
    return run.run_dir


@dataclass
class Estimate:
    """What `estimate` measured (seconds) and the training time it extrapolates to."""

    step: float  # median wall time of one training step, its batch's loading included
    steps_per_epoch: int
    validation: float  # one validation (twice over for weight-averaging methods: student and average)
    epochs: int  # epochs still to train
    validations: int  # validations among them (train.eval_every, and the last epoch)
    final_attacks: tuple[str, ...]  # the final report's attacks, not timed
    device: str  # where it was measured (with the thread count on CPU)
    folder_note: str = ""  # why `train` would refuse the run folder as configured ("" if it would not)

    @property
    def epoch(self) -> float:
        return self.steps_per_epoch * self.step

    @property
    def total(self) -> float:
        """The training epochs and their validations; neither compilation nor the final evaluation."""
        return self.epochs * self.epoch + self.validations * self.validation


def estimate(cfg: Config, *, force: bool = False, resume: bool = False, steps: int = 10, warmup: int = 2) -> Estimate:
    """How long `train(cfg)` will take: `warmup` training steps, then `steps` timed one by one
    (median; each waits for the device, so a pipelined loop is if anything faster), and one timed
    validation, on the run as `train` builds it (config, data, teachers and a resumed state checked
    as for training). The steps change only the student in memory; nothing is written."""
    note = ""
    if not resume:
        try:
            check_run_dir(run_dir_of(cfg), force=force, resume=False)
        except UserError as error:
            note = str(error)
    run = setup(cfg, force=force, resume=resume, write=False)
    _start_epoch(run, run.start_epoch)
    tally, times = Tally(run.device), []
    batches = iter(run.loader)
    log.info("estimate: %d training steps (%d of them warm-up)", warmup + steps, warmup)
    for i in range(warmup + steps):
        _synchronize(run.device)
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # an epoch shorter than the timed steps: the next one
            batches = iter(run.loader)
            batch = next(batches)
        train_batch(run, *batch, tally)
        _synchronize(run.device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    log.info("estimate: one validation (%d images of the %s split)", len(run.select_split), cfg.train.select_on)
    started = time.perf_counter()
    _validate(run, run.student)
    validation = (time.perf_counter() - started) * (2 if run.method.averages_weights(run.method.options) else 1)
    epochs = range(run.start_epoch, cfg.train.epochs)
    return Estimate(
        step=statistics.median(times),
        steps_per_epoch=len(run.loader),
        validation=validation,
        epochs=len(epochs),
        validations=sum(_validates_after(cfg, e) for e in epochs),
        final_attacks=tuple(run.settings.attacks),
        device=str(run.device) + (f", {torch.get_num_threads()} threads" if run.device.type == "cpu" else ""),
        folder_note=note,
    )


def run_dir_of(cfg: Config) -> Path:
    """The folder `train(cfg)` writes: `out_dir/name`."""
    return Path(cfg.out_dir) / (cfg.name or "run")


def _validates_after(cfg: Config, epoch: int) -> bool:
    """Whether the loop validates (and selects) after `epoch` (0-based): every `train.eval_every`
    epochs, and after the last."""
    return (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(cfg: Config, force: bool, resume: bool, write: bool = True) -> Run:
    """Check everything that can fail on the user's input, then build data, teachers, student,
    method and optimizer, restore a resumed run's state, and only then create the run folder.
    `write=False` (`estimate`): a new run's folder is neither checked nor created, nothing is written."""
    run_dir = run_dir_of(cfg)
    dist_info = init_distributed(cfg.train.device)
    changes = _preflight(cfg, run_dir, force, resume, check_folder=write or resume)
    barrier()  # every rank has checked the folder before rank 0 may create it
    device = resolve_device(cfg.train.device, dist_info)
    torch.manual_seed(cfg.seed * 1000 + dist_info.rank)

    dataset = load_dataset(cfg.data, device)
    memory_format = memory_format_of(cfg)
    teachers = {
        role: load_teacher(role, t, dataset, device).to(memory_format=memory_format) for role, t in cfg.teachers.items()
    }
    spec = model_spec(cfg.model, dataset)
    student = create_model(spec)
    if cfg.train.init_from is not None and not resume:
        _initialise(student, cfg, dataset, spec)
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
        run_dir,
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
        cfg.eval.resolve(cfg.attack.eps),
        memory_format=memory_format,
    )
    if resume:
        _restore(run)
    # Everything that can fail on the user's input has run: only now is the run folder written.
    if dist_info.is_main and write:
        create_run_dir(run_dir, force, resume)
        if not resume:
            atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
        else:
            run.metrics.trim(run.progress.step)  # records written after the checkpoint are written again
            if changes:
                _record_changes(run_dir, cfg, changes, run.start_epoch)
    barrier()
    return run


def _restore(run: Run) -> None:
    state = load_torch(run.run_dir / CHECKPOINTS / "train_state.pt")
    run.student.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.method.load_state_dict(state["method"])
    if state.get("average") is not None:
        run.average = copy.deepcopy(run.student)
        run.average.load_state_dict(state["average"])
    run.start_epoch, run.best_score, run.best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
    run.progress.step = state["step"]
    _restore_rng(state, run.dist, run.device)
    log.info("resuming %s after epoch %d", run.run_dir, state["epoch"] + 1)


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the training split; returns the epoch's metrics record."""
    cfg, progress, method = run.cfg, run.progress, run.method
    lr = _start_epoch(run, epoch)
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


def _start_epoch(run: Run, epoch: int) -> float:
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
    loss, stats = _step(run, x.contiguous(memory_format=run.memory_format), y)
    tally.first_bad = torch.where((tally.first_bad < 0) & ~torch.isfinite(loss), run.progress.step, tally.first_bad)
    tally.loss_sum += loss
    return loss, stats


def _stop_if_non_finite(run: Run, first_bad: torch.Tensor, epoch: int) -> None:
    """Raise on every rank (none waits forever) if any rank has seen a non-finite loss; nothing of
    the epoch has been saved yet, so the last checkpoint on disk is the last good one."""
    step = int(first_bad.item())
    if any_rank(step >= 0, run.device):
        where = f"step {step}" if step >= 0 else "a step on another rank"
        raise TrainingError(
            f"non-finite loss at epoch {epoch + 1}, {where}; "
            f"the last good checkpoint is in {run.run_dir / CHECKPOINTS} (try a lower train.lr)"
        )


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


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, for every parameter and floating-point
    buffer (BatchNorm statistics too); integer buffers (batch counters) are copied."""
    for a, b in zip(average.state_dict().values(), model.state_dict().values()):
        if a.is_floating_point():
            a.mul_(decay).add_(b.detach(), alpha=1 - decay)
        else:
            a.copy_(b)


def validate_and_select(run: Run, epoch: int, record: dict[str, Any]) -> None:
    """Evaluate on the selection split; a better score makes this epoch's model the best checkpoint.
    A weight-averaging method updates its average from the student's validation, and the average
    (the student until the average has started) is then validated and selected instead."""
    cfg, method = run.cfg, run.method
    summary = _validate(run, run.student)
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
            candidate, summary = run.average, _validate(run, run.average)
            _record_validation(record, summary, f"{where}_average")
    score = selection_score(summary, run.select_metric)
    record[f"{where}_{run.select_metric}"] = score
    if score > run.best_score:
        run.best_score, run.best_epoch = score, epoch + 1
        if run.dist.is_main:
            save_model(run.run_dir / CHECKPOINTS / "best.safetensors", candidate, run.spec, epoch=epoch + 1, **run.meta)


def _validate(run: Run, model: nn.Module) -> dict[str, Any]:
    """One validation of `model`: the attacks the selection metric and the method need, no checks."""
    attacks = tuple(dict.fromkeys(needed_attacks(run.select_metric) + run.method.validation_attacks))
    settings = replace(run.settings, attacks=attacks, checks=False)
    return evaluate(model, run.select_split, settings, run.dataset.num_classes, run.dist.rank, run.dist.world_size)


def _record_validation(record: dict[str, Any], summary: dict[str, Any], prefix: str) -> None:
    for name, result in summary["attacks"].items():
        record[f"{prefix}_{name}_acc"] = result["accuracy"]
        record[f"{prefix}_{name}_worst_class_acc"] = result["worst_class_accuracy"]


def time_left(elapsed: float, done: int, remaining: int) -> float:
    """Seconds the `remaining` epochs take at the mean wall time of the `done` ones (validation and
    checkpoints included, as often as they ran so far)."""
    return elapsed / done * remaining if done else float("nan")


def duration(seconds: float) -> str:
    """A duration for people: 0.4s, 42s, 12m 05s, 3h 07m."""
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def save(run: Run, epoch: int, record: dict[str, Any], left: float = float("nan")) -> None:
    """The epoch's record, the last model and the full state for `--resume`, all written atomically;
    the log line ends with the time the run's other epochs are estimated to take (`left`)."""
    rng = _rng_states(run.device)
    if run.dist.is_main:
        run.metrics.write(**record)
        save_model(run.run_dir / CHECKPOINTS / "last.safetensors", run.student, run.spec, epoch=epoch + 1, **run.meta)
        if run.average is not None:
            save_model(
                run.run_dir / CHECKPOINTS / "average.safetensors", run.average, run.spec, epoch=epoch + 1, **run.meta
            )
        save_torch(
            {
                "model": run.student.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "method": run.method.state_dict(),
                "average": None if run.average is None else run.average.state_dict(),
                "epoch": epoch,
                "step": run.progress.step,
                "best_score": run.best_score,
                "best_epoch": run.best_epoch,
                **rng,
            },
            run.run_dir / CHECKPOINTS / "train_state.pt",
        )
        metric = f"{run.cfg.train.select_on}_{run.select_metric}"
        to_go = f", about {duration(left)} to go before the final evaluation" if math.isfinite(left) and left else ""
        log.info(
            "epoch %d/%d  loss %.4f  %s %.4f  (%.1fs%s)",
            epoch + 1,
            run.cfg.train.epochs,
            record["loss"],
            run.select_metric,
            record.get(metric, float("nan")),
            record["seconds"],
            to_go,
        )
    barrier()


def memory_format_of(cfg: Config) -> torch.memory_format:
    """The memory format of a run's models (`train.channels_last`): training, its final report and
    `robustdistill eval` of the run all use it, so the three compute the same verdicts."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def final_report(
    cfg: Config,
    run_dir: Path,
    dataset: Dataset,
    dist_info: DistInfo,
    settings: EvalSettings,
    teachers: dict[str, nn.Module],
    selection: dict[str, Any],
) -> Optional[dict]:
    """Evaluate the best checkpoint on the test split with `settings` (and the sanity checks);
    write report.json/.md. The transfer attack's surrogate defaults to the robust teacher."""
    ckpt = run_dir / CHECKPOINTS / "best.safetensors"
    model, meta = load_model(ckpt)
    # the memory format training used, as `robustdistill eval` of the run uses: the same verdicts
    model = model.to(dataset.test.y.device).to(memory_format=memory_format_of(cfg))
    test = subset_of(dataset.test, cfg.eval.subset, "the test split", "eval.subset")
    surrogate = load_surrogate(cfg.eval, cfg.teachers, dataset, dataset.test.y.device, loaded=teachers)
    summary = evaluate(
        model,
        test,
        settings,
        dataset.num_classes,
        dist_info.rank,
        dist_info.world_size,
        progress=dist_info.is_main,
        surrogate=surrogate,
        state_dir=run_dir,
    )
    report = build_report(summary, ModelSpec(**meta["spec"]), ckpt, dataset, "test", len(test), settings.seed)
    report["selection"] = selection
    if dist_info.is_main:
        write_report(run_dir, report, title=f"{run_dir.name}: {cfg.method.name} on {dataset.name}")
        for check in failed(report.get("checks", [])):
            log.warning(
                "WARNING: sanity check %d (%s) FAILED for %s: %s", check["id"], check["name"], run_dir, check["message"]
            )
    return report
