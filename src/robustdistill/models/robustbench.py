"""RobustBench model-zoo entries, read from a local model directory (nothing is downloaded).

A model is named `robustbench:<Name>` (threat model Linf) or `robustbench:<Name>@<threat>`, and
its file is where RobustBench itself keeps it: `<model_dir>/<dataset>/<threat>/<Name>.pt`
(`model_dir` defaults to `models`, RobustBench's default). With the optional `robustbench`
package installed, its own architectures are used; without it, the entries of `ZOO` below are
built from this tool's registry (their state dicts use the same module names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..core.errors import CheckpointError
from ..core.threat import NORMS, ThreatModel
from .base import ModelSpec, create_model
from .checkpoint import load_into, read_state_dict

PREFIX = "robustbench:"

# (dataset, threat model, name) -> (registry model, kwargs); none of these normalise inside the model
ZOO: dict[tuple[str, str, str], tuple[str, dict[str, Any]]] = {
    ("cifar10", "Linf", "Standard"): ("wrn34_10", {"depth": 28, "widen_factor": 10}),
    ("cifar10", "Linf", "Zhang2019Theoretically"): ("wrn34_10", {"depth": 34, "widen_factor": 10, "sub_block1": True}),
    ("cifar10", "Linf", "Carmon2019Unlabeled"): ("wrn34_10", {"depth": 28, "widen_factor": 10}),
}


# RobustBench's budget of each (dataset, threat model) leaderboard its entries are ranked on
ZOO_EPS: dict[tuple[str, str], float] = {
    ("cifar10", "Linf"): 8 / 255,
    ("cifar10", "L2"): 0.5,
    ("cifar100", "Linf"): 8 / 255,
    ("imagenet", "Linf"): 4 / 255,
}


def zoo_threat(target: str, dataset: str) -> Optional[ThreatModel]:
    """The threat model a zoo entry is ranked under (None where this tool does not know its budget);
    an entry of a threat model this tool cannot evaluate is refused in one line."""
    name, threat = parse(target)
    if threat not in NORMS:
        raise CheckpointError(
            f"robustbench:{name}@{threat}: this tool evaluates the {' and '.join(NORMS)} threat models only, "
            f"and would quote a {threat} entry under the wrong one"
        )
    eps = ZOO_EPS.get((dataset, threat))
    return ThreatModel(eps, threat) if eps is not None else None


def is_robustbench(target: str) -> bool:
    return str(target).startswith(PREFIX)


def parse(target: str) -> tuple[str, str]:
    name, _, threat = target[len(PREFIX) :].partition("@")
    return name, threat or "Linf"


def zoo_path(target: str, dataset: str, model_dir: Optional[str] = None) -> Path:
    name, threat = parse(target)
    return Path(model_dir or "models") / dataset / threat / f"{name}.pt"


def zoo_file(target: str, dataset: str, model_dir: Optional[str] = None) -> Path:
    """The local file of a zoo entry; a missing one is an error that says where to put it."""
    name, threat = parse(target)
    path = zoo_path(target, dataset, model_dir)
    if not path.is_file():
        raise CheckpointError(
            f"RobustBench model {name} ({dataset}, {threat}) is not at {path}; put the checkpoint "
            "there (RobustBench's layout <model_dir>/<dataset>/<threat>/<name>.pt) or pass --model-dir"
        )
    return path


def load_robustbench(target: str, dataset, model_dir: Optional[str] = None) -> tuple[nn.Module, ModelSpec, Path]:
    """(model, spec, file) of a zoo entry for `dataset` (a loaded `Dataset`)."""
    name, threat = parse(target)
    path = zoo_file(target, dataset.name, model_dir)
    try:
        from robustbench.utils import load_model as rb_load_model  # optional extra
    except ImportError:
        rb_load_model = None
    if rb_load_model is not None:
        model = rb_load_model(
            model_name=name, model_dir=str(Path(model_dir or "models")), dataset=dataset.name, threat_model=threat
        )
        return model, ModelSpec(f"{PREFIX}{name}", dataset.num_classes, dataset.channels), path
    key = (dataset.name, threat, name)
    if key not in ZOO:
        known = ", ".join(n for d, t, n in ZOO if d == dataset.name and t == threat) or "none"
        raise CheckpointError(
            f"RobustBench entry {name} ({dataset.name}, {threat}) needs the robustbench package "
            f"(pip install 'robustdistill[robustbench]'); built in without it: {known}"
        )
    arch, kwargs = ZOO[key]
    spec = ModelSpec(arch, dataset.num_classes, dataset.channels, dict(kwargs))
    model = create_model(spec)
    load_into(model, read_state_dict(path), path)
    return model, spec, path
