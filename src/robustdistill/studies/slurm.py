"""`robustdistill compare GRID --executor slurm`: a grid's runs as SLURM jobs, submitted through
submitit (`pip install robustdistill[slurm]`).

    robustdistill compare grid.yaml --out /shared/cmp --executor slurm          # submit what is missing
    robustdistill compare grid.yaml --out /shared/cmp --status                  # every run's state
    robustdistill compare grid.yaml --out /shared/cmp                           # the report, once all finished

The teachers the grid trains are submitted first, one job each; the cells then as one job array that
starts after them (`afterok`). Each job trains, resumes or checks its run folder exactly as the local
executor does (`execute.train_run`), so a cell is the same bits wherever it ran, and the report, built
from the run folders alone, is the same as a local grid's. A job SLURM signals before its time limit
or a preemption requeues itself (submitit's checkpoint/requeue) and the requeued job resumes the run
from its last epoch checkpoint, bit for bit; a job that fails leaves its error in
`OUT/slurm/failed/<run>.txt` and its log path in `OUT/slurm/jobs.json`. Submitting again submits only
the runs that are neither finished nor queued or running.

What is known of each job comes from `squeue` and the run folders, not from SLURM's accounting
database (`sacct`), which many clusters, and the one-node SLURM of the tests, do not have.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core.errors import ConfigError, UserError
from ..evaluation.report import markdown_table
from ..storage.files import atomic_write
from .assemble import publish
from .execute import finished_changes, train_run
from .grid import GridRun, SlurmSpec, prepare, status

log = logging.getLogger("robustdistill")

ACTIVE = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING")  # squeue states of a running job
STUCK = ("DependencyNeverSatisfied",)
STATES = (
    "finished",
    "running",
    "queued",
    "failed",
    "not submitted",
)  # a run's states, in the order shown  # pending reasons of a job that will never start


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(
            "--executor slurm needs submitit: pip install 'robustdistill[slurm]' (or pip install submitit)"
        ) from None
    return submitit


@dataclass
class Job:
    """What the grid's folder records of one submitted run (`OUT/slurm/jobs.json`)."""

    job: str  # SLURM job id (an array task: <array>_<index>)
    log: str  # the job's stdout and, next to it, stderr (.err)
    submitted: float  # unix time


@dataclass
class State:
    """A run's state: finished, running, queued, failed or not submitted (`why`: the reason, the error)."""

    run: GridRun
    state: str
    job: Optional[Job] = None
    why: str = ""


class RunJob:
    """What a SLURM job runs: one run of the grid, trained, resumed or checked as the local executor
    does. Checkpointable for submitit: on SLURM's signal (time limit, preemption) the same call is
    requeued, and it resumes from the run folder's last checkpoint."""

    def __init__(self, run: GridRun, out: Path, spec: SlurmSpec):
        self.run, self.out, self.spec = run, out, spec

    def __call__(self) -> str:
        failure = _failure_file(self.out, self.run.name)
        failure.unlink(missing_ok=True)
        if not log.handlers:  # the job's log says what it did (resumed after epoch N, ...)
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("robustdistill %(levelname)s (%(asctime)s) - %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        try:
            if _distributed(self.spec) and status(self.run) != "finished":
                _torchrun(self.run, self.out, self.spec)
            elif _node() == 0:
                os.environ.setdefault("TQDM_DISABLE", "1")
                train_run(self.run)
        except BaseException as exc:  # recorded for --status, then SLURM sees the job fail
            if not isinstance(exc, SystemExit):  # submitit's own exit after a requeue is not a failure
                failure.parent.mkdir(parents=True, exist_ok=True)
                failure.write_text(f"{type(exc).__name__}: {exc}\n")
            raise
        return str(self.run.folder)

    def checkpoint(self, *args: Any, **kwargs: Any):
        return _submitit().helpers.DelayedSubmission(self, *args, **kwargs)


def _distributed(spec: SlurmSpec) -> bool:
    return spec.nodes > 1 or spec.procs > 1


def _node() -> int:
    return int(os.environ.get("SLURM_NODEID", "0"))


def torchrun_command(
    run: GridRun, config: Path, spec: SlurmSpec, node: int, hosts: list[str], job_id: str
) -> list[str]:
    """The torchrun command line of one node of a multi-process cell (`SlurmSpec.procs`), the nodes
    meeting at the first host (c10d rendezvous); a run with a checkpoint is resumed."""
    if spec.nodes > 1:
        port = 29500 + int("".join(c for c in job_id if c.isdigit()) or "0") % 20000
        launch = [
            f"--nnodes={spec.nodes}",
            f"--node_rank={node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={hosts[0]}:{port}",
            f"--rdzv_id={job_id}",
        ]
    else:
        launch = ["--standalone", "--nnodes=1"]
    command = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={spec.procs}"]
    command += ["-m", "robustdistill", "train"]
    if status(run) == "partial":
        return [*command, str(run.folder), "--resume"]
    return [*command, str(config), *(["--force"] if run.folder.exists() else [])]


def _torchrun(run: GridRun, out: Path, spec: SlurmSpec) -> None:
    env = _submitit().JobEnvironment()
    config = _config_file(out, run.name)
    command = torchrun_command(run, config, spec, env.node, list(env.hostnames), str(env.job_id))
    log.info("slurm: %s", shlex.join(command))
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited with {done.returncode} (the log above says why)")


def _folder(out: Path) -> Path:
    return out / "slurm"


def _failure_file(out: Path, name: str) -> Path:
    return _folder(out) / "failed" / f"{name}.txt"


def _config_file(out: Path, name: str) -> Path:
    return _folder(out) / "configs" / f"{name}.yaml"


def _read_jobs(out: Path) -> dict[str, Job]:
    path = _folder(out) / "jobs.json"
    if not path.is_file():
        return {}
    try:
        return {name: Job(**entry) for name, entry in json.loads(path.read_text()).items()}
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not the grid's job record ({exc}); move it away to submit afresh") from None


def _write_jobs(out: Path, jobs: dict[str, Job]) -> None:
    text = json.dumps({name: vars(job) for name, job in sorted(jobs.items())}, indent=1)
    atomic_write(_folder(out) / "jobs.json", lambda tmp: Path(tmp).write_text(text + "\n"))


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def squeue() -> dict[str, tuple[str, str]]:
    """This user's jobs that SLURM still knows: job id (array tasks one by one) -> (state, reason)."""
    if shutil.which("squeue") is None:
        raise UserError("--executor slurm / --status need SLURM's squeue on this machine's PATH")
    try:
        done = subprocess.run(
            ["squeue", "--me", "--array", "--noheader", "--format=%i|%T|%r"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        raise UserError("squeue did not answer within 120 s; is slurmctld up?") from None
    if done.returncode != 0:
        raise UserError(f"squeue failed: {_last_line(done.stderr) or done.returncode}")
    jobs = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            jobs[parts[0]] = (parts[1], parts[2])
    return jobs


def states(runs: list[GridRun], out: Path, queue: Optional[dict[str, tuple[str, str]]] = None) -> list[State]:
    """Each run's state, from the run folders, the job record and squeue."""
    jobs = _read_jobs(out)
    queue = squeue() if queue is None else queue
    result = []
    for run in runs:
        job = jobs.get(run.name)
        if job is not None and job.job in queue:
            state, reason = queue[job.job]
            if state in ACTIVE:
                result.append(State(run, "running", job, state.lower()))
            else:
                result.append(State(run, "queued", job, state.lower() + (f": {reason}" if reason != "None" else "")))
        elif status(run) == "finished":
            result.append(State(run, "finished", job))
        elif job is not None:
            failure = _failure_file(out, run.name)
            why = failure.read_text().strip() if failure.is_file() else "ended without finishing the run"
            result.append(State(run, "failed", job, why))
        else:
            result.append(State(run, "not submitted", None, status(run)))
    return result


def status_table(found: list[State]) -> str:
    rows = []
    for s in found:
        where = "" if s.job is None else f"{s.job.job}"
        log_path = "" if s.job is None or s.state in ("finished",) else s.job.log
        rows.append([s.run.name, s.state, where, s.why, log_path])
    counts = {state: sum(s.state == state for s in found) for state in STATES}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    return markdown_table(["run", "state", "job", "detail", "log"], rows) + f"\n\n{len(found)} runs: {summary}"


def _executor(out: Path, spec: SlurmSpec, name: str):
    submitit = _submitit()
    executor = submitit.SlurmExecutor(folder=str(_folder(out) / "logs"), max_num_timeout=spec.timeouts)
    extra = {"requeue": True, "chdir": os.getcwd(), **spec.sbatch}
    params: dict[str, Any] = {
        "job_name": name,
        "time": spec.time_min,
        "nodes": spec.nodes,
        "ntasks_per_node": 1,
        "cpus_per_task": spec.cpus_per_task,
        "signal_delay_s": spec.signal_delay_s,
        "array_parallelism": spec.array_parallelism,
        "additional_parameters": extra,
        "setup": list(spec.setup),
    }
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(spec, key) is not None:
            params[key] = getattr(spec, key)
    if spec.mem_gb is not None:
        params["mem"] = f"{int(spec.mem_gb * 1024)}MB"
    executor.update_parameters(**params)
    return executor


def _submit(executor, runs: list[GridRun], out: Path, spec: SlurmSpec, after: list[str]) -> dict[str, Job]:
    if after:
        executor.update_parameters(dependency="afterok:" + ":".join(after))
    try:
        with executor.batch():
            submitted = [(run, executor.submit(RunJob(run, out, spec))) for run in runs]
    except Exception as exc:  # noqa: BLE001 - sbatch's refusal (partition, account, ...) as one line
        raise UserError(f"sbatch refused the jobs: {_last_line(str(exc)) or type(exc).__name__}") from None
    now = time.time()
    return {run.name: Job(job.job_id, str(job.paths.stdout), now) for run, job in submitted}


def submit(teachers: list[GridRun], cells: list[GridRun], out: Path, spec: SlurmSpec, grid_name: str) -> list[State]:
    """Submit every run that is neither finished nor queued or running: the teachers, then the cells
    as one array after them. Returns the runs' states afterwards."""
    queue = squeue()
    before = {s.run.name: s for s in states(teachers + cells, out, queue)}
    stuck = [s for s in before.values() if s.state == "queued" and any(r in s.why for r in STUCK)]
    if stuck:  # waiting on a teacher that failed: they would never start
        ids = [s.job.job for s in stuck]
        log.warning("slurm: cancelling jobs whose dependency failed (%s); they are submitted again", ", ".join(ids))
        subprocess.run(["scancel", *ids], check=False)
        for s in stuck:
            s.state = "failed"
    # a finished run whose config changed only where a resume may (the eval) is submitted to be
    # evaluated again; any other change is refused here, before anything is submitted
    changed = [r for r in teachers + cells if before[r.name].state == "finished" and finished_changes(r)]
    todo = [r for r in teachers + cells if before[r.name].state in ("failed", "not submitted") or r in changed]
    jobs = _read_jobs(out)
    waiting = [before[r.name].job.job for r in teachers if before[r.name].state in ("queued", "running")]
    new_teachers = [r for r in teachers if r in todo]
    new_cells = [r for r in cells if r in todo]
    if new_teachers or new_cells:
        _folder(out).mkdir(parents=True, exist_ok=True)
    if new_teachers:
        added = _submit(_executor(out, spec, f"rd-{grid_name}-teachers"), new_teachers, out, spec, [])
        jobs.update(added)
        _write_jobs(out, jobs)
        waiting += [job.job for job in added.values()]
        log.info("slurm: submitted %d teachers: %s", len(added), ", ".join(f"{n} ({j.job})" for n, j in added.items()))
    for run in todo:  # a multi-GPU run's torchrun reads its config from a file
        path = _config_file(out, run.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, cfg=run.cfg: Path(tmp).write_text(cfg.to_yaml()))
    if new_cells:
        added = _submit(_executor(out, spec, f"rd-{grid_name}"), new_cells, out, spec, waiting)
        jobs.update(added)
        _write_jobs(out, jobs)
        first = next(iter(added.values())).job.split("_")[0]
        after = f" after {', '.join(waiting)}" if waiting else ""
        log.info("slurm: submitted %d cells as job array %s%s", len(added), first, after)
    if not todo:
        log.info("slurm: nothing to submit: every run is finished, queued or running")
    return states(teachers + cells, out)


def wait(runs: list[GridRun], out: Path, poll: float = 10.0) -> list[State]:
    """Poll until no run is queued or running; a progress line whenever the counts change."""
    shown, delay = "", min(2.0, poll)
    while True:
        found = states(runs, out)
        counts = {k: sum(s.state == k for s in found) for k in ("finished", "running", "queued", "failed")}
        line = ", ".join(f"{n} {k}" for k, n in counts.items())
        if line != shown:
            log.info("slurm: %s (of %d)", line, len(found))
            shown = line
        if not counts["running"] and not counts["queued"]:
            return found
        time.sleep(delay)
        delay = min(poll, delay * 1.5)


def check_spec(spec: SlurmSpec, runs: list[GridRun]) -> None:
    """What cannot work on SLURM, before anything is submitted."""
    if spec.gpus_per_node == 0 and any(r.cfg.train.device.startswith("cuda") for r in runs):
        raise ConfigError("a run asks for train.device cuda but the grid's slurm.gpus_per_node is 0")


def compare_on_slurm(
    grid_path: str | Path,
    out: Optional[str | Path] = None,
    command: str = "",
    into: Optional[str | Path] = None,
    overrides: list[str] = (),
    show_status: bool = False,
    wait_for: bool = False,
    poll: float = 10.0,
) -> tuple[Path, bool]:
    """Submit what is missing (or, `show_status`, only print every run's state); `wait_for`: then
    wait until no job is queued or running. The report is written once every run is finished or
    failed, as the local executor writes it. Returns the grid's folder and whether a report was written."""
    grid, grid_path, out, teachers, cells = prepare(grid_path, out, into, list(overrides))
    runs = teachers + cells
    if show_status:
        print(status_table(states(runs, out)))
        return out, False
    check_spec(grid.slurm, runs)
    found = submit(teachers, cells, out, grid.slurm, grid_path.stem)
    if wait_for:
        found = wait(runs, out, poll)
    print(status_table(found))
    if any(s.state in ("queued", "running") for s in found):
        print(f"\njobs are queued or running: robustdistill compare {grid_path} --out {out} --status")
        return out, False
    failed = {s.run.name: f"{s.why} (log: {s.job.log if s.job else '-'})" for s in found if s.state != "finished"}
    teachers_failed = [f"teacher {t.name} failed: {failed[t.name]}" for t in teachers if t.name in failed]
    if teachers_failed:
        raise UserError("; ".join(teachers_failed))
    publish(grid, grid_path, out, cells, failed, command, into)
    return out, True
