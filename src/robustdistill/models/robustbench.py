"""RobustBench model-zoo entries, read from a local model directory (nothing is downloaded).

A model is named `robustbench:<Name>` (threat model Linf) or `robustbench:<Name>@<threat>`, and
its file is where RobustBench itself keeps it: `<model_dir>/<dataset>/<threat>/<Name>.pt`
(`model_dir` defaults to `models`, RobustBench's default). With the optional `robustbench`
package installed, its own architectures are used; without it, the entries of
`robustbench_zoo.yaml` (shipped beside this module, with its source) are built from this tool's
registry: their state dicts use the same module names, their input normalisation is the model's,
and their threat model and budget come from the entry's leaderboard, not from the user.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from ..core.errors import CheckpointError
from ..core.schema import parse_float
from ..core.threat import NORMS, ThreatModel
from .base import ModelSpec, create_model
from .checkpoint import load_into, read_state_dict

PREFIX = "robustbench:"


@functools.cache
def zoo_data() -> dict[str, Any]:
    """`robustbench_zoo.yaml`: the entries built natively, their normalisation, the leaderboards' budgets."""
    return yaml.safe_load(resources.files(__package__).joinpath("robustbench_zoo.yaml").read_text())


def zoo_entry(dataset: str, threat: str, name: str) -> Optional[dict[str, Any]]:
    """An entry of the zoo file (None where this tool does not build it natively)."""
    return zoo_data()["entries"].get(dataset, {}).get(threat, {}).get(name)


def zoo_spec(dataset: str, threat: str, name: str, num_classes: int, channels: int) -> ModelSpec:
    """The architecture of a native entry, its normalisation in front of it (as its module applies it)."""
    entry = zoo_entry(dataset, threat, name)
    norm = zoo_data()["normalizations"][entry["normalization"]] if "normalization" in entry else {}
    return ModelSpec(
        entry["model"], num_classes, channels, dict(entry.get("kwargs", {})), norm.get("mean"), norm.get("std")
    )


def zoo_threat(target: str, dataset: str) -> Optional[ThreatModel]:
    """The threat model a zoo entry is ranked under (None where this tool does not know its budget);
    an entry of a threat model this tool cannot evaluate is refused in one line."""
    name, threat = parse(target)
    if threat not in NORMS:
        raise CheckpointError(
            f"robustbench:{name}@{threat}: this tool evaluates the {' and '.join(NORMS)} threat models only, "
            f"and would quote a {threat} entry under the wrong one"
        )
    eps = zoo_data()["budgets"].get(dataset, {}).get(threat)
    return ThreatModel(parse_float(eps, f"the budget of {dataset} {threat}"), threat) if eps is not None else None


def is_robustbench(target: str) -> bool:
    return str(target).startswith(PREFIX)


def parse(target: str) -> tuple[str, str]:
    name, _, threat = target[len(PREFIX) :].partition("@")
    return name, threat or "Linf"


def zoo_path(target: str, dataset: str, model_dir: Optional[str] = None) -> Path:
    name, threat = parse(target)
    return Path(model_dir or "models") / dataset / threat / f"{name}.pt"


def zoo_file(target: str, dataset: str, model_dir: Optional[str] = None) -> Path:
    """The local file of a zoo entry; an entry this tool cannot build, or a missing file, is an error
    that says so (and where to put the file)."""
    name, threat = parse(target)
    if _package_loader() is None and zoo_entry(dataset, threat, name) is None:
        known = ", ".join(zoo_data()["entries"].get(dataset, {}).get(threat, {})) or "none"
        raise CheckpointError(
            f"RobustBench entry {name} ({dataset}, {threat}) is not one this tool builds itself ({known}); "
            "check the name, or install the robustbench package for the others "
            "(pip install 'robustdistill[robustbench]')"
        )
    path = zoo_path(target, dataset, model_dir)
    if not path.is_file():
        raise CheckpointError(
            f"RobustBench model {name} ({dataset}, {threat}) is not at {path}; put the checkpoint "
            "there (RobustBench's layout <model_dir>/<dataset>/<threat>/<name>.pt) or pass --model-dir"
        )
    return path


def _package_loader():
    """The optional robustbench package's `load_model`, or None where it does not import."""
    try:
        from robustbench.utils import load_model  # optional extra
    except ImportError:
        return None
    return load_model


def load_robustbench(target: str, dataset, model_dir: Optional[str] = None) -> tuple[nn.Module, ModelSpec, Path]:
    """(model, spec, file) of a zoo entry for `dataset` (a loaded `Dataset`)."""
    name, threat = parse(target)
    rb_load_model = _package_loader()
    path = zoo_file(target, dataset.name, model_dir)
    if rb_load_model is not None:
        model = rb_load_model(
            model_name=name, model_dir=str(Path(model_dir or "models")), dataset=dataset.name, threat_model=threat
        )
        return model, ModelSpec(f"{PREFIX}{name}", dataset.num_classes, dataset.channels), path
    spec = zoo_spec(dataset.name, threat, name, dataset.num_classes, dataset.channels)
    model = create_model(spec)
    state = read_state_dict(path)
    for key, field in zoo_entry(dataset.name, threat, name).get("state_keys", {}).items():  # its own normalisation
        saved = state.pop(key, None)
        stored = getattr(spec, field)
        if saved is not None and not torch.allclose(saved.flatten().float(), torch.tensor(stored), atol=1e-4):
            raise CheckpointError(
                f"{path}: its {key} {saved.flatten().tolist()} is not {name}'s normalisation {stored}"
            )
    load_into(model, state, path)
    return model, spec, path
