"""Model registry (timm-style): `create_model(spec)`, the `model` config section, `ModelSpec`.

Every model takes images in [0, 1] (NCHW) and returns logits; the optional mean/std
normalisation lives inside the model (`Classifier.normalize`), as attack code expects.

A model name is a registered one (`robustdistill list models`) or a user's factory written
`package.module:function` (the current folder is searched too, after the installed packages):
`function(num_classes=..., in_channels=..., **kwargs)` must return an `nn.Module`. The name is
stored in every checkpoint's spec, so evaluating or resuming imports the same factory again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A network behind an optional input normalisation; the unit every checkpoint stores."""

    def __init__(self, net: nn.Module, mean: Optional[list[float]] = None, std: Optional[list[float]] = None):
        super().__init__()
        self.normalize = Normalize(mean, std) if mean is not None else nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model; stored in every checkpoint this tool writes."""

    name: str
    num_classes: int
    in_channels: int = 3
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_user_model(name: str) -> bool:
    """Whether `name` is a user's factory (`package.module:function`) rather than a registered model."""
    return ":" in name


def model_builder(name: str, key: str = "model") -> Callable[..., nn.Module]:
    """The builder of model `name`: a registered model, or a user's factory imported from
    `package.module:function` (a one-line ConfigError when it cannot be imported or called so)."""
    if not is_user_model(name):
        return MODELS.get(name)
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{key}.name '{name}': a user's model is written package.module:function")
    if os.getcwd() not in sys.path:  # a module beside the config, as `python -m` would find it
        sys.path.append(os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything while importing
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{key}.name '{name}': cannot import it ({type(exc).__name__}: {first})") from None
    if not callable(found):
        raise ConfigError(f"{key}.name '{name}' is a {type(found).__name__}, not a function that builds a model")
    try:
        params = inspect.signature(found).parameters
    except (TypeError, ValueError):
        return found
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [p for p in ("num_classes", "in_channels") if p not in params and not takes_any]
    if missing:
        raise ConfigError(
            f"{key}.name '{name}' must take num_classes and in_channels (and its options as keywords); "
            f"it does not take {', '.join(missing)}"
        )
    return found


def check_model_kwargs(name: str, kwargs: dict[str, Any], key: str = "model") -> None:
    """Raise a ConfigError naming the option if `kwargs` does not fit model `name`."""
    builder = model_builder(name, key)
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # a factory taking **kwargs says itself what it refuses
    allowed = [p for p in params if p not in ("num_classes", "in_channels")]
    for k in kwargs:
        if k not in allowed:
            raise ConfigError(
                f"{key}.kwargs.{k} is not an option of model '{name}'; allowed: {', '.join(allowed) or 'none'}"
            )


def _build(name: str, kwargs: dict[str, Any], key: str, num_classes: int, in_channels: int) -> nn.Module:
    check_model_kwargs(name, kwargs, key)
    try:
        built = model_builder(name, key)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a builder rejects bad options with many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}.kwargs {kwargs} do not build model '{name}': {first}") from None
    if not isinstance(built, nn.Module):
        raise ConfigError(f"model '{name}' returned a {type(built).__name__}, not a torch.nn.Module")
    return built


def check_model_builds(name: str, kwargs: dict[str, Any], key: str = "model") -> None:
    """Build the model on the meta device (no memory, no compute): bad options fail here, at config time."""
    with torch.device("meta"):
        _build(name, kwargs, key, num_classes=10, in_channels=3)


def create_model(spec: ModelSpec) -> Classifier:
    net = _build(spec.name, spec.kwargs, "model", spec.num_classes, spec.in_channels)
    return Classifier(net, spec.mean, spec.std)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, then back in the mode it was in (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


@dataclass
class ModelConfig:
    name: str = "resnet18"  # a registered model (robustdistill list models) or a factory package.module:function
    normalize: bool = False  # put the dataset's mean/std normalisation inside the model
    kwargs: dict[str, Any] = field(default_factory=dict)  # architecture options, e.g. {width: 32}

    def validate(self, key: str = "model") -> None:
        check_model_builds(self.name, self.kwargs, key)
