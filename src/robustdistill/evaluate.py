"""Evaluation: accuracy under each attack of a suite, with class-wise metrics.

`evaluate(model, split, attacks, settings, num_classes)` returns, per attack, the accuracy,
the class-wise accuracies, the worst and best class, and NSD (std / mean of the class-wise
accuracies, lower is fairer), plus W-Robust Acc = (clean + robust) / 2 with its definition.
The model is evaluated in eval mode; BatchNorm statistics never move; attacks see inputs in
[0, 1]. Under DDP every rank evaluates its shard and the class counts are all-reduced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .attacks import FGSM, PGD
from .checkpoint import load_model, read_model_meta
from .config import DataConfig, EvalConfig, build, load_config
from .data import BatchLoader, Split, load_dataset
from .distributed import DistInfo, all_reduce_sum, resolve_device
from .errors import UserError
from .models import ModelSpec
from .registry import Registry
from .report import build_report
from .runs import model_checkpoint

# name -> builder(model, settings, generator) -> attack callable (x, y) -> x_adv, or None for clean
ATTACKS: Registry[Callable[..., Optional[Callable]]] = Registry("attack")
SELECTION_METRICS = ("clean", "robust", "robust_plus_worst", "w_robust")
ROBUST_ATTACK = "pgd20"  # the attack behind "robust accuracy" in selection and W-Robust Acc


@dataclass
class EvalSettings:
    eps: float
    step_size: float
    pgd_steps: int = 20
    cw_steps: int = 30
    batch_size: int = 256
    seed: int = 0

    @classmethod
    def from_config(cls, eval_cfg, attack_cfg) -> "EvalSettings":
        eps = eval_cfg.eps if eval_cfg.eps is not None else attack_cfg.eps
        step = eval_cfg.step_size if eval_cfg.step_size is not None else eps / 4
        return cls(eps, step, eval_cfg.pgd_steps, eval_cfg.cw_steps, eval_cfg.batch_size, eval_cfg.seed)

    def describe(self, attack: str) -> dict[str, Any]:
        return {
            "clean": {},
            "fgsm": {"eps": self.eps, "loss": "ce"},
            "pgd20": {"eps": self.eps, "step_size": self.step_size, "steps": self.pgd_steps, "start": "uniform", "loss": "ce"},
            "cw": {"eps": self.eps, "step_size": self.step_size, "steps": self.cw_steps, "start": "uniform", "loss": "cw"},
        }.get(attack, {})


@ATTACKS.register("clean")
def _clean(model, s: EvalSettings, g):
    return None


@ATTACKS.register("fgsm")
def _fgsm(model, s: EvalSettings, g):
    return FGSM(model, s.eps)


@ATTACKS.register("pgd20")
def _pgd(model, s: EvalSettings, g):
    return PGD(model, s.eps, s.step_size, s.pgd_steps, loss="ce", start="uniform", generator=g)


@ATTACKS.register("cw")
def _cw(model, s: EvalSettings, g):
    return PGD(model, s.eps, s.step_size, s.cw_steps, loss="cw", start="uniform", generator=g)


def class_metrics(correct: torch.Tensor, total: torch.Tensor) -> dict[str, Any]:
    """Metrics from per-class correct counts and per-class totals (1-D tensors of length C)."""
    correct, total = correct.double(), total.double()
    present = total > 0
    class_acc = torch.where(present, correct / total.clamp_min(1), torch.full_like(total, float("nan")))
    acc = (correct.sum() / total.sum().clamp_min(1)).item()
    valid = class_acc[present]
    mean = valid.mean().item() if len(valid) else float("nan")
    nsd = (valid.std(unbiased=False).item() / mean) if len(valid) and mean > 0 else None
    return {
        "accuracy": acc,
        "class_accuracy": [None if torch.isnan(a) else a.item() for a in class_acc],
        "worst_class_accuracy": valid.min().item() if len(valid) else None,
        "best_class_accuracy": valid.max().item() if len(valid) else None,
        "nsd": nsd,
    }


@torch.no_grad()
def attack_correct(
    model: nn.Module,
    split: Split,
    attack: str,
    settings: EvalSettings,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample correctness (bool, this rank's shard, in order) and the labels of that shard."""
    device = split.y.device
    generator = torch.Generator(device=device).manual_seed(settings.seed + rank)  # seeded random starts
    adversary = ATTACKS.get(attack)(model, settings, generator)
    loader = BatchLoader(split, settings.batch_size * world_size, rank=rank, world_size=world_size)
    outs, labels = [], []
    for x, y in tqdm(loader, desc=attack, leave=False, disable=None if progress else True):
        x_eval = adversary(x, y) if adversary is not None else x
        outs.append(model(x_eval).argmax(dim=1) == y)
        labels.append(y)
    if not outs:
        return torch.zeros(0, dtype=torch.bool, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(outs), torch.cat(labels)


def evaluate(
    model: nn.Module,
    split: Split,
    attacks: list[str],
    settings: EvalSettings,
    num_classes: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` on `split` under each attack; class counts are summed over ranks."""
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        for name in attacks:
            correct, y = attack_correct(model, split, name, settings, rank, world_size, progress)
            hits = torch.bincount(y[correct], minlength=num_classes).to(torch.float64)
            total = torch.bincount(y, minlength=num_classes).to(torch.float64)
            all_reduce_sum(hits)
            all_reduce_sum(total)
            results[name] = class_metrics(hits.cpu(), total.cpu())
    finally:
        model.train(was_training)
    summary: dict[str, Any] = {"attacks": results, "settings": {n: settings.describe(n) for n in attacks}}
    summary["settings"]["common"] = asdict(settings)
    if "clean" in results and ROBUST_ATTACK in results:
        summary["w_robust"] = {
            "value": (results["clean"]["accuracy"] + results[ROBUST_ATTACK]["accuracy"]) / 2,
            "definition": f"(clean + {ROBUST_ATTACK}) / 2",
        }
    return summary


def needed_attacks(metric: str) -> list[str]:
    return ["clean"] if metric == "clean" else ["clean", ROBUST_ATTACK]


def selection_score(summary: dict[str, Any], metric: str) -> float:
    """The scalar a run maximises over epochs to pick its best checkpoint."""
    attacks = summary["attacks"]
    clean = attacks["clean"]["accuracy"]
    if metric == "clean":
        return clean
    robust = attacks[ROBUST_ATTACK]
    if metric == "robust":
        return robust["accuracy"]
    if metric == "robust_plus_worst":
        return robust["accuracy"] + (robust["worst_class_accuracy"] or 0.0)
    if metric == "w_robust":
        return (clean + robust["accuracy"]) / 2
    raise ValueError(f"unknown selection metric '{metric}'; use one of {', '.join(SELECTION_METRICS)}")


def evaluate_path(
    target: str,
    *,
    which: str = "best",
    split: str = "test",
    attacks: Optional[list[str]] = None,
    eps: Optional[float] = None,
    step_size: Optional[float] = None,
    steps: Optional[int] = None,
    subset: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
    data: Optional[str] = None,
    data_root: Optional[str] = None,
    model: Optional[str] = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a run folder or a checkpoint file; returns the report.json document.

    A run folder supplies its config (dataset, eps); a checkpoint written by this tool carries
    them in its metadata; a foreign checkpoint needs `data` and `model` (and `eps`).
    """
    path = Path(target)
    ckpt = model_checkpoint(path, which)
    eval_cfg = EvalConfig()
    if path.is_dir():
        cfg = load_config(path / "config.yaml")
        data_cfg, eval_cfg, default_eps = cfg.data, cfg.eval, cfg.attack.eps
    else:
        meta = read_model_meta(ckpt) if ckpt.suffix == ".safetensors" else None
        data_cfg = build(DataConfig, meta["data"], "data") if meta and "data" in meta else None
        default_eps = meta.get("eps") if meta else None
    if data is not None:
        data_cfg = DataConfig(name=data) if data_cfg is None or data_cfg.name != data else data_cfg
    if data_cfg is None:
        raise UserError(f"{ckpt} does not say which dataset it was trained on; pass --data NAME (and --data-root)")
    if data_root is not None:
        data_cfg.root = data_root
    data_cfg.validate()
    eps = eps if eps is not None else (eval_cfg.eps if eval_cfg.eps is not None else default_eps)
    if eps is None:
        raise UserError("no eps known for this checkpoint; pass --eps (e.g. --eps 8/255)")
    settings = EvalSettings(
        eps=eps,
        step_size=step_size if step_size is not None else (eval_cfg.step_size or eps / 4),
        pgd_steps=steps if steps is not None else eval_cfg.pgd_steps,
        cw_steps=eval_cfg.cw_steps,
        batch_size=batch_size or eval_cfg.batch_size,
        seed=seed,
    )
    attacks = attacks or eval_cfg.attacks
    for name in attacks:
        ATTACKS.get(name)
    dev = resolve_device(device, DistInfo())
    dataset = load_dataset(data_cfg, dev)
    spec = None
    if model is not None:
        spec = ModelSpec(model, dataset.num_classes, dataset.channels)
    net, meta = load_model(ckpt, spec)
    net = net.to(dev)
    chosen = dataset.split(split)
    if subset is not None:
        chosen = chosen.take(slice(0, subset))
    summary = evaluate(net, chosen, attacks, settings, dataset.num_classes, progress=progress)
    spec = spec or ModelSpec(**meta["spec"])
    return build_report(summary, spec, ckpt, dataset, split, len(chosen), seed)
