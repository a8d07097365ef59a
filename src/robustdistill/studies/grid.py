"""A comparison grid: its file, typed and checked, and the runs it stands for.

    grid = load_grid(grid_file("digits_methods"))      # recipes.grid_file: a file, or a shipped grid
    teachers, cells = plan(grid, path, Path("comparisons/digits_methods"))

The grid file's keys are those of `Grid` (see `execute` for an example); `plan` builds and validates
every run's config (recipe or config file, the cell's overrides, the axes' values, the grid's eval
keys and teachers, the seed) before anything runs, and names the runs' folders.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..core.errors import ConfigError, UserError
from ..core.schema import apply_overrides, build, read_yaml
from ..evaluation.report import write_section
from ..recipes import grid_file, recipe, recipe_names
from ..storage.runs import CHECKPOINTS
from ..training.config import Config, from_dict


@dataclass
class RunSpec:
    """A run's config: a digits recipe (`recipe`) or a config file (`config`), with dotted overrides."""

    recipe: Optional[str] = None
    config: Optional[str] = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class TeacherSpec(RunSpec):
    """A teacher the grid trains (`recipe` / `config`) or one given as a run folder or checkpoint (`path`)."""

    path: Optional[str] = None


@dataclass
class CellSpec(RunSpec):
    """A compared method; `teachers` maps one of its roles to another teacher of the grid."""

    teachers: dict[str, str] = field(default_factory=dict)


@dataclass
class SlurmSpec:
    """The grid file's `slurm:` section: what each job asks SLURM for (`compare --executor slurm`;
    `--slurm KEY=VALUE` overrides a key for one submission)."""

    partition: Optional[str] = None  # sbatch --partition (null: the cluster's default)
    account: Optional[str] = None  # sbatch --account
    qos: Optional[str] = None  # sbatch --qos
    time_min: int = 60  # each job's time limit; a run that reaches it is requeued and resumed (`timeouts`)
    timeouts: int = 3  # how many times a job that reached its time limit is requeued (preemptions: always)
    nodes: int = 1  # > 1: the cell trains through torchrun across the nodes (one process per GPU)
    gpus_per_node: int = 0  # > 1: the cell trains through torchrun, one process per GPU
    procs_per_node: Optional[int] = None  # torchrun processes per node; None: one per GPU (1 without GPUs)
    cpus_per_task: int = 1  # CPUs of each node's task (give a GPU cell its data-loading CPUs)
    mem_gb: Optional[float] = None  # memory per node; None: the partition's default
    array_parallelism: int = 256  # cells running at once at most
    signal_delay_s: int = 120  # SLURM signals a job this long before its time limit (it requeues itself)
    setup: list[str] = field(default_factory=list)  # shell lines run before each job (module load ...)
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. {constraint: a100}

    def validate(self, where: str) -> None:
        for key in ("time_min", "nodes", "cpus_per_task", "array_parallelism"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: slurm.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("timeouts", "gpus_per_node", "signal_delay_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}: slurm.{key} must be >= 0, got {getattr(self, key)}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ConfigError(f"{where}: slurm.mem_gb must be > 0 (or null: the partition's default)")
        if self.procs_per_node is not None and self.procs_per_node < 1:
            raise ConfigError(f"{where}: slurm.procs_per_node must be >= 1 (or null: one per GPU)")

    @property
    def procs(self) -> int:
        """Training processes per node: `procs_per_node`, else one per GPU, else one."""
        return self.procs_per_node or max(self.gpus_per_node, 1)


@dataclass
class Grid:
    """A comparison grid file's keys; the comment after each is its meaning (`compare --help` shows them)."""

    cells: dict[str, CellSpec] = field(default_factory=dict)  # name: {recipe | config, overrides, teachers}
    seeds: list[int] = field(default_factory=lambda: [0])  # every cell runs once per seed (3 or more for intervals)
    axes: dict[str, list[Any]] = field(default_factory=dict)  # dotted key: values; every combination is a group
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)  # role: {recipe | config | path}, shared
    eval: dict[str, Any] = field(default_factory=dict)  # eval.* keys of every cell (attacks, subset, ...)
    reference: Optional[str] = None  # a cell every other one is compared with, pair by pair
    pairs: list[list[str]] = field(default_factory=list)  # [cell, cell] pairs whose differences are reported
    draws: int = 2000  # bootstrap draws behind every interval
    threads: Optional[int] = None  # train.threads of every run (a run's own overrides may set another)
    overrides: list[str] = field(default_factory=list)  # dotted overrides of every run, teachers included
    published: dict[str, str] = field(default_factory=dict)  # per cell: what its paper reports, with the source
    slurm: SlurmSpec = field(default_factory=SlurmSpec)  # the jobs' resources under --executor slurm


@dataclass
class GridRun:
    """One run of the grid: a teacher (`cell` None) or a cell at one axis setting and seed."""

    name: str
    folder: Path
    cfg: Config
    cell: Optional[str] = None
    group: int = 0  # the index of its axis setting in `groups(grid)`
    seed: Optional[int] = None


def _yaml_value(value: Any) -> str:
    """A value as an override's right-hand side (YAML flow style reads it back as it was)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _base(spec: RunSpec, where: str, folder: Path, threads: Optional[int]) -> dict[str, Any]:
    """The raw config of a run: its recipe or config file, with the grid's `threads` set in its train
    section (every override, the grid's and the run's own, comes after and may set another)."""
    if (spec.recipe is None) == (spec.config is None):
        raise ConfigError(f"{where}: give either recipe (one of {', '.join(recipe_names())}) or config (a file)")
    if spec.recipe is not None:
        raw = recipe(spec.recipe)
    else:
        path = Path(spec.config)
        raw = read_yaml(path if path.is_absolute() else folder / path)
    section = raw.get("train") or {}
    if threads is not None and isinstance(section, dict):
        raw["train"] = {**section, "threads": threads}
    return raw


def load_grid(path: str | Path, slurm: list[str] = ()) -> Grid:
    """The grid file, typed and checked (unknown keys, names, pairs) before anything runs; `slurm`:
    `KEY=VALUE` overrides of its `slurm:` section."""
    path = Path(path)
    raw = read_yaml(path)
    if slurm:
        section = raw.get("slurm") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: slurm must be a mapping of sbatch resources")
        raw["slurm"] = apply_overrides(section, list(slurm), SlurmSpec)
    grid = build(Grid, raw, "grid")
    grid.slurm.validate(str(path))
    if not grid.cells:
        raise ConfigError(f"{path}: the grid has no cells (cells: {{name: {{recipe: ...}}}})")
    if not grid.seeds or len(set(grid.seeds)) != len(grid.seeds):
        raise ConfigError(f"{path}: seeds must be a list of distinct integers")
    for key, values in grid.axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axes.{key} must be a non-empty list of values")
    named = set(grid.cells)
    if grid.reference is not None and grid.reference not in named:
        raise ConfigError(f"{path}: reference '{grid.reference}' is not a cell ({', '.join(grid.cells)})")
    for pair in grid.pairs:
        if len(pair) != 2 or not set(pair) <= named:
            raise ConfigError(f"{path}: pairs must be [cell, cell] of the grid's cells, got {pair}")
    for name in grid.published:
        if name not in named:
            raise ConfigError(f"{path}: published.{name} is not a cell")
    for name, cell in grid.cells.items():
        for role, other in cell.teachers.items():
            if other not in grid.teachers:
                raise ConfigError(f"{path}: cells.{name}.teachers.{role}: '{other}' is not a teacher of the grid")
    if grid.draws < 100:
        raise ConfigError(f"{path}: draws must be >= 100")
    return grid


def prepare(grid_path: str | Path, out: Optional[str | Path], into: Optional[str | Path] = None, slurm: list[str] = ()):
    """The grid (its `slurm:` section with the `KEY=VALUE` overrides `slurm`), its file, its folder
    (default comparisons/<grid name>) and its runs, all checked; `into`'s markers checked too."""
    grid_path = grid_file(grid_path)
    grid = load_grid(grid_path, slurm)
    out = Path(out) if out is not None else Path("comparisons") / grid_path.stem
    teachers, cells = plan(grid, grid_path, out)
    if into is not None:
        write_section(into, f"compare:{grid_path.stem}")  # the markers are there, before anything runs
    return grid, grid_path, out, teachers, cells


def plan(grid: Grid, grid_path: Path, out: Path) -> tuple[list[GridRun], list[GridRun]]:
    """The teachers' runs and the cells' runs, every config built and validated."""
    folder = grid_path.parent
    teachers, paths = [], {}
    common = grid.overrides  # every run's, before the run's own (which may set others)
    for role, spec in grid.teachers.items():
        if spec.path is not None:
            if spec.recipe or spec.config:
                raise ConfigError(f"{grid_path}: teachers.{role}: give path, or recipe / config, not both")
            paths[role] = spec.path
            continue
        where = f"{grid_path}: teachers.{role}"
        raw = _base(spec, where, folder, grid.threads)
        cfg = _config(raw, [*common, *spec.overrides, f"out_dir={out / 'teachers'}", f"name={role}"], where)
        teachers.append(GridRun(role, cfg.run_dir, cfg))
        paths[role] = str(cfg.run_dir)
    evals = [f"eval.{k}={_yaml_value(v)}" for k, v in grid.eval.items()]
    cells = []
    for name, spec in grid.cells.items():
        where = f"{grid_path}: cells.{name}"
        raw = _base(spec, where, folder, grid.threads)
        # the grid's teachers replace the recipe's paths; a role the grid has none for keeps its own
        roles = {r: paths[spec.teachers.get(r, r)] for r in raw.get("teachers", {}) if spec.teachers.get(r, r) in paths}
        for index, group in enumerate(groups(grid)):
            axes = [f"{k}={_yaml_value(v)}" for k, v in group]
            label = "".join(f"__{k}={v}" for k, v in group)
            for seed in grid.seeds:
                run_name = f"{name}{label}__seed{seed}"
                teacher_paths = [f"teachers.{role}.path={_yaml_value(p)}" for role, p in roles.items()]
                extra = [*common, *spec.overrides, *axes, *evals, *teacher_paths, f"seed={seed}"]
                cfg = _config(raw, [*extra, f"out_dir={out / 'runs'}", f"name={run_name}"], f"{where} ({run_name})")
                cells.append(GridRun(run_name, cfg.run_dir, cfg, name, index, seed))
    return teachers, cells


def groups(grid: Grid) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of the axes' values, as ((key, value), ...); one empty group without axes."""
    return list(itertools.product(*[[(k, v) for v in vs] for k, vs in grid.axes.items()]))


def _config(raw: dict[str, Any], overrides: list[str], where: str) -> Config:
    try:
        return from_dict(raw, overrides)
    except UserError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def status(run: GridRun) -> str:
    """finished (report written), partial (a checkpoint to resume from) or new."""
    if (run.folder / "report.json").is_file():
        return "finished"
    if (run.folder / CHECKPOINTS / "train_state.pt").is_file():
        return "partial"
    return "new"
