"""Corruption robustness (RobustBench's third threat model): accuracy on the released CIFAR-10-C /
CIFAR-100-C files, per corruption and severity, their mean, and the class-wise accuracies.

The layout is the release's: a folder holding `labels.npy` and one `<corruption>.npy` per
corruption, each 5 x N images (N x H x W x C uint8, severity 1 first, then 2 ... 5) with the labels
of `labels.npy` (5 x N, the same N labels five times in the release). No attack is run: every
number is the model's prediction on the corrupted image.

    summary = corruption_accuracy(model, Path("~/data/CIFAR-10-C"), num_classes=10, shape=(3, 32, 32))

Besides the accuracies, the summary keeps each image's count of corrupted versions classified right
(`per_image`: hits, variants, labels) when every severity holds the same images (the same labels in
the same order, as in the release): what a comparison bootstraps over images and seeds, and what a
report's numbers are checked against when it is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..attacks.base import predict
from ..core.errors import DataError

SEVERITIES = 5
LAYOUT = "labels.npy and <corruption>.npy files, each 5 x N images (severity 1 to 5), N x H x W x C uint8"


def corruption_files(folder: Path) -> list[Path]:
    """The corruption files of `folder` (every .npy but labels.npy), sorted; refused in one line when
    the folder or its labels are missing, or it holds no corruption."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"eval.corruptions {folder} is not a folder; it should hold {LAYOUT}")
    if not (folder / "labels.npy").is_file():
        raise DataError(f"missing {folder / 'labels.npy'}; expected {LAYOUT}")
    files = sorted(p for p in folder.glob("*.npy") if p.name != "labels.npy")
    if not files:
        raise DataError(f"{folder} holds no <corruption>.npy file; expected {LAYOUT}")
    return files


def _load(path: Path, **kwargs) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npy file ({exc})") from None


def corruption_accuracy(
    model: nn.Module,
    folder: Path,
    num_classes: int,
    shape: tuple[int, ...],
    batch_size: int = 256,
) -> dict[str, Any]:
    """{folder, accuracy: {corruption: [severity 1..5]}, mean, class_accuracy (over every corruption
    and severity), images (per severity), per_image (see the module's docstring)}; each file is read
    memory-mapped, one severity at a time. `shape`: the model's input (C, H, W), which every file
    must match."""
    folder = Path(folder).expanduser()
    files = corruption_files(folder)
    labels = _load(folder / "labels.npy").reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer) or len(labels) % SEVERITIES:
        raise DataError(f"{folder / 'labels.npy'}: expected 5 x N integer labels, got {len(labels)} of {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{folder / 'labels.npy'} has labels outside 0..{num_classes - 1}: not this model's dataset")
    n = len(labels) // SEVERITIES
    device = next(model.parameters()).device
    y_all = torch.from_numpy(labels.astype(np.int64))
    hits = torch.zeros(num_classes, dtype=torch.long)
    per_image = torch.zeros(n, dtype=torch.long)
    counts = torch.zeros(num_classes, dtype=torch.long)
    accuracy = {}
    for path in files:
        images = _load(path, mmap_mode="r")
        expected = (len(labels), shape[1], shape[2], shape[0])
        if images.dtype != np.uint8 or tuple(images.shape) != expected:
            raise DataError(
                f"{path}: images of shape {tuple(images.shape)} ({images.dtype}); expected {expected} uint8 "
                f"(5 x {n} images of the model's input, N x H x W x C, with labels.npy)"
            )
        per_severity = []
        for s in range(SEVERITIES):
            block = slice(s * n, (s + 1) * n)
            x = torch.from_numpy(np.array(images[block].transpose(0, 3, 1, 2), order="C"))  # a copy of this block
            x = x.to(device).float().div_(255.0)
            y = y_all[block]
            right = predict(model, x, batch_size).cpu() == y
            hits += torch.bincount(y[right], minlength=num_classes)
            per_image += right.long()
            counts += torch.bincount(y, minlength=num_classes)
            per_severity.append(right.double().mean().item() if n else 0.0)
        accuracy[path.stem] = per_severity
    everything = [a for values in accuracy.values() for a in values]
    summary = {
        "folder": str(folder),
        "images": n,
        "accuracy": accuracy,
        "mean": float(np.mean(everything)),
        "class_accuracy": (hits.double() / counts.clamp_min(1)).tolist(),
    }
    first = labels[:n]
    if all(np.array_equal(labels[s * n : (s + 1) * n], first) for s in range(1, SEVERITIES)):
        variants = len(files) * SEVERITIES
        summary["per_image"] = {
            "hits": pack_counts(per_image.numpy()),
            "variants": variants,
            "labels": pack_counts(first),
        }
    return summary


def pack_counts(values: np.ndarray) -> str:
    """Small non-negative integers (below 65536) as hex text: two bytes each, little-endian."""
    return np.asarray(values, dtype="<u2").tobytes().hex()


def unpack_counts(text: str, n: int) -> np.ndarray:
    """The n integers of `pack_counts`; ValueError when the text does not hold exactly n."""
    values = np.frombuffer(bytes.fromhex(text), dtype="<u2")
    if len(values) != n:
        raise ValueError(f"{len(values)} values where {n} were expected")
    return values.astype(np.int64)


def per_image_scores(summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(each image's share of its corrupted versions classified right, its label) from a report's
    `corruptions` entry; ValueError when it has no per-image record or a damaged one."""
    record, n = summary["per_image"], int(summary["images"])
    hits, labels = unpack_counts(record["hits"], n), unpack_counts(record["labels"], n)
    variants = int(record["variants"])
    if variants <= 0 or hits.max(initial=0) > variants:
        raise ValueError(f"hits above the {variants} variants")
    return hits / variants, labels


def check_corruptions(summary: dict[str, Any]) -> None:
    """The mean and class-wise corruption accuracies must be what the per-image record gives
    (ValueError naming the first that is not); a summary without that record is not checked."""
    if "per_image" not in summary:
        return
    scores, labels = per_image_scores(summary)
    mean = float(scores.mean()) if len(scores) else 0.0
    if abs(mean - float(summary["mean"])) > 1e-9:
        raise ValueError(
            f"its mean corruption accuracy {100 * summary['mean']:.2f} % is not its images' {100 * mean:.2f} %"
        )
    counts = np.bincount(labels, minlength=len(summary["class_accuracy"]))
    classwise = np.bincount(labels, weights=scores, minlength=len(counts)) / np.maximum(counts, 1)
    if len(classwise) != len(summary["class_accuracy"]) or not np.allclose(
        classwise, summary["class_accuracy"], rtol=0, atol=1e-9
    ):
        raise ValueError("its class-wise corruption accuracies are not its images'")


def corruption_table(summary: dict[str, Any], class_names: Optional[list[str]] = None) -> list[str]:
    """report.md's section: one row per corruption, its five severities and their mean; then each
    class's accuracy over every corruption and severity (named by `class_names` when given)."""
    head = "| corruption | " + " | ".join(f"severity {s + 1} %" for s in range(SEVERITIES)) + " | mean % |"
    rows = [head, "|" + "---|" * (SEVERITIES + 2)]
    for name, values in summary["accuracy"].items():
        cells = " | ".join(f"{100 * v:.2f}" for v in values)
        rows.append(f"| {name} | {cells} | {100 * float(np.mean(values)):.2f} |")
    classes = summary["class_accuracy"]
    names = class_names if class_names and len(class_names) == len(classes) else [str(k) for k in range(len(classes))]
    return [
        f"## Corruptions ({summary['folder']}, {summary['images']} images per severity)",
        "",
        f"Mean corruption accuracy: {100 * summary['mean']:.2f} % (no attack: the model's predictions on "
        "the corrupted images).",
        "",
        *rows,
        "",
        "Per class, over every corruption and severity: "
        + ", ".join(f"{name} {100 * a:.2f} %" for name, a in zip(names, classes))
        + f" (worst {100 * min(classes, default=0.0):.2f} %).",
    ]
