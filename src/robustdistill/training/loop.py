"""The training loop: one loop for every method.

    robustdistill train configs/digits/rslad.yaml train.epochs=5 seed=1          # CPU or one GPU
    torchrun --standalone --nproc_per_node=4 -m robustdistill train configs/cifar10/rslad_resnet18.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m robustdistill train configs/cifar10/rslad_resnet18.yaml                 # two nodes

`train(cfg)` is `setup` (every input check, then the parts from `builders`, a resumed state, and
only then the run folder), `fit` (the epochs still to train) and `finish` (the final report).
Per batch: `loss, stats = method.loss(x, y)`, backward, SGD step, `method.on_step_end`. Per epoch:
`method.on_epoch_end`, a validation evaluation that picks the best checkpoint by the method's
selection metric, and atomic checkpoints (`last`, `best`, and the full state for `--resume`).
Under DDP the global batch is split over the ranks and only rank 0 writes files.

The steps of the loop are `Run`'s public methods, which `estimate` and the benchmarks drive too:
`begin_epoch(epoch)` (the method's progress, the learning rate, the loader's epoch), `step(x, y,
tally)` (one optimisation step, no host-device synchronisation), `train_epoch`, `validate(model)`,
`validate_and_select` and `save`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
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
from ..core.errors import CheckpointError, TrainingError
from ..core.progress import shown
from ..core.timing import FlopCount, duration, intra_op_threads, time_left
from ..data import BatchLoader, Dataset, load_dataset
from ..evaluation.checks import failed
from ..evaluation.metrics import needed_attacks, selection_score
from ..evaluation.pipeline import evaluate_source
from ..evaluation.plots import plot_run
from ..evaluation.report import write_report
from ..evaluation.suite import evaluate_model
from ..methods import Method, Progress, recompute_batchnorm, update_average
from ..models import Classifier
from ..models.checkpoint import ModelMeta, save_model
from ..models.sources import ModelSource
from ..storage.files import FolderLock, save_torch
from ..storage.runs import CHECKPOINTS, MetricsLog, keep_previous_report
from .builders import (
    Models,
    Optimiser,
    Selection,
    build_loader,
    build_method,
    build_models,
    build_selection,
    read_state,
)
from .config import Config
from .folder import after_failure, open_folder
from .preflight import preflight
from .trackers import Trackers

log = logging.getLogger("robustdistill")


@dataclass
class TrainState:
    """Where the loop stands, beyond the weights and the optimizer: what `--resume` restores."""

    progress: Progress = field(default_factory=Progress)  # epoch, step, lr decays (the method reads it)
    start_epoch: int = 0  # the first epoch this process trains (0-based; a resumed run's next one)
    epochs_done: int = 0  # epochs trained so far, by this process or before the resume
    best_score: float = -math.inf
    best_epoch: Optional[int] = None
    average: Optional[Classifier] = None  # the method's weight average of the student, once it has started


@dataclass
class Run:
    """One training run: its config, its parts (`builders`), its state, and its folder's writer."""

    cfg: Config
    dist: DistInfo
    device: torch.device
    dataset: Dataset
    models: Models
    method: Method
    optimiser: Optimiser
    loader: BatchLoader
    selection: Selection
    metrics: MetricsLog
    state: TrainState = field(default_factory=TrainState)
    lock: Optional[FolderLock] = None  # rank 0's hold on the run folder, until `release`
    trackers: Trackers = field(default_factory=Trackers)  # rank 0's TensorBoard / W&B / MLflow (logging.*)
    flops_per_step: Optional[int] = None  # counted on the run's first step (attack, teachers, backward)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def student(self) -> Classifier:
        return self.models.student

    def record(self, record: dict[str, Any]) -> None:
        """One record into metrics.jsonl and to the trackers (rank 0)."""
        self.trackers.log(self.metrics.write(**record))

    def release(self) -> None:
        """Let another process write the run folder (the end of `train`)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def model_meta(self, epoch: int) -> ModelMeta:
        """What a model file of the run records (`robustdistill eval FILE` reads dataset and eps from it)."""
        cfg = self.cfg
        return ModelMeta(self.models.spec, epoch, cfg.to_dict()["data"], cfg.threat, cfg.method.name, str(self.run_dir))

    def state_dict(self) -> dict[str, Any]:
        """The whole training state after `epochs_done` epochs, for `--resume` (collective under DDP:
        it gathers every rank's random streams)."""
        s = self.state
        return {
            "model": self.student.state_dict(),
            "optimizer": self.optimiser.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "average": None if s.average is None else s.average.state_dict(),
            "epoch": s.epochs_done - 1,  # the last trained epoch, 0-based
            "step": s.progress.step,
            "best_score": s.best_score,
            "best_epoch": s.best_epoch,
            # what the state belongs to, checked on --resume (`builders.check_state_belongs`)
            "config": self.cfg.to_dict(),
            "teachers": self.models.fingerprints,
            **rng_states(self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the next epoch to train is the one after the saved one."""
        try:
            self.student.load_state_dict(state["model"])
            self.optimiser.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            where = self.run_dir / CHECKPOINTS / "train_state.pt"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{where} does not fit this run's student ({first}); restore the file") from None
        self.method.load_state_dict(state["method"])
        s = self.state
        if state.get("average") is not None:  # files of versions before weight averaging lack it
            s.average = copy.deepcopy(self.student)
            s.average.load_state_dict(state["average"])
        s.start_epoch = s.epochs_done = state["epoch"] + 1
        s.progress.step, s.best_score, s.best_epoch = state["step"], state["best_score"], state["best_epoch"]
        restore_rng(state, self.dist, self.device)

    def validates_after(self, epoch: int) -> bool:
        """Whether the loop validates (and selects) after `epoch` (0-based): every `train.eval_every`
        epochs, and after the last."""
        return (epoch + 1) % self.cfg.train.eval_every == 0 or epoch + 1 == self.cfg.train.epochs

    def begin_epoch(self, epoch: int) -> float:
        """The method's progress, the learning rate and the loader set for `epoch`; returns the lr."""
        progress = self.state.progress
        progress.epoch = epoch
        progress.lr_decays = self.optimiser.decays(epoch)
        progress.next_lr_decays = self.optimiser.decays(epoch + 1)
        progress.epochs = self.cfg.train.epochs
        lr = self.optimiser.set_epoch(epoch)
        self.loader.set_epoch(epoch)
        self.method.on_epoch_start(progress)
        self.student.train()
        return lr

    def step(self, x: torch.Tensor, y: torch.Tensor, tally: Tally) -> tuple[torch.Tensor, dict[str, Any]]:
        """One optimisation step of the method's loss on a batch, without host-device synchronisation:
        the loss's sum and its first non-finite step go to `tally`, checked at log steps."""
        x = x.contiguous(memory_format=self.cfg.train.memory_format)
        with _autocast(self.cfg, self.device):
            loss, stats = self.method.loss(x, y)
        optimizer, progress = self.optimiser.optimizer, self.state.progress
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step += 1
        self.method.on_step_end(progress)
        loss = loss.detach()
        tally.first_bad = torch.where((tally.first_bad < 0) & ~torch.isfinite(loss), progress.step, tally.first_bad)
        tally.loss_sum += loss
        return loss, stats

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training split; returns the epoch's metrics record."""
        cfg, method, progress = self.cfg, self.method, self.state.progress
        lr = self.begin_epoch(epoch)
        tally, started = Tally(self.device), time.perf_counter()
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, disable=self._quiet)
        for x, y in bar:
            counter = FlopCount() if self.flops_per_step is None else contextlib.nullcontext()
            with counter:
                loss, stats = self.step(x, y, tally)
            if self.flops_per_step is None:
                self.flops_per_step = counter.total
            if progress.step % cfg.train.log_every == 0:
                self._stop_if_non_finite(tally.first_bad, epoch)
                record = dict(type="step", epoch=epoch + 1, step=progress.step, lr=lr, loss=loss)
                self.record({**record, **stats, **method.log_state()})
        self._stop_if_non_finite(tally.first_bad, epoch)  # before anything of this epoch is saved
        broadcast_buffers(self.student)
        method.on_epoch_end(progress)
        check_ranks_agree(method.log_state(), f"the {cfg.method.name} state after epoch {epoch + 1}")
        self.state.epochs_done = epoch + 1
        seconds = time.perf_counter() - started
        steps, world = len(self.loader), self.dist.world_size
        return {
            "type": "epoch",
            "epoch": epoch + 1,
            "step": progress.step,
            "lr": lr,
            "loss": (tally.loss_sum / steps).item(),
            "seconds": seconds,
            "images_per_s": steps * self.loader.local_batch * world / seconds,
            # every FLOP of a step (inner maximisation, teachers, student forward and backward), all ranks
            "gflop_per_s": self.flops_per_step * steps * world / seconds / 1e9,
            **method.log_state(),
        }

    @property
    def _quiet(self) -> Optional[bool]:
        """tqdm's `disable`: progress bars on rank 0 only (None: where the terminal shows them)."""
        return None if self.dist.is_main else True

    def _stop_if_non_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        """Raise on every rank (none waits forever) if any rank has seen a non-finite loss; nothing of
        the epoch has been saved yet, so the last checkpoint on disk is the last good one."""
        step = int(first_bad.item())
        if any_rank(step >= 0, self.device):
            where = f"step {step}" if step >= 0 else "a step on another rank"
            saved = (self.run_dir / CHECKPOINTS / "train_state.pt").is_file()
            folder = self.run_dir / CHECKPOINTS
            kept = f"the last good checkpoint is in {folder}" if saved else "no checkpoint was written"
            raise TrainingError(f"non-finite loss at epoch {epoch + 1}, {where}; {kept} (try a lower train.lr)")

    def validate(self, model: nn.Module) -> dict[str, Any]:
        """One validation of `model`: the attacks the selection metric and the method need, no checks."""
        attacks = tuple(dict.fromkeys(needed_attacks(self.selection.metric) + self.method.validation_attacks))
        settings = replace(self.selection.settings, attacks=attacks, checks=False)
        rank, world = self.dist.rank, self.dist.world_size
        return evaluate_model(model, self.selection.split, settings, self.dataset.num_classes, rank, world)

    def validate_and_select(self, epoch: int, record: dict[str, Any]) -> None:
        """Evaluate on the selection split; a better score makes this epoch's model the best checkpoint.
        A weight-averaging method updates its average from the student's validation, and the average
        (the student until the average has started) is then validated and selected instead."""
        method, s, where, metric = self.method, self.state, self.cfg.train.select_on, self.selection.metric
        summary = self.validate(self.student)
        method.on_validation(summary, s.progress)
        _record_validation(record, summary, where)
        candidate = self.student
        if method.averages_weights(method.options):
            decay = method.average_decay(summary, s.progress)
            if decay is not None:
                if s.average is None:
                    s.average = copy.deepcopy(self.student).eval()
                else:
                    update_average(s.average, self.student, decay)
                if method.recomputes_batchnorm(method.options):
                    recompute_batchnorm(s.average, self.loader)
            record["average_updated"] = decay is not None
            if s.average is not None:
                candidate, summary = s.average, self.validate(s.average)
                _record_validation(record, summary, f"{where}_average")
        score = selection_score(summary, metric)
        record[f"{where}_{metric}"] = score
        if score > s.best_score:
            s.best_score, s.best_epoch = score, epoch + 1
            if self.dist.is_main:
                save_model(self.run_dir / CHECKPOINTS / "best.safetensors", candidate, self.model_meta(epoch + 1))

    def save(self, record: dict[str, Any], left: float = float("nan")) -> None:
        """After `epochs_done` epochs: the epoch's record, the last model and the full state for
        `--resume`, all written atomically; the log line ends with the time the run's other epochs
        are estimated to take (`left`)."""
        state = self.state_dict()  # collective: every rank's random streams
        if self.dist.is_main:
            epoch, folder, metric = self.state.epochs_done, self.run_dir / CHECKPOINTS, self.selection.metric
            self.record(record)
            save_model(folder / "last.safetensors", self.student, self.model_meta(epoch))
            if self.state.average is not None:
                save_model(folder / "average.safetensors", self.state.average, self.model_meta(epoch))
            save_torch(state, folder / "train_state.pt")
            soon = math.isfinite(left) and left
            to_go = f", about {duration(left)} to go before the final evaluation" if soon else ""
            score = record.get(f"{self.cfg.train.select_on}_{metric}", float("nan"))
            epochs, loss, seconds = self.cfg.train.epochs, record["loss"], record["seconds"]
            log.info("epoch %d/%d  loss %.4f  %s %.4f  (%.1fs%s)", epoch, epochs, loss, metric, score, seconds, to_go)
        barrier()


class Tally:
    """What an epoch accumulates on the device, read back only at log steps and at its end: the
    loss sum and the step of the first non-finite loss (-1: none)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)


def _autocast(cfg: Config, device: torch.device):
    """bf16 autocast around the method's loss (attacks, teachers, training passes); the weights,
    the optimizer and the backward's accumulation stay fp32."""
    if cfg.train.amp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _record_validation(record: dict[str, Any], summary: dict[str, Any], prefix: str) -> None:
    for name, result in summary["attacks"].items():
        record[f"{prefix}_{name}_acc"] = result["accuracy"]
        record[f"{prefix}_{name}_worst_class_acc"] = result["worst_class_accuracy"]


def train(cfg: Config, *, force: bool = False, resume: bool = False, progress: bool = True) -> Path:
    """Train `cfg` into `cfg.run_dir` (`out_dir/name`) and write its report; returns the run folder.
    `progress`: log lines and progress bars (False: warnings and errors only)."""
    with shown(progress), intra_op_threads(cfg.train.threads):
        run = setup(cfg, force, resume)
        try:
            fit(run)
            finish(run)
        except BaseException as exc:
            run.trackers.close(failed=True)
            if run.dist.is_main:
                after_failure(run.run_dir, run.lock, resume, exc, run.state.epochs_done)
            raise
        finally:
            run.release()
    return run.run_dir


def fit(run: Run) -> None:
    """The epochs still to train: each one's steps, its validation and selection, its checkpoints."""
    cfg, started = run.cfg, time.perf_counter()
    for epoch in range(run.state.start_epoch, cfg.train.epochs):
        record = run.train_epoch(epoch)
        if run.validates_after(epoch):
            run.validate_and_select(epoch, record)
        done, remaining = epoch + 1 - run.state.start_epoch, cfg.train.epochs - epoch - 1
        run.save(record, left=time_left(time.perf_counter() - started, done, remaining))


def finish(run: Run) -> dict[str, Any]:
    """The final report: the best checkpoint on the test split, with the sanity checks."""
    s = run.state
    selection = {"metric": run.selection.metric, "split": run.cfg.train.select_on}
    selection |= {"best_epoch": s.best_epoch, "best_score": s.best_score}
    report = final_report(run.cfg, run.dataset, run.dist, run.selection.settings, run.models.teachers, selection)
    if run.trackers.trackers:  # rank 0's: the report's numbers and files, and the run's figures
        run.trackers.finish(report, s.progress.step, _figures(run.run_dir))
    barrier()  # no rank returns before rank 0 has written the report
    return report


def _figures(run_dir: Path) -> list[Path]:
    """The run's figures for its trackers (plots/); none when they cannot be drawn."""
    try:
        return plot_run(run_dir)
    except Exception as exc:  # noqa: BLE001 - a figure is never worth the run's end
        log.warning("WARNING: the run's figures could not be drawn for its trackers (%s)", exc)
        return []


def setup(cfg: Config, force: bool, resume: bool, write: bool = True) -> Run:
    """Check everything that can fail on the user's input, build the run's parts, restore a resumed
    run's state, and only then create the run folder. `write=False` (`estimate`): a new run's folder
    is neither checked nor created, nothing is written."""
    dist = init_distributed(cfg.train.device)
    changes = preflight(cfg, force, resume, check_folder=write or resume)
    barrier()  # every rank has checked the folder before rank 0 may create it
    device = resolve_device(cfg.train.device, dist)
    torch.manual_seed(cfg.seed * 1000 + dist.rank)
    dataset = load_dataset(cfg.data, device)
    models = build_models(cfg, dataset, dist, device, initialise_student=not resume)
    method = build_method(cfg, models, dataset.num_classes)
    optimiser = Optimiser.build(cfg.train, models.student)
    loader = build_loader(cfg, dataset, dist)
    selection = build_selection(cfg, dataset, method)
    metrics = MetricsLog(cfg.run_dir / "metrics.jsonl" if dist.is_main and write else None)
    run = Run(cfg, dist, device, dataset, models, method, optimiser, loader, selection, metrics)
    if resume:
        run.load_state_dict(read_state(cfg.run_dir, cfg, models.fingerprints))
        log.info("resuming %s after epoch %d", cfg.run_dir, run.state.start_epoch)
    if dist.is_main and write:  # everything that can fail on the user's input has run
        at = (run.state.progress.step, run.state.start_epoch)
        run.lock = open_folder(cfg, force, resume, changes, run.metrics, at)
        resumed_at = run.state.progress.step if resume else None
        run.trackers = Trackers.open(cfg.logging, cfg.run_dir, cfg.to_dict(), resumed_at)
    barrier()
    return run


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
