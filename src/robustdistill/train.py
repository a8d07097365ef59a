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
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checks import failed
from .checkpoint import atomic_write, load_model, load_torch, save_model, save_torch
from .config import RESUMABLE, Config, config_changes, load_config
from .data import Augment, BatchLoader, Dataset, load_dataset
from .distributed import DistInfo, any_rank, barrier, broadcast_buffers, check_ranks_agree, gather_objects, init_distributed, resolve_device
from .errors import CheckpointError, ConfigError, TrainingError
from .evaluate import EvalSettings, evaluate, needed_attacks, selection_score, subset_of
from .methods import METHODS, Context, Progress, create_method
from .models import ModelSpec, create_model
from .report import build_report, now, write_report
from .robustbench import is_robustbench, zoo_path
from .teachers import load_surrogate, load_teacher, model_spec
from .runs import CHECKPOINTS, MetricsLog, check_run_dir, create_run_dir, model_checkpoint

log = logging.getLogger("robustdistill")


def lr_decays(epoch: int, milestones: list[int]) -> int:
    """How many milestones the (0-based) epoch has reached: lr = base * gamma ** lr_decays."""
    return sum(epoch >= m for m in milestones)


def _preflight(cfg: Config, run_dir: Path, force: bool, resume: bool) -> dict[str, tuple[Any, Any]]:
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
        try:
            if is_robustbench(tcfg.path):
                path = zoo_path(tcfg.path, cfg.data.name, tcfg.model_dir)
                if not path.is_file():
                    raise CheckpointError(f"no RobustBench checkpoint at {path}")
            else:
                model_checkpoint(tcfg.path, tcfg.checkpoint)
        except CheckpointError as exc:
            raise CheckpointError(f"teacher '{role}' (teachers.{role}.path): {exc}") from None
    if "transfer" in cfg.eval.attacks and cfg.eval.surrogate is None and "robust" not in cfg.teachers:
        raise ConfigError("eval.attacks has transfer: set eval.surrogate to a run folder or checkpoint (no robust teacher to use)")
    if cfg.train.select_on == "val" and cfg.data.val_fraction <= 0:
        raise ConfigError("train.select_on=val needs data.val_fraction > 0 (a validation split)")
    check_run_dir(run_dir, force, resume)
    if not resume:
        return {}
    changes = config_changes(load_config(run_dir / "config.yaml"), cfg)
    refused = [k for k in changes if k not in RESUMABLE]
    if refused:
        shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused[:4])
        raise ConfigError(f"--resume refuses to change what {run_dir} was trained with ({shown}); only "
                          f"{', '.join(RESUMABLE)} may change; start a new run (name=...) instead")
    return changes


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
        log.warning("resuming on %d process(es) a run trained on %d: random streams differ from an uninterrupted run",
                    dist_info.world_size, saved)
    torch.set_rng_state(state["rng"][dist_info.rank % saved])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"][dist_info.rank % len(state["cuda_rng"])], device)


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: Config, *, force: bool = False, resume: bool = False) -> Path:
    """Train `cfg` into `cfg.out_dir/cfg.name`; returns the run folder."""
    run_dir = Path(cfg.out_dir) / (cfg.name or "run")
    dist_info = init_distributed(cfg.train.device)
    changes = _preflight(cfg, run_dir, force, resume)
    barrier()  # every rank has checked the folder before rank 0 may create it
    device = resolve_device(cfg.train.device, dist_info)
    torch.manual_seed(cfg.seed * 1000 + dist_info.rank)

    dataset = load_dataset(cfg.data, device)
    teachers = {role: load_teacher(role, t, dataset, device) for role, t in cfg.teachers.items()}
    spec = model_spec(cfg.model, dataset)
    student = create_model(spec).to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    student = student.to(memory_format=memory_format)
    forward: nn.Module = student
    if dist_info.world_size > 1:
        forward = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = Context(forward, student, dataset.num_classes, cfg.attack, teachers, dist_info.world_size)
    method = create_method(cfg.method, ctx)
    optimizer = torch.optim.SGD(
        student.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    progress = Progress()
    start_epoch, best_score, best_epoch = 0, -math.inf, None
    if resume:
        state = load_torch(run_dir / CHECKPOINTS / "train_state.pt")
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        progress.step = state["step"]
        _restore_rng(state, dist_info, device)
        log.info("resuming %s after epoch %d", run_dir, state["epoch"] + 1)

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
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split ({len(dataset.train)} images)")
    select_split = subset_of(dataset.split(cfg.train.select_on), cfg.train.eval_subset,
                             f"the {cfg.train.select_on} split", "train.eval_subset")
    subset_of(dataset.test, cfg.eval.subset, "the test split", "eval.subset")  # the final report's, checked now
    # Everything that can fail on the user's input has run: only now is the run folder written.
    metrics = MetricsLog(run_dir / "metrics.jsonl" if dist_info.is_main else None)
    if dist_info.is_main:
        create_run_dir(run_dir, force, resume)
        if not resume:
            atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
        else:
            metrics.trim(progress.step)  # records written after the checkpoint are written again
            if changes:
                _record_changes(run_dir, cfg, changes, start_epoch)
    barrier()
    select_metric = cfg.train.select_metric or method.selection_metric
    settings = dataclasses.replace(EvalSettings.from_config(cfg.eval, cfg.attack.eps), checks=False)
    show = dist_info.is_main
    meta = {"data": cfg.to_dict()["data"], "eps": cfg.attack.eps, "method": cfg.method.name, "run": str(run_dir)}

    for epoch in range(start_epoch, cfg.train.epochs):
        progress.epoch = epoch
        progress.lr_decays = lr_decays(epoch, cfg.train.milestones)
        progress.next_lr_decays = lr_decays(epoch + 1, cfg.train.milestones)
        lr = cfg.train.lr * cfg.train.lr_gamma**progress.lr_decays
        for group in optimizer.param_groups:
            group["lr"] = lr
        loader.set_epoch(epoch)
        method.on_epoch_start(progress)
        student.train()
        loss_sum = torch.zeros((), device=device)
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, disable=None if show else True)
        for x, y in bar:
            x = x.contiguous(memory_format=memory_format)
            with _autocast(cfg, device):
                loss, stats = method.loss(x, y)
            if any_rank(not torch.isfinite(loss).item(), device):  # every rank stops, none waits forever
                raise TrainingError(
                    f"non-finite loss at epoch {epoch + 1}, step {progress.step + 1}; "
                    f"the last good checkpoint is in {run_dir / CHECKPOINTS} (try a lower train.lr)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.step += 1
            method.on_step_end(progress)
            loss_sum += loss.detach()
            if progress.step % cfg.train.log_every == 0:
                metrics.write(type="step", epoch=epoch + 1, step=progress.step, lr=lr, loss=loss, **stats, **method.log_state())
        broadcast_buffers(student)
        method.on_epoch_end(progress)
        check_ranks_agree(method.log_state(), f"the {cfg.method.name} state after epoch {epoch + 1}")
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {
            "type": "epoch",
            "epoch": epoch + 1,
            "step": progress.step,
            "lr": lr,
            "loss": (loss_sum / len(loader)).item(),
            "seconds": seconds,
            "images_per_s": len(loader) * loader.local_batch * dist_info.world_size / seconds,
        }
        record.update(method.log_state())
        last_epoch = epoch + 1 == cfg.train.epochs
        if (epoch + 1) % cfg.train.eval_every == 0 or last_epoch:
            summary = evaluate(student, select_split, needed_attacks(select_metric), settings, dataset.num_classes,
                               dist_info.rank, dist_info.world_size)
            score = selection_score(summary, select_metric)
            record[f"{cfg.train.select_on}_{select_metric}"] = score
            for name, result in summary["attacks"].items():
                record[f"{cfg.train.select_on}_{name}_acc"] = result["accuracy"]
                record[f"{cfg.train.select_on}_{name}_worst_class_acc"] = result["worst_class_accuracy"]
            if score > best_score:
                best_score, best_epoch = score, epoch + 1
                if dist_info.is_main:
                    save_model(run_dir / CHECKPOINTS / "best.safetensors", student, spec, epoch=epoch + 1, **meta)
        rng = _rng_states(device)
        if dist_info.is_main:
            metrics.write(**record)
            save_model(run_dir / CHECKPOINTS / "last.safetensors", student, spec, epoch=epoch + 1, **meta)
            save_torch(
                {
                    "model": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "method": method.state_dict(),
                    "epoch": epoch,
                    "step": progress.step,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    **rng,
                },
                run_dir / CHECKPOINTS / "train_state.pt",
            )
            log.info(
                "epoch %d/%d  loss %.4f  %s %.4f  (%.1fs)",
                epoch + 1, cfg.train.epochs, record["loss"], select_metric,
                record.get(f"{cfg.train.select_on}_{select_metric}", float("nan")), seconds,
            )
        barrier()

    final_report(cfg, run_dir, dataset, dist_info, selection={
        "metric": select_metric, "split": cfg.train.select_on, "best_epoch": best_epoch, "best_score": best_score,
    }, teachers=teachers)
    barrier()  # no rank returns before rank 0 has written the report
    return run_dir


def final_report(cfg: Config, run_dir: Path, dataset: Dataset, dist_info: DistInfo, selection: dict[str, Any],
                 teachers: dict[str, nn.Module]) -> Optional[dict]:
    """Evaluate the best checkpoint on the test split with `cfg.eval` (and its sanity checks);
    write report.json/.md. The transfer attack's surrogate defaults to the robust teacher."""
    ckpt = run_dir / CHECKPOINTS / "best.safetensors"
    model, meta = load_model(ckpt)
    model = model.to(dataset.test.y.device)
    test = subset_of(dataset.test, cfg.eval.subset, "the test split", "eval.subset")
    settings = EvalSettings.from_config(cfg.eval, cfg.attack.eps)
    surrogate = load_surrogate(cfg.eval, cfg.teachers, dataset, dataset.test.y.device, loaded=teachers)
    summary = evaluate(model, test, cfg.eval.attacks, settings, dataset.num_classes, dist_info.rank,
                       dist_info.world_size, progress=dist_info.is_main, surrogate=surrogate, state_dir=run_dir)
    report = build_report(summary, ModelSpec(**meta["spec"]), ckpt, dataset, "test", len(test), settings.seed)
    report["selection"] = selection
    if dist_info.is_main:
        write_report(run_dir, report, title=f"{run_dir.name}: {cfg.method.name} on {dataset.name}")
        for check in failed(report.get("checks", [])):
            log.warning("WARNING: sanity check %d (%s) FAILED for %s: %s", check["id"], check["name"], run_dir, check["message"])
    return report
