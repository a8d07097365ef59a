"""Model files: safetensors files that carry their architecture, written atomically, and foreign
state dicts loaded with `torch.load(weights_only=True)` only (`storage.files.load_torch`).

A model file written here is `<name>.safetensors` whose header metadata holds its `ModelMeta`
(the `ModelSpec`, and for a training run's files its epoch, dataset, eps and method) as JSON, so
`load_model(path)` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..core.errors import CheckpointError, ConfigError
from ..core.threat import ThreatModel
from ..storage.files import atomic_write, load_torch
from .base import Classifier, ModelSpec, create_model

META_KEY = "robustdistill"


@dataclass(frozen=True)
class ModelMeta:
    """What a model file of this tool records beside its weights. A training run's files say which
    run, epoch, dataset and training budget they come from, so `robustdistill eval FILE` needs no
    config; a file written by hand may hold the spec alone."""

    spec: ModelSpec
    epoch: Optional[int] = None  # the epoch after which it was saved (1-based)
    data: Optional[dict[str, Any]] = None  # the run's `data` config section (typed by data.DataConfig)
    threat: Optional[ThreatModel] = None  # the run's threat model: the default of its evaluations
    method: Optional[str] = None
    run: Optional[str] = None  # the run folder it was written to

    @property
    def eps(self) -> Optional[float]:
        return None if self.threat is None else self.threat.eps

    def to_json(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps(
            {k: v.to_dict() if k in ("spec", "threat") else v for k, v in fields.items() if v is not None}
        )

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> ModelMeta:
        """Typed from the header's JSON; keys this version does not know are ignored (files written
        before the threat model was recorded whole give their `eps`, an L-inf budget)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"spec", "threat"}
        threat = raw.get("threat", {"eps": raw["eps"]} if raw.get("eps") is not None else None)
        extra = {k: v for k, v in raw.items() if k in known}
        return cls(
            ModelSpec(**raw["spec"]), threat=None if threat is None else ThreatModel.from_mapping(threat), **extra
        )


def save_model(path: str | Path, model: torch.nn.Module, meta: ModelMeta | ModelSpec) -> None:
    """Write the model's state dict and its metadata (a bare `ModelSpec`: the architecture only)."""
    if isinstance(meta, ModelSpec):
        meta = ModelMeta(meta)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {META_KEY: meta.to_json()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=header))


def read_model_meta(path: str | Path) -> Optional[ModelMeta]:
    """The metadata this tool stored in a safetensors file, or None for a foreign file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    if META_KEY not in header:
        return None
    try:
        raw = json.loads(header[META_KEY])
        if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict):
            raise ValueError("not a mapping with a spec")
        meta = ModelMeta.from_mapping(raw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path} has broken '{META_KEY}' metadata in its header ({exc}); re-save it with this tool"
        ) from None
    return meta


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    prefix = "module."  # saved from DataParallel / DDP
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    return _unwrap_state_dict(load_torch(path), path)


def load_into(model: Classifier, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load `state` into `model` (keys with or without the `net.` prefix); errors list mismatches."""
    if not any(k.startswith("net.") for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"wrong shapes: {'; '.join(wrong[:3])}")
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:3])}")
            if any(".sub_block1." in k for k in unexpected):
                parts.append(
                    "a TRADES WideResNet checkpoint: set the model's kwargs sub_block1: true "
                    "(model.kwargs.sub_block1=true on the command line; teachers.<role>.model.kwargs for a teacher)"
                )
        raise CheckpointError(f"{path} does not fit the model ({' | '.join(parts)})")
    model.load_state_dict(state)


def load_model(path: str | Path, spec: Optional[ModelSpec] = None) -> tuple[Classifier, Optional[ModelMeta]]:
    """Rebuild and load a model, with its metadata (None for a foreign file). A file of this tool
    needs no `spec`; a foreign one does."""
    path = Path(path)
    meta = None
    if path.suffix == ".safetensors" and path.is_file():
        meta = read_model_meta(path)
    if spec is None:
        if meta is None:
            raise CheckpointError(
                f"{path} does not say which architecture it holds; give the model (name and kwargs) "
                "in the config (e.g. teachers.robust.model.name=wrn34_10)"
            )
        spec = meta.spec
    model = _build(spec, path)
    load_into(model, read_state_dict(path), path)
    return model, meta


def _build(spec: ModelSpec, path: Path) -> Classifier:
    """The model of `spec`, or one line naming the file whose architecture cannot be built here: options
    its builder refuses, or more weights than this machine has memory (a damaged or edited header)."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no compute
            blueprint = create_model(spec)
        need = sum(t.numel() * t.element_size() for t in blueprint.state_dict().values())
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > have:
            raise CheckpointError(
                f"{path} asks for a {spec.name} model of {need / 2**30:.1f} GiB of weights ({spec.kwargs}), more "
                f"than this machine's {have / 2**30:.1f} GiB of memory: is its header damaged or edited?"
            )
        return create_model(spec)
    except (ConfigError, MemoryError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: its model cannot be built here ({first})") from None
