"""Typed configuration: dataclasses loaded from YAML, `key=value` overrides, validation.

A config file is a YAML mapping whose sections mirror the dataclasses below. Dotted overrides
from the command line (`train.epochs=5 method.beta=3 attack.eps=8/255`) are applied to the
raw mapping before it is typed, so an override is checked exactly like a key in the file.
Floats may be written as fractions (`8/255`), the way this field writes its budgets.

Defaults are the CIFAR-10 settings shared by the seed methods (spec/methods.md); the digits
recipes under `configs/digits/` override what the small embedded dataset needs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml

from .attacks import ATTACKS, AttackConfig, EvalSettings
from .data import DATASETS
from .distributed import check_device
from .errors import ConfigError
from .errors import check as _check
from .methods import MethodOptions
from .metrics import SELECTION_METRICS
from .models import check_model_builds
from .schema import apply_overrides, build, read_yaml

log = logging.getLogger("robustdistill")

SEED_LIMIT = 2**32  # seeds are integers in [0, SEED_LIMIT)


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: Optional[str] = None  # folder holding the dataset files (not needed for digits)
    image_size: Optional[int] = None  # resize images to this side (digits: 8 -> e.g. 32)
    val_fraction: float = 0.02  # share of the training pool held out, stratified, for model selection
    test_fraction: float = 0.2  # only for datasets without an official test split (digits)
    split_seed: int = 0  # the train/val(/test) split is a pure function of this seed
    train_subset: Optional[int] = None  # use only the first N (shuffled) training images
    imbalance: Optional[float] = None  # long-tailed training pool: largest / smallest class (CIFAR-10-LT style)
    crop_padding: int = 4  # random crop with this zero padding; 0 disables
    flip: bool = True  # random horizontal flip
    cache: bool = True  # keep decoded images of JPEG datasets (Tiny-ImageNet) as one tensor file
    cache_dir: Optional[str] = None  # where (default: <root>/.robustdistill-cache)

    def validate(self) -> None:
        DATASETS.get(self.name)
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", "must be in (0, 1)")
        _check(self.crop_padding >= 0, "data.crop_padding", "must be >= 0")
        _check(self.image_size is None or self.image_size > 0, "data.image_size", "must be > 0")
        _check(self.train_subset is None or self.train_subset > 0, "data.train_subset", "must be > 0")
        _check(self.imbalance is None or self.imbalance >= 1, "data.imbalance", "must be >= 1 (largest / smallest)")
        _check(0 <= self.split_seed < SEED_LIMIT, "data.split_seed", "must be an integer in [0, 2**32)")


@dataclass
class ModelConfig:
    name: str = "resnet18"
    normalize: bool = False  # put the dataset's mean/std normalisation inside the model
    kwargs: dict[str, Any] = field(default_factory=dict)  # architecture options, e.g. {width: 32}

    def validate(self, key: str = "model") -> None:
        check_model_builds(self.name, self.kwargs, key)


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: list[int] = field(default_factory=lambda: [215, 260, 285])
    lr_gamma: float = 0.1
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
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
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
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.milestones == sorted(self.milestones), "train.milestones", "must be increasing")
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.threads is None or self.threads >= 1, "train.threads", "must be >= 1 (or null: all cores)")
        _check(self.eval_subset is None or self.eval_subset >= 1, "train.eval_subset", "must be >= 1")
        _check(self.momentum >= 0 and self.lr_gamma > 0, "train.momentum", "must be >= 0 (and train.lr_gamma > 0)")
        check_device(self.device, "train.device")
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            _check(self.compile_backend in backends, "train.compile_backend", f"must be one of {', '.join(backends)}")
        _check(
            self.select_metric is None or self.select_metric in SELECTION_METRICS,
            "train.select_metric",
            f"must be one of {', '.join(SELECTION_METRICS)}",
        )


@dataclass
class EvalConfig:
    """The evaluation run at the end of training and by `robustdistill eval` (spec/evaluation.md)."""

    attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20"])  # pgd<N>, cw<N>: N steps
    eps: Optional[float] = None  # None: the training attack's eps
    step_size: Optional[float] = None  # None: eps / 4 (2/255 at 8/255)
    restarts: int = 1  # random restarts of PGD / CW / transfer; a sample must survive all of them
    square_queries: int = 5000
    surrogate: Optional[str] = None  # transfer attack source (run folder or checkpoint); None: the robust teacher
    surrogate_model: Optional[ModelConfig] = None  # the surrogate's architecture, for a foreign state dict
    checks: bool = True  # run the sanity checks of spec/evaluation.md
    checks_subset: int = 500  # images the extra check attacks use
    large_eps: float = 1.0  # the budget of the large-eps check
    batch_size: int = 256
    subset: Optional[int] = None  # evaluate on the first N test images
    seed: int = 0
    fold_batchnorm: bool = True  # PGD / CW steps on the model with batch norm folded into its convolutions

    def validate(self) -> None:
        for name in self.attacks:
            attack = ATTACKS.get(name)
            _check(
                attack.family is None or attack.steps is not None,
                "eval.attacks",
                f"'{name}' needs its steps in the name, e.g. {attack.family}20",
            )
        _check(len(set(self.attacks)) == len(self.attacks), "eval.attacks", "lists an attack twice")
        _check(self.restarts >= 1, "eval.restarts", "must be >= 1")
        _check(self.square_queries >= 1, "eval.square_queries", "must be >= 1")
        _check(self.checks_subset >= 1, "eval.checks_subset", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.eps is None or 0 <= self.eps <= 1, "eval.eps", "must be in [0, 1] (e.g. 8/255)")
        _check(self.step_size is None or 0 < self.step_size <= 1, "eval.step_size", "must be in (0, 1]")
        _check(0 < self.large_eps <= 1, "eval.large_eps", "must be in (0, 1]")
        _check(self.subset is None or self.subset >= 1, "eval.subset", "must be >= 1")
        _check(0 <= self.seed < SEED_LIMIT, "eval.seed", "must be an integer in [0, 2**32)")
        if self.surrogate_model is not None:
            self.surrogate_model.validate("eval.surrogate_model")

    @classmethod
    def config_upgrade(cls, raw: dict[str, Any], key: str) -> dict[str, Any]:
        """Configs written before the attacks' names carried their steps (run folders' config.yaml
        among them) still load: `pgd_steps` and `cw_steps` become the steps in the names of `pgd20`
        and `cw`, with a one-line note."""
        old = {k: raw[k] for k in ("pgd_steps", "cw_steps") if k in raw}
        for k, v in old.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}.{k} must be an integer >= 1 (better: the steps in the attack's name, pgd50)")
        attacks = raw.get("attacks", cls().attacks if "pgd_steps" in old else None)
        bare_cw = isinstance(attacks, list) and "cw" in attacks
        if not old and not bare_cw:
            return raw
        raw = {k: v for k, v in raw.items() if k not in old}
        if isinstance(attacks, list):
            renamed = {"pgd20": f"pgd{old.get('pgd_steps', 20)}", "cw": f"cw{old.get('cw_steps', 30)}"}
            raw["attacks"] = [renamed.get(a, a) if isinstance(a, str) else a for a in attacks]
        given = [f"{key}.{k}={v}" for k, v in old.items()] + ([f"cw in {key}.attacks"] if bare_cw else [])
        log.warning(
            "note: old keys (%s) read as %s.attacks=%s: the steps are in the attack's name now (pgd50, cw30)",
            ", ".join(given),
            key,
            "[" + ", ".join(map(str, raw["attacks"])) + "]" if "attacks" in raw else "its default",
        )
        return raw

    def resolve(self, default_eps: Optional[float]) -> EvalSettings:
        """The settings every evaluation runs with: eps falls back to `default_eps` (the training
        attack's, or a checkpoint's recorded one), the step size to eps / 4. Done once, here."""
        eps = self.eps if self.eps is not None else default_eps
        if eps is None:
            raise ConfigError("no eps known for this model; set eval.eps (--eps), e.g. 8/255")
        step = self.step_size if self.step_size is not None else eps / 4
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(EvalSettings)}
        return EvalSettings(**rest | {"eps": eps, "step_size": step, "attacks": tuple(self.attacks)})


@dataclass
class TeacherConfig:
    """A teacher: a run folder of this tool, or a checkpoint file.

    A safetensors file written by this tool carries its architecture; a plain state dict
    (`.pt`/`.pth`, read with weights_only=True) or a foreign safetensors file needs `model`.
    """

    path: str = ""  # run folder, checkpoint file, or robustbench:<Name>[@<threat>]
    checkpoint: Literal["best", "last"] = "best"  # which checkpoint of a run folder
    model: Optional[ModelConfig] = None
    model_dir: Optional[str] = None  # RobustBench's local model directory (default: models)

    def validate(self, key: str) -> None:
        _check(bool(self.path), f"{key}.path", "is required")
        if self.model is not None:
            self.model.validate(f"{key}.model")


@dataclass
class Config:
    name: Optional[str] = None  # run folder name; default: the config file's stem
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodOptions = field(default_factory=MethodOptions)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        """The folder training writes: `out_dir/name`."""
        return Path(self.out_dir) / (self.name or "run")

    @property
    def default_eps(self) -> float:
        """The budget evaluations of this run default to (`eval.eps` unset): the training attack's."""
        return self.attack.eps

    def validate(self) -> None:
        _check(0 <= self.seed < SEED_LIMIT, "seed", "must be an integer in [0, 2**32)")
        if self.name is not None:  # a folder name inside out_dir, never a path out of it
            plain = self.name not in ("", ".", "..") and not any(c in self.name for c in "/\\\0")
            _check(plain, "name", "must be a folder name (no '/' or '\\', not '..'): the run is out_dir/name")
            _check(len(self.name.encode()) <= 200, "name", "must be at most 200 bytes (file systems allow 255)")
        self.data.validate()
        self.model.validate()
        self.attack.validate()
        self.train.validate()
        self.eval.validate()
        for role, teacher in self.teachers.items():
            teacher.validate(f"teachers.{role}")
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


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ (the folder's own name and location excluded)."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    keys = sorted((set(a) | set(b)) - {"name", "out_dir"})
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    raw = apply_overrides(copy.deepcopy(raw), list(overrides), Config)
    config = build(Config, raw)
    config.validate()
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    config = from_dict(raw, overrides)
    if config.name is None and path is not None:
        config.name = Path(path).stem
    return config
