"""Metrics of per-sample verdicts: accuracy and class-wise accuracy with 95 % Wilson intervals,
worst/best class, NSD, packed verdicts, and the model-selection scores."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from ..attacks import ATTACKS, ROBUST_ATTACK

SELECTION_METRICS = ("clean", "robust", "robust_plus_worst", "w_robust")
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(hits: float, n: float, z: float = Z95) -> Optional[list[float]]:
    """The Wilson score interval (95 %) of a binomial proportion hits / n; None when n = 0.
    Unlike the normal approximation it stays inside [0, 1] and is sound for small n and p near 0 or 1."""
    if n <= 0:
        return None
    p = hits / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return [max(0.0, center - half), min(1.0, center + half)]


def class_metrics(correct: torch.Tensor, total: torch.Tensor) -> dict[str, Any]:
    """Metrics from per-class correct counts and per-class totals (1-D tensors of length C), with
    95 % Wilson intervals for the accuracy and for each class's accuracy."""
    correct, total = correct.double(), total.double()
    present = total > 0
    class_acc = torch.where(present, correct / total.clamp_min(1), torch.full_like(total, float("nan")))
    acc = (correct.sum() / total.sum().clamp_min(1)).item()
    valid = class_acc[present]
    mean = valid.mean().item() if len(valid) else float("nan")
    nsd = (valid.std(unbiased=False).item() / mean) if len(valid) and mean > 0 else None
    return {
        "accuracy": acc,
        "accuracy_interval": wilson_interval(correct.sum().item(), total.sum().item()),
        "class_accuracy": [None if torch.isnan(a) else a.item() for a in class_acc],
        "class_interval": [wilson_interval(h, n) for h, n in zip(correct.tolist(), total.tolist())],
        "worst_class_accuracy": valid.min().item() if len(valid) else None,
        "best_class_accuracy": valid.max().item() if len(valid) else None,
        "nsd": nsd,
    }


def sample_metrics(correct: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Class metrics of per-sample correctness over the whole split, and the verdicts themselves
    (`verdicts`: hex of the packed bits, sample order), so that runs can be compared image by image."""
    hits = torch.bincount(y[correct], minlength=num_classes).double()
    total = torch.bincount(y, minlength=num_classes).double()
    return {**class_metrics(hits.cpu(), total.cpu()), "verdicts": pack_verdicts(correct)}


def pack_verdicts(correct: torch.Tensor) -> str:
    return np.packbits(correct.cpu().numpy().astype(np.uint8)).tobytes().hex()


def unpack_verdicts(text: str, n: int) -> np.ndarray:
    """The per-sample booleans of `pack_verdicts` (n: the number of samples)."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def strongest_attack(accuracy: dict[str, float]) -> Optional[str]:
    """The attack robust accuracy is quoted under: of those that ran (clean aside), the one with the
    lowest accuracy, an AutoAttack on a tie (standard before fast). None when only clean ran.
    A weaker attack overstates robustness, so W-Robust Acc, the worst class and every comparison
    table use this one (model selection during training alone uses PGD-20, for its cost)."""
    candidates = [name for name in accuracy if name != "clean"]
    if not candidates:
        return None

    def strength(name: str):
        attack = ATTACKS.get(name)
        return accuracy[name], not attack.autoattack, name != "autoattack", name

    return min(candidates, key=strength)


def w_robust(accuracy: dict[str, float]) -> Optional[dict[str, Any]]:
    """W-Robust Acc, (clean + robust) / 2 under the strongest attack, with its definition; None
    without clean accuracy or any attack."""
    robust = strongest_attack(accuracy)
    if robust is None or "clean" not in accuracy:
        return None
    return {
        "value": (accuracy["clean"] + accuracy[robust]) / 2,
        "definition": f"(clean + {robust}) / 2",
        "attack": robust,
    }


def needed_attacks(metric: str) -> tuple[str, ...]:
    """The attacks a selection metric reads."""
    return ("clean",) if metric == "clean" else ("clean", ROBUST_ATTACK)


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
