"""A finished run's student, written for deployment or for RobustBench, with a parity check.

    robustdistill export runs/absld --format onnx            # runs/absld/export-onnx/
    robustdistill export runs/absld --format robustbench --name Me2026Fair_R18

`export_run` takes a finished run folder (its report written after its best checkpoint, every
sanity check passed unless allowed otherwise), writes the best checkpoint in one of `FORMATS`
(`formats`) into a new folder, then reads the written file back in its own runtime (onnxruntime
for ONNX) and compares it with the PyTorch model on the first N test images: the predicted classes
must all be equal and every logit within `atol + rtol * |logit|`. Only then is the folder moved
into place, with `manifest.json`: the dataset, the classes, the input (shape, range, the
normalisation inside), the threat model, clean and AutoAttack accuracy with their 95 % Wilson
intervals over the test images, the training config's SHA-256 and the parity check's result.
A failed parity check, like every refusal, writes nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..core import __version__
from ..core.errors import UserError
from ..core.threat import eps_text
from ..data import load_dataset
from ..evaluation.checks import failed
from ..evaluation.report import read_report, report_threat
from ..models.checkpoint import load_model
from ..storage.files import FolderLock, atomic_write
from ..storage.runs import CHECKPOINTS
from ..training.config import load_config
from .formats import (
    FORMATS,
    ExportError,
    Runner,
    onnx_runner,
    require_onnx,
    robustbench_paths,
    safetensors_runner,
    state_dict_runner,
    torchscript_runner,
    write_onnx,
    write_safetensors,
    write_state_dict,
    write_torchscript,
)

__all__ = ["FORMATS", "ExportError", "Parity", "export_run"]

log = logging.getLogger("robustdistill")

ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")  # RobustBench's leaderboards
ARCHITECTURES = {  # RobustBench's names for the architectures of this tool
    "resnet18": "ResNet-18",
    "preact_resnet18": "PreActResNet-18",
    "wrn34_10": "WideResNet-34-10",
    "resnet56": "ResNet-56",
    "mobilenet_v2": "MobileNetV2",
}


@dataclass
class Parity:
    """The exported model against the PyTorch model on the same images."""

    images: int  # how many test images were compared
    predictions_equal: int  # on how many the predicted class is the same
    max_abs_logit_diff: float
    atol: float
    rtol: float
    runtime: str  # what ran the exported file
    passed: bool  # every prediction equal and every logit within atol + rtol * |logit|

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {verdict} on {self.images} test images: {self.predictions_equal}/{self.images} predictions equal, "
            f"max |logit difference| {self.max_abs_logit_diff:.2e} (tolerance {self.atol:g} + {self.rtol:g} * |logit|)"
        )


def export_run(
    run: str | Path,
    fmt: str,
    out: Optional[str | Path] = None,
    images: int = 256,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    allow_failed_checks: bool = False,
    name: Optional[str] = None,
) -> tuple[Path, dict[str, Any]]:
    """Export the best checkpoint of the finished run folder `run` as `fmt` into `out` (default:
    RUN/export-<fmt>), checked on the first `images` test images; returns the folder and its manifest.
    `name`: the model's name in RobustBench's files (default: the run folder's name)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; one of {', '.join(FORMATS)}")
    if images < 1:
        raise UserError(f"--images must be >= 1, got {images}")
    if atol < 0 or rtol < 0:
        raise UserError("--atol and --rtol must be >= 0")
    if fmt == "onnx":
        require_onnx()
    run_dir = Path(run)
    report = _finished_report(run_dir, allow_failed_checks)
    target = Path(out) if out is not None else run_dir / f"export-{fmt}"
    if target.exists():
        raise UserError(f"{target} already exists; choose another --out, or move it away first")
    cfg = load_config(run_dir / "config.yaml")
    name = name or run_dir.name
    if fmt == "robustbench":
        _check_robustbench(report, cfg.data.name, name)
    with FolderLock(run_dir, "exporting"):  # no training or resume of the run meanwhile
        model, meta = load_model(run_dir / CHECKPOINTS / "best.safetensors")
        model = model.eval().to(memory_format=torch.contiguous_format)
        dataset = load_dataset(cfg.data, extra=False)
        test = dataset.test
        if fmt == "robustbench" and report["data"]["num_samples"] < len(test):
            raise UserError(
                f"--format robustbench: the run's report measured {report['data']['num_samples']} of the "
                f"{len(test)} test images (eval.subset); RobustBench quotes the whole test set: evaluate it "
                "on all of them first"
            )
        x = test.images(torch.arange(min(images, len(test))))
        tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            files, runner = _write(fmt, model, meta, x[:2], tmp, report, cfg, name)
            parity = _parity(model, runner[0], runner[1], x, atol, rtol)
            if not parity.passed:
                raise ExportError(
                    f"the {fmt} file does not reproduce the model: {parity.describe()}; nothing was written "
                    "(raise --atol / --rtol only if that difference is acceptable)"
                )
            manifest = _manifest(run_dir, tmp, fmt, files, report, meta, x, parity)
            atomic_write(tmp / "manifest.json", lambda t: Path(t).write_text(json.dumps(manifest, indent=1) + "\n"))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target, manifest


def _finished_report(run_dir: Path, allow_failed_checks: bool) -> dict[str, Any]:
    """The report of a finished run: its folder has a config, a best checkpoint and a report written
    after that checkpoint (a run still training, stopped or failed has none, or an older one)."""
    if not run_dir.is_dir() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run folder of this tool (no config.yaml); export takes a run folder")
    best, report_path = run_dir / CHECKPOINTS / "best.safetensors", run_dir / "report.json"
    if not best.is_file():
        raise UserError(f"{run_dir} has no trained model ({CHECKPOINTS}/best.safetensors): its training saved none")
    if not report_path.is_file() or report_path.stat().st_mtime < best.stat().st_mtime:
        raise UserError(
            f"{run_dir} is not finished: its best checkpoint has no final report after it (the training was stopped, "
            f"failed or is running); finish it first: robustdistill train {run_dir} --resume"
        )
    report = read_report(report_path)
    bad = failed(report.get("checks", []))
    if bad and not allow_failed_checks:
        names = ", ".join(f"{c['id']} {c['name']}" for c in bad)
        raise UserError(
            f"{run_dir} failed sanity check{'s' if len(bad) > 1 else ''} {names}: its numbers are not to be "
            "trusted; pass --allow-failed-checks to export it anyway (the manifest lists them)"
        )
    return report


def _check_robustbench(report: dict[str, Any], dataset: str, name: str) -> None:
    if dataset not in ROBUSTBENCH_DATASETS:
        raise UserError(
            f"--format robustbench: RobustBench has leaderboards for {', '.join(ROBUSTBENCH_DATASETS)}, not {dataset}"
        )
    if "autoattack" not in report["attacks"]:
        raise UserError(
            "--format robustbench needs the run's accuracy under the standard AutoAttack, which its final report "
            "lacks (train it with eval.attacks including autoattack)"
        )
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise UserError(f"--name '{name}' must be a file name (RobustBench's model name)")


def _write(fmt, model, meta, example, folder, report, cfg, name) -> tuple[dict[str, str], tuple[Runner, str]]:
    """Write the format's files into `folder`; returns them and the reader of what was written."""
    if fmt == "onnx":
        return write_onnx(model, example, folder, meta.spec), onnx_runner(folder)
    if fmt == "torchscript":
        return write_torchscript(model, example, folder, meta.spec), torchscript_runner(folder)
    if fmt == "safetensors":
        return write_safetensors(model, meta, folder), safetensors_runner(folder)
    threat = report_threat(report)
    weights, info = robustbench_paths(cfg.data.name, threat.norm, name)
    (folder / weights).parent.mkdir(parents=True)
    (folder / info).parent.mkdir(parents=True)
    write_state_dict(model, folder / weights)
    model_info = robustbench_info(report, cfg, meta.spec.name, name)
    atomic_write(folder / info, lambda t: Path(t).write_text(json.dumps(model_info, indent=2) + "\n"))
    return {"model": weights, "model_info": info}, state_dict_runner(folder / weights, meta.spec)


def robustbench_info(report: dict[str, Any], cfg, architecture: str, name: str) -> dict[str, Any]:
    """RobustBench's model_info for the run: its fields, its percentages as strings with two decimals.
    `link`, `authors` and `venue` are left for the submitter to fill in."""
    threat = report_threat(report)
    attacks, extra = report["attacks"], report["data"].get("extra")
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    notes = [f"Distilled by robustdistill {__version__} ({cfg.method.name})."]
    if extra:
        notes.append(f"It uses {extra.get('images', 'some')} additional images ({extra.get('source', 'data.extra')}).")
    return {
        "link": "",
        "name": name,
        "authors": "",
        "additional_data": bool(extra),
        "number_forward_passes": 1,
        "dataset": cfg.data.name,
        "venue": "",
        "architecture": ARCHITECTURES.get(architecture, architecture),
        "eps": eps_text(threat.eps, threat.norm),
        "clean_acc": pct(attacks["clean"]["accuracy"]) if "clean" in attacks else "",
        "reported": pct(attacks["autoattack"]["accuracy"]),
        "autoattack_acc": pct(attacks["autoattack"]["accuracy"]),
        "footnote": " ".join(notes),
    }


def _parity(model: torch.nn.Module, runner: Runner, runtime: str, x: torch.Tensor, atol: float, rtol: float) -> Parity:
    with torch.no_grad():
        want = torch.cat([model(x[i : i + 128]) for i in range(0, len(x), 128)])
    got = torch.cat([runner(x[i : i + 128].contiguous()) for i in range(0, len(x), 128)]).float()
    if got.shape != want.shape:
        return Parity(len(x), 0, float("inf"), atol, rtol, runtime, False)
    diff = (got - want).abs()
    equal = int((got.argmax(1) == want.argmax(1)).sum())
    within = bool((diff <= atol + rtol * want.abs()).all())
    return Parity(len(x), equal, float(diff.max()), atol, rtol, runtime, within and equal == len(x))


def _manifest(run_dir, folder, fmt, files, report, meta, x, parity: Parity) -> dict[str, Any]:
    threat, attacks, spec = report_threat(report), report["attacks"], meta.spec
    accuracy = {
        attack: {"value": attacks[attack]["accuracy"], "interval_95": attacks[attack]["accuracy_interval"]}
        for attack in attacks
    }
    return {
        "format": fmt,
        "files": {
            role: {"path": path, "sha256": _sha256(folder / path)} for role, path in files.items() if role != "opset"
        },
        **({"onnx_opset": int(files["opset"])} if files.get("opset", "None") != "None" else {}),
        "input": {
            "shape": ["batch", *x.shape[1:]],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "normalisation": "none" if spec.mean is None else f"inside the model (mean {spec.mean}, std {spec.std})",
        },
        "output": f"logits, shape [batch, {spec.num_classes}]",
        "dataset": report["data"]["name"],
        "classes": report["data"]["class_names"],
        "image_size": list(x.shape[1:]),
        "threat_model": {"norm": threat.norm, "eps": threat.eps, "eps_text": eps_text(threat.eps, threat.norm)},
        "accuracy": accuracy,
        "accuracy_note": (
            f"from the run's final report ({report.get('created')}) on {report['data']['num_samples']} "
            f"{report['data'].get('split', 'test')} images; intervals: 95 % Wilson intervals over those images"
        ),
        "autoattack": "autoattack" in attacks,
        "sanity_checks_failed": [f"{c['id']} {c['name']}" for c in failed(report.get("checks", []))],
        "model": {"architecture": spec.to_dict(), "epoch": meta.epoch, "method": meta.method},
        "run": str(run_dir),
        "config_sha256": _sha256(run_dir / "config.yaml"),
        "parity": asdict(parity),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"robustdistill": __version__, "torch": torch.__version__},
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
