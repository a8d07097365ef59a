"""Typed configuration: dataclasses loaded from YAML, `key=value` overrides, validation.

A config file is a YAML mapping whose sections mirror the dataclasses of `Config`; each section's
class lives beside what it configures (`data.DataConfig`, `models.ModelConfig`,
`attacks.AttackConfig`, `evaluation.config.EvalConfig`, `methods.MethodOptions` and its subclasses,
`models.sources.TeacherConfig`), `TrainConfig` here. Dotted overrides from the command line
(`train.epochs=5 method.beta=3 attack.eps=8/255`) are applied to the raw mapping before it is
typed, so an override is checked exactly like a key in the file. Floats may be written as
fractions (`8/255`), the way this field writes its budgets.

Defaults are the CIFAR-10 settings shared by the seed methods' papers; the digits recipes
(`robustdistill list recipes`) override what the small embedded dataset needs.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml

from ..attacks import AttackConfig
from ..core.distributed import check_device
from ..core.errors import require
from ..core.schema import SEED_LIMIT, apply_overrides, build, flatten, read_yaml
from ..core.threat import ThreatModel
from ..data import DataConfig
from ..evaluation.config import EvalConfig
from ..evaluation.metrics import SELECTION_METRICS
from ..methods import MethodOptions
from ..models import ModelConfig
from ..models.sources import TeacherConfig
from ..recipes import recipe, recipe_names
from .trackers import LoggingConfig


@dataclass
class TrainConfig:
    epochs: int = 300  # training epochs
    batch_size: int = 128  # the global batch (split between the ranks under DDP)
    lr: float = 0.1  # SGD's learning rate before any decay
    momentum: float = 0.9  # SGD's momentum
    weight_decay: float = 2e-4  # SGD's weight decay
    milestones: list[int] = field(
        default_factory=lambda: [215, 260, 285]
    )  # (0-based) epochs from which the lr is multiplied by lr_gamma once more
    lr_gamma: float = 0.1  # the lr's factor at each milestone
    schedule: Literal["step", "cosine_exp"] = "step"  # step: lr_gamma at each milestone; cosine_exp: CIARD's decay
    decay_from: int = 149  # cosine_exp: the (0-based) epoch from which the lr decays (CIARD: 149 of 300)
    eval_every: int = 1  # epochs between validation evaluations (model selection)
    eval_subset: Optional[int] = None  # evaluate selection on the first N validation images
    select_metric: Optional[str] = None  # None: the method's own selection metric
    select_on: Literal["val", "test"] = "val"  # "test" reproduces reference code; never default
    log_every: int = 20  # steps between metrics.jsonl step records
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # intra-op CPU threads (results' bits depend on it); None: torch's default
    amp: bool = False  # bf16 autocast (fp32 master weights); on CPU too, where it is mostly slower
    channels_last: bool = True  # student and teachers channels-last (faster on CPU and CUDA: benchmarks/README.md)
    compile: bool = False  # torch.compile the student (training passes and attacks) and the teachers
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # torch.compile's mode
    compile_backend: str = "inductor"  # a torch._dynamo backend ("eager", "aot_eager": for debugging)
    init_from: Optional[str] = (
        None  # start from these weights (run folder, checkpoint or robustbench:<Name>): fine-tuning
    )

    @property
    def memory_format(self) -> torch.memory_format:
        """The run's models' memory format (`channels_last`): training, its final report and
        `robustdistill eval` of the run all use it, so the three compute the same verdicts."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def validate(self) -> None:
        require(self.epochs >= 1, "train.epochs", "must be >= 1")
        require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        require(self.lr > 0, "train.lr", "must be > 0")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(self.milestones == sorted(self.milestones), "train.milestones", "must be increasing")
        require(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        require(self.log_every >= 1, "train.log_every", "must be >= 1")
        require(self.threads is None or self.threads >= 1, "train.threads", "must be >= 1 (or null: all cores)")
        require(self.eval_subset is None or self.eval_subset >= 1, "train.eval_subset", "must be >= 1")
        require(self.momentum >= 0 and self.lr_gamma > 0, "train.momentum", "must be >= 0 (and train.lr_gamma > 0)")
        if self.schedule == "cosine_exp":
            require(not self.milestones, "train.milestones", "must be [] with train.schedule=cosine_exp")
            require(
                0 <= self.decay_from < self.epochs - 1,
                "train.decay_from",
                f"must be in [0, train.epochs - 1 = {self.epochs - 1}) with train.schedule=cosine_exp",
            )
        check_device(self.device, "train.device")
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            require(self.compile_backend in backends, "train.compile_backend", f"must be one of {', '.join(backends)}")
        require(
            self.select_metric is None or self.select_metric in SELECTION_METRICS,
            "train.select_metric",
            f"must be one of {', '.join(SELECTION_METRICS)}",
        )


@dataclass
class Config:
    name: Optional[str] = None  # run folder name; default: the config file's stem
    seed: int = 0  # the training seed (initial weights, batch order, augmentation, attack starts)
    out_dir: str = "runs"  # the run folder is out_dir/name
    data: DataConfig = field(default_factory=DataConfig)  # the dataset and its split
    model: ModelConfig = field(default_factory=ModelConfig)  # the student
    attack: AttackConfig = field(default_factory=AttackConfig)  # the training attack (the inner maximisation)
    train: TrainConfig = field(default_factory=TrainConfig)  # the optimisation and the loop
    eval: EvalConfig = field(default_factory=EvalConfig)  # the final evaluation
    method: MethodOptions = field(default_factory=MethodOptions)  # the method and its own options
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)  # role (robust, clean) -> the teacher
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # trackers: TensorBoard, W&B, MLflow

    @property
    def run_dir(self) -> Path:
        """The folder training writes: `out_dir/name`."""
        return Path(self.out_dir) / (self.name or "run")

    @property
    def threat(self) -> ThreatModel:
        """The run's threat model (its training attack's eps): what its model files record and what
        its evaluations default to (`eval.eps` unset)."""
        return self.attack.threat

    def validate(self) -> None:
        require(0 <= self.seed < SEED_LIMIT, "seed", "must be an integer in [0, 2**32)")
        if self.name is not None:  # a folder name inside out_dir, never a path out of it
            plain = self.name not in ("", ".", "..") and not any(c in self.name for c in "/\\\0")
            require(plain, "name", "must be a folder name (no '/' or '\\', not '..'): the run is out_dir/name")
            require(len(self.name.encode()) <= 200, "name", "must be at most 200 bytes (file systems allow 255)")
        self.data.validate()
        self.model.validate()
        self.attack.validate()
        self.train.validate()
        self.eval.validate()
        for role, teacher in self.teachers.items():
            teacher.validate(f"teachers.{role}")
        self.logging.validate()
        validate = getattr(self.method, "validate", None)
        if validate is not None:
            validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys that may change when a run is resumed: they do not alter what has been trained so far
# (nor how the best checkpoint was selected). Any other difference is refused by `--resume`.
RESUMABLE = (
    "train.epochs",
    "train.log_every",
    "train.device",
    "eval.attacks",
    "eval.square_queries",
    "eval.surrogate",
    "eval.surrogate_model",
    "eval.checks",
    "eval.checks_subset",
    "eval.large_eps",
    "eval.subset",
)
TRACKING = "logging"  # the trackers' section: it changes nothing of what is trained or measured


def resumable(key: str) -> bool:
    """Whether a resume may change the dotted config key `key` (RESUMABLE, and the trackers)."""
    return key in RESUMABLE or key == TRACKING or key.startswith(TRACKING + ".")


def effective(cfg: Config) -> dict[str, Any]:
    """The config's dotted keys, with a default that has two spellings written one way: eval.large_eps
    null is 1.0 under L-inf (configs written before the L2 threat model hold 1.0 explicitly)."""
    flat = flatten(cfg.to_dict())
    if flat.get("eval.large_eps") is None and (cfg.eval.norm or cfg.attack.norm) == "linf":
        flat["eval.large_eps"] = 1.0
    return flat


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ in meaning (the folder's own name and location excluded)."""
    a, b = effective(old), effective(new)
    keys = sorted((set(a) | set(b)) - {"name", "out_dir"})
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    raw = apply_overrides(copy.deepcopy(raw), list(overrides), Config)
    config = build(Config, raw)
    config.validate()
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config file, or a shipped recipe by its name (`rslad`: `robustdistill list recipes`),
    or the defaults when `path` is None; apply overrides, validate."""
    if path is not None and not Path(path).exists() and str(path) in recipe_names():
        raw = recipe(str(path))
    else:
        raw = read_yaml(path) if path is not None else {}
    config = from_dict(raw, overrides)
    if config.name is None and path is not None:
        config.name = Path(path).stem
    return config
