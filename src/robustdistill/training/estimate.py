"""How long a training run will take, measured on the run itself before it starts.

    robustdistill train configs/digits/rslad.yaml --estimate
    e = estimate(cfg); print(e.step, e.epoch, e.total)      # seconds; nothing is written

The run is built exactly as `train` builds it (every input check, a resumed state included); a few
steps and one validation are timed, and the epochs still to train extrapolate from them.
"""

from __future__ import annotations

import copy
import itertools
import logging
import statistics
import time
from dataclasses import dataclass

import torch

from ..core.errors import UserError
from ..core.timing import intra_op_threads, synchronize
from ..methods import recompute_batchnorm
from ..storage.runs import check_run_dir
from .config import Config
from .loop import Tally, setup

log = logging.getLogger("robustdistill")


@dataclass
class Estimate:
    """What `estimate` measured (seconds) and the training time it extrapolates to."""

    step: float  # median wall time of one training step, its batch's loading included
    steps_per_epoch: int
    validation: float  # one validation (twice for weight-averaging methods, plus a BatchNorm recompute for SWA)
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
    (median; each waits for the device, so a pipelined loop is if anything faster) in the run's
    first epoch, or in its method's costliest (CIARD's once its teacher learns), and one timed
    validation, on the run as `train` builds it (config, data, teachers and a resumed state checked
    as for training), on its thread count (`train.threads`). The steps change only the student in
    memory; nothing is written."""
    with intra_op_threads(cfg.train.threads):
        return _measure(cfg, force, resume, steps, warmup)


def _measure(cfg: Config, force: bool, resume: bool, steps: int, warmup: int) -> Estimate:
    note = ""
    if not resume:
        try:
            check_run_dir(cfg.run_dir, force=force, resume=False)
        except UserError as error:
            note = str(error)
    run = setup(cfg, force=force, resume=resume, write=False)
    # where a step's cost changes during the run (CIARD's teacher starts learning), its costliest epoch
    costliest = min(run.method.costliest_epoch(run.method.options, cfg.train.epochs), cfg.train.epochs - 1)
    run.begin_epoch(max(run.state.start_epoch, costliest))
    tally, times = Tally(run.device), []
    batches = iter(run.loader)
    log.info("estimate: %d training steps (%d of them warm-up)", warmup + steps, warmup)
    for i in range(warmup + steps):
        synchronize(run.device)
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # an epoch shorter than the timed steps: the next one
            batches = iter(run.loader)
            batch = next(batches)
        run.step(*batch, tally)
        synchronize(run.device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    log.info("estimate: one validation (%d images of the %s split)", len(run.selection.split), cfg.train.select_on)
    started = time.perf_counter()
    run.validate(run.student)
    validation = (time.perf_counter() - started) * (2 if run.method.averages_weights(run.method.options) else 1)
    if run.method.recomputes_batchnorm(run.method.options):  # the average's statistics: a forward pass per batch
        timed = min(5, len(run.loader))
        started = time.perf_counter()
        recompute_batchnorm(copy.deepcopy(run.student), itertools.islice(iter(run.loader), timed))
        synchronize(run.device)
        validation += (time.perf_counter() - started) * len(run.loader) / max(timed, 1)
    epochs = range(run.state.start_epoch, cfg.train.epochs)
    return Estimate(
        step=statistics.median(times),
        steps_per_epoch=len(run.loader),
        validation=validation,
        epochs=len(epochs),
        validations=sum(run.validates_after(e) for e in epochs),
        final_attacks=tuple(run.selection.settings.attacks),
        device=str(run.device) + (f", {torch.get_num_threads()} threads" if run.device.type == "cpu" else ""),
        folder_note=note,
    )
