"""Trackers: TensorBoard, Weights & Biases and MLflow follow a run as it trains.

The `logging` section of a config turns each on:

    logging:
      tensorboard: true                                  # event files in RUN/tensorboard/
      wandb: {project: my-project, mode: offline}        # RUN/wandb/; `wandb sync` uploads it later
      mlflow: {tracking_uri: http://mlflow.lab:5000}     # a server, or a file store file:///...

Each receives every record of metrics.jsonl as it is written (its numbers, at the record's step;
a list, such as ABSLD's class-wise temperatures, as one curve per class), the resolved config when
the run starts, and, when it ends, the final report's numbers, report.md / report.json and the
run's figures. A tracker is an optional extra (`pip install 'robustdistill[tensorboard]'`,
`[wandb]`, `[mlflow]`), imported only when its key is set; a missing one is refused before
anything is written. A tracker never stops a run: one that cannot be reached (an MLflow server
down) or fails later is dropped with a warning, and metrics.jsonl and report.json keep every
record in the run folder. Only rank 0 of a torchrun group tracks.

A resumed run continues the same tracker runs (their ids are kept in RUN/trackers.json); the
records after the checkpoint it resumes from are sent again (TensorBoard drops its copies of
them; W&B ignores steps it has seen; MLflow keeps both).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import yaml
from PIL import Image

from ..core.errors import ConfigError
from ..core.schema import flatten
from ..storage.files import atomic_write
from ..storage.runs import TRACKERS_FILE

log = logging.getLogger("robustdistill")


@dataclass
class WandbConfig:
    project: str = "robustdistill"  # the Weights & Biases project
    entity: Optional[str] = None  # the W&B team or user (None: your default entity)
    mode: Literal["offline", "online"] = "offline"  # offline: kept in RUN/wandb/ (`wandb sync` uploads it)

    def validate(self) -> None:
        if not self.project.strip():
            raise ConfigError("logging.wandb.project must not be empty")


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # a server http://host:5000 or a store file:///path; None: MLflow decides
    experiment: str = "robustdistill"  # the MLflow experiment the run is logged under

    def validate(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("logging.mlflow.experiment must not be empty")


@dataclass
class LoggingConfig:
    """Trackers that follow the run besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow
    (each an optional extra)."""

    tensorboard: bool = False  # TensorBoard event files in RUN/tensorboard/ (`tensorboard --logdir runs`)
    wandb: Optional[WandbConfig] = None  # {project, entity, mode}: follow the run in Weights & Biases
    mlflow: Optional[MlflowConfig] = None  # {tracking_uri, experiment}: follow the run in MLflow

    def validate(self) -> None:
        for part in (self.wandb, self.mlflow):
            if part is not None:
                part.validate()

    @property
    def chosen(self) -> list[str]:
        """The trackers turned on, by name."""
        on = {"tensorboard": self.tensorboard, "wandb": self.wandb is not None, "mlflow": self.mlflow is not None}
        return [name for name, wanted in on.items() if wanted]


# tracker -> (the module it needs, the extra that installs it)
EXTRAS = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def require_extra(tracker: str) -> Any:
    """Import the module `tracker` needs, or a one-line ConfigError naming the install command."""
    module, extra = EXTRAS[tracker]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"logging.{tracker} needs the {extra} package, which is not installed: pip install 'robustdistill[{extra}]'"
        ) from None


def check_trackers(cfg: LoggingConfig) -> None:
    """Preflight: each chosen tracker's package imports."""
    for name in cfg.chosen:
        require_extra(name)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's numbers, keyed by `<type>/<field>` (a list of numbers: one key per entry,
    `<type>/<field>/<i>`); booleans, strings and non-finite values are left out."""
    prefix, out = record.get("type", "record"), {}
    for key, value in record.items():
        if key in ("type", "step"):
            continue
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                continue
            out[f"{prefix}/{key}" if i is None else f"{prefix}/{key}/{i}"] = float(item)
    return out


def report_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The final report's numbers: each attack's accuracy, worst class and NSD, and W-Robust Acc."""
    out = {}
    for attack, result in report.get("attacks", {}).items():
        for field in ("accuracy", "worst_class_accuracy", "nsd"):
            value = result.get(field)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"test/{attack}/{field}"] = float(value)
    if "w_robust" in report:
        out["test/w_robust"] = float(report["w_robust"]["value"])
    return out


class Tracker:
    """One tracker's side of a run; `Trackers` calls these and drops a tracker that raises."""

    name = "tracker"
    where = ""  # where it keeps the run, for the messages

    def start(self, run_dir: Path, config: dict[str, Any], resume_step: Optional[int], kept: dict[str, Any]) -> None:
        """Open the tracker's run (`kept`: what `ids` returned before, for a resume)."""

    def ids(self) -> dict[str, Any]:
        """What a resume needs to continue this tracker's run (saved in trackers.json)."""
        return {}

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, values: dict[str, float], step: int, files: list[Path], figures: list[Path]) -> None:
        """The final report's numbers, its files and the figures."""

    def close(self, failed: bool) -> None:
        """End the tracker's run (`failed`: the run stopped on an error)."""


class TensorBoard(Tracker):
    name = "tensorboard"

    def start(self, run_dir, config, resume_step, kept):
        from torch.utils.tensorboard import SummaryWriter

        self.where = f"TensorBoard events in {run_dir / 'tensorboard'}"
        # a resume drops the events after its checkpoint: they are written again
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if resume_step is None:
            self.writer.add_text("config", _yaml_block(config), 0)

    def log(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, values, step, files, figures):
        self.log(values, step)
        for path in files:
            if path.suffix == ".md":
                self.writer.add_text(path.stem, path.read_text(), step)
        for path in figures:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"figures/{path.stem}", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self, failed):
        self.writer.close()


class Wandb(Tracker):
    name = "wandb"

    def __init__(self, cfg: WandbConfig):
        self.cfg = cfg

    def start(self, run_dir, config, resume_step, kept):
        import wandb

        offline = f"W&B offline, in {run_dir / 'wandb'} (`wandb sync` uploads it)"
        self.where = offline if self.cfg.mode == "offline" else f"W&B project {self.cfg.project}"
        resume = {"id": kept["id"], "resume": "allow"} if kept.get("id") else {}
        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            mode=self.cfg.mode,
            # absolute: a wandb-core service this process joins (WANDB_SERVICE, inherited from a parent that
            # used W&B) resolves a relative folder against its own working directory
            dir=str(run_dir.resolve()),
            name=run_dir.name,
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
            **resume,
        )

    def ids(self):
        return {"id": self.run.id}

    def log(self, values, step):
        if step >= self.run.step:  # a resumed run sends records W&B has already seen: it would refuse them
            self.run.log(values, step=step)

    def finish(self, values, step, files, figures):
        import wandb

        self.run.summary.update(values)
        if figures:
            self.run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures}, step=max(step, self.run.step))
        if files:
            artifact = wandb.Artifact(f"{_wandb_name(self.run.name)}-report", type="report")
            for path in files:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def close(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


class Mlflow(Tracker):
    name = "mlflow"

    def __init__(self, cfg: MlflowConfig):
        self.cfg = cfg

    def start(self, run_dir, config, resume_step, kept):
        import mlflow

        with self._env():  # an unreachable server is said at once, not after minutes of retries
            self.client = mlflow.MlflowClient(self.cfg.tracking_uri)
            self.where = f"MLflow at {self.client.tracking_uri}"
            if kept.get("run_id"):
                self.run_id = kept["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            found = self.client.get_experiment_by_name(self.cfg.experiment)
            experiment = found.experiment_id if found else self.client.create_experiment(self.cfg.experiment)
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            params = [mlflow.entities.Param(k, _param(v)) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def ids(self):
        return {"run_id": self.run_id}

    def log(self, values, step):
        import mlflow

        stamp = _millis()
        metrics = [mlflow.entities.Metric(k, v, stamp, step) for k, v in values.items()]
        with self._env():
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, values, step, files, figures):
        self.log(values, step)
        with self._env():
            for path in files:
                self.client.log_artifact(self.run_id, str(path))
            for path in figures:
                self.client.log_artifact(self.run_id, str(path), artifact_path="figures")

    def close(self, failed):
        with self._env():
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def _env(self):
        return _mlflow_env(self.cfg.tracking_uri)


class Trackers:
    """The run's chosen trackers: each call reaches every tracker still on; one that raises is
    dropped with a warning saying where the records are kept instead."""

    def __init__(self, run_dir: Optional[Path] = None, trackers: tuple[Tracker, ...] = ()):
        self.run_dir, self.trackers = run_dir, list(trackers)

    @classmethod
    def open(cls, cfg: LoggingConfig, run_dir: Path, config: dict[str, Any], resume_step: Optional[int]) -> Trackers:
        """Start the trackers `cfg` chooses for the run in `run_dir` (rank 0 only); `resume_step`: the
        checkpoint's step when the run is resumed."""
        chosen = {
            "tensorboard": TensorBoard,
            "wandb": lambda: Wandb(cfg.wandb),
            "mlflow": lambda: Mlflow(cfg.mlflow),
        }
        self = cls(run_dir, tuple(chosen[name]() for name in cfg.chosen))
        if not self.trackers:
            return self
        kept_path = run_dir / TRACKERS_FILE
        kept = _read_json(kept_path) if resume_step is not None else {}
        self._each("start", lambda t: t.start(run_dir, config, resume_step, kept.get(t.name, {})))
        ids = {t.name: t.ids() for t in self.trackers}
        atomic_write(kept_path, lambda tmp: Path(tmp).write_text(json.dumps(ids, indent=1) + "\n"))
        for t in self.trackers:
            log.info("tracking the run: %s", t.where)
        return self

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record, at its step."""
        if not self.trackers:
            return
        values = scalars(record)
        if values:
            self._each("log", lambda t: t.log(values, int(record.get("step", 0))))

    def finish(self, report: dict[str, Any], step: int, figures: list[Path]) -> None:
        """The final report (numbers and files) and the figures, then close each tracker."""
        files = [p for p in (self.run_dir / "report.md", self.run_dir / "report.json") if p.is_file()]
        self._each("finish", lambda t: t.finish(report_scalars(report), step, files, figures))
        self.close(failed=False)

    def close(self, failed: bool) -> None:
        self._each("close", lambda t: t.close(failed))
        self.trackers = []

    def _each(self, what: str, call) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - a tracker's failure must never stop the run
                self.trackers.remove(tracker)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                first = first if len(first) <= 200 else first[:197] + "..."
                log.warning(
                    "WARNING: stopped tracking in %s: its %s failed (%s: %s); the run goes on, its records are "
                    "kept in %s and its report in %s",
                    tracker.where or tracker.name,
                    what,
                    type(exc).__name__,
                    first,
                    self.run_dir / "metrics.jsonl",
                    self.run_dir / "report.json",
                )
                if what != "close":
                    with contextlib.suppress(Exception):
                        tracker.close(failed=True)


def _wandb_name(name: str) -> str:
    """A W&B artifact name from a run name (letters, digits, '-', '_', '.')."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "run"


def _yaml_block(config: dict[str, Any]) -> str:
    text = yaml.safe_dump(config, sort_keys=False)
    return "```yaml\n" + text + "```"  # TensorBoard's text tab renders markdown


def _param(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 500 else text[:497] + "..."  # MLflow's limit on a parameter's value


def _millis() -> int:
    return int(time.time() * 1000)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


@contextlib.contextmanager
def _mlflow_env(tracking_uri: Optional[str]) -> Iterator[None]:
    """MLflow's settings for the block: two HTTP retries and a 10 s timeout, not its default of
    seven retries with backoff (minutes before an unreachable server is known); and a file store,
    when the config names one (file:///path), allowed (MLflow keeps it in maintenance mode and
    refuses it unless MLFLOW_ALLOW_FILE_STORE is set). The user's own settings of these are kept."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    if tracking_uri is not None and (tracking_uri.startswith("file:") or "://" not in tracking_uri):
        wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
    saved = {k: os.environ.get(k) for k in wanted}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
