"""`robustdistill compare --executor slurm`: the grid file's slurm section, the torchrun command of a
multi-GPU cell, each run's state from squeue and the run folders; and, against a real one-node SLURM
(`.ci/slurm-up` starts one: Debian's slurm-wlm), a grid submitted with its teacher gives the local
executor's report, and a cell requeued while it trains (`scontrol requeue`, or SLURM's USR2 signal
that submitit answers with checkpoint-and-requeue) ends in the uninterrupted cell's weights."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustdistill.cli import main
from robustdistill.studies.grid import load_grid, plan
from robustdistill.studies.slurm import Job, _write_jobs, states, status_table, torchrun_command
from test_compare import CELL, SHORT
from test_compare import GRID as LOCAL_GRID

# the local compare tests' tiny grid, one seed, with a slurm section
GRID = LOCAL_GRID.replace("seeds: [0, 1]", "seeds: [0]") + "slurm: {time_min: 15}\n"


def _grid(folder: Path, text: str = GRID) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "grid.yaml").write_text(text)
    return folder / "grid.yaml"


# --- without SLURM -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, override, message",
    [
        ("slurm: {gpus: 2}\n", [], "unknown key 'grid.slurm.gpus'"),
        ("slurm: {time_min: 0}\n", [], "slurm.time_min must be >= 1"),
        ("slurm: {procs_per_node: 0}\n", [], "slurm.procs_per_node must be >= 1"),
        ("", ["cpus_per_task=0"], "slurm.cpus_per_task must be >= 1"),
        ("", ["partitoin=gpu"], "unknown key 'grid.slurm.partitoin'"),
    ],
)
def test_a_bad_slurm_section_or_override_is_one_error_line(tmp_path, capsys, monkeypatch, extra, override, message):
    monkeypatch.chdir(tmp_path)
    _grid(tmp_path, GRID.replace("slurm: {time_min: 15}\n", extra))
    argv = ["compare", "grid.yaml", "--executor", "slurm", *[a for o in override for a in ("--slurm", o)]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "comparisons").exists()


def test_slurm_overrides_need_the_slurm_executor_and_wait_too(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _grid(tmp_path)
    assert main(["compare", "grid.yaml", "--slurm", "partition=gpu"]) == 2
    assert "needs --executor slurm" in capsys.readouterr().err
    assert main(["compare", "grid.yaml", "--wait"]) == 2
    assert "needs --executor slurm" in capsys.readouterr().err


def test_the_slurm_section_is_read_and_overridden_on_the_command_line(tmp_path):
    path = _grid(tmp_path, GRID.replace("{time_min: 15}", "{time_min: 15, partition: cpu, sbatch: {constraint: x}}"))
    grid = load_grid(path, ["partition=gpu", "gpus_per_node=4", "nodes=2", "mem_gb=32"])
    spec = grid.slurm
    assert (spec.partition, spec.time_min, spec.gpus_per_node, spec.nodes, spec.mem_gb) == ("gpu", 15, 4, 2, 32)
    assert spec.sbatch == {"constraint": "x"} and spec.cpus_per_task == 1 and spec.timeouts == 3


def test_a_multi_gpu_cell_trains_through_torchrun_one_process_per_gpu(tmp_path):
    path = _grid(tmp_path)
    grid = load_grid(path, ["gpus_per_node=4"])
    _, cells = plan(grid, path, tmp_path / "out")
    run, config = cells[0], tmp_path / "cfg.yaml"
    one = torchrun_command(run, config, grid.slurm, 0, ["n1"], "77")
    assert one[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=4" in one and one[-4:] == ["-m", "robustdistill", "train", str(config)]
    grid = load_grid(path, ["gpus_per_node=8", "nodes=3"])
    many = torchrun_command(run, config, grid.slurm, 2, ["n1", "n2", "n3"], "123_4")
    assert {"--nnodes=3", "--node_rank=2", "--rdzv_backend=c10d", "--rdzv_id=123_4", "--nproc_per_node=8"} <= set(many)
    assert f"--rdzv_endpoint=n1:{29500 + 1234}" in many
    # a run with a checkpoint is resumed from its folder; one with a folder but none is replaced
    (run.folder / "checkpoints").mkdir(parents=True)
    assert torchrun_command(run, config, grid.slurm, 0, ["n1"], "5")[-2:] == ["--force"][:0] + [str(config), "--force"]
    (run.folder / "checkpoints" / "train_state.pt").write_bytes(b"x")
    assert torchrun_command(run, config, grid.slurm, 0, ["n1"], "5")[-2:] == [str(run.folder), "--resume"]


def test_each_run_state_comes_from_squeue_the_job_record_and_the_run_folder(tmp_path):
    path = _grid(tmp_path, GRID.replace("seeds: [0]", "seeds: [0, 1, 2]"))
    out = tmp_path / "out"
    teachers, cells = plan(load_grid(path), path, out)
    runs = teachers + cells  # robust, rslad x 3, pgd_at x 3
    log = str(out / "slurm" / "logs" / "x.out")
    _write_jobs(out, {r.name: Job(j, log, 0.0) for r, j in zip(runs, ["9", "10_0", "10_1", "10_2", "10_3", "10_5"])})
    (runs[0].folder).mkdir(parents=True)
    (runs[0].folder / "report.json").write_text("{}")  # finished
    (out / "slurm" / "failed").mkdir(parents=True)
    (out / "slurm" / "failed" / f"{runs[3].name}.txt").write_text("ConfigError: train.lr must be > 0\n")
    queue = {"10_0": ("RUNNING", "None"), "10_1": ("PENDING", "Dependency"), "10_5": ("PENDING", "Priority")}
    found = {s.run.name: s for s in states(runs, out, queue)}
    assert [found[r.name].state for r in runs] == [
        "finished",
        "running",
        "queued",
        "failed",
        "failed",
        "queued",
        "not submitted",
    ]
    assert found[runs[3].name].why == "ConfigError: train.lr must be > 0"
    assert found[runs[4].name].why == "ended without finishing the run"
    assert found[runs[2].name].why == "pending: Dependency"
    table = status_table(list(found.values()))
    assert (
        "10_1" in table
        and log in table
        and table.endswith("7 runs: 1 finished, 1 running, 2 queued, 2 failed, 1 not submitted")
    )


# --- against a real SLURM --------------------------------------------------------------------------


USABLE = {"idle", "mix", "alloc", "comp"}  # node states that run (or will soon run) jobs; comp: a job completing


def _slurm_answers(patience: float = 60.0) -> str:
    """'' when a SLURM with a usable node answers here (waiting up to `patience` seconds for a node
    that is busy finishing a job), else why not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM here: run .ci/slurm-up as root (installs and starts Debian's slurm-wlm)"
    deadline = time.monotonic() + patience
    while True:
        try:
            done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return "sinfo did not answer"
        states = {s.rstrip("*~#!%$@^-") for s in done.stdout.split()}
        if done.returncode == 0 and USABLE & states:
            return ""
        if time.monotonic() > deadline:
            why = (done.stderr or done.stdout).strip()[:100]
            return f"SLURM does not answer with a usable node ({why}): .ci/slurm-up"
        time.sleep(2)


@pytest.fixture
def slurm():
    why = _slurm_answers()
    if why:
        # CI started one (or runs, CI=true, where one must be started): never a silent skip
        if os.environ.get("ROBUSTDISTILL_REQUIRE_SLURM") == "1" or os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def _compare(cwd: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the SLURM jobs inherit it (sbatch --export=ALL)
    argv = [sys.executable, "-m", "robustdistill", "compare", "grid.yaml", "--out", "out", *extra]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr + done.stdout
    return done


def _without_command(path: Path) -> dict:
    report = json.loads(path.read_text())
    report.pop("command")
    return report


@pytest.mark.slow
def test_a_grid_on_slurm_gives_the_local_report_and_submitting_again_submits_nothing(tmp_path, slurm):
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    _grid(local), _grid(cluster)
    _compare(local)
    submitted = _compare(cluster, "--executor", "slurm")
    assert "submitted 1 teachers" in submitted.stderr and "submitted 2 cells as job array" in submitted.stderr
    jobs = json.loads((cluster / "out" / "slurm" / "jobs.json").read_text())
    assert set(jobs) == {"robust", "rslad__seed0", "pgd_at__seed0"}
    waited = _compare(cluster, "--executor", "slurm", "--wait")
    assert "nothing to submit" in waited.stderr and "3 runs: 3 finished" in waited.stdout
    assert _without_command(cluster / "out" / "report.json") == _without_command(local / "out" / "report.json")
    assert (cluster / "out" / "cells.csv").read_bytes() == (local / "out" / "cells.csv").read_bytes()
    status = _compare(cluster, "--status")
    assert "3 runs: 3 finished" in status.stdout
    # the local executor, after the jobs, reuses every run and writes the same report
    again = _compare(cluster)
    assert "0 to train" in again.stderr
    assert (cluster / "out" / "report.json").read_bytes() == (local / "out" / "report.json").read_bytes()


def _job_of(folder: Path, name: str) -> str:
    return json.loads((folder / "out" / "slurm" / "jobs.json").read_text())[name]["job"]


def _squeue_state(job: str) -> str:
    done = subprocess.run(["squeue", "--array", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return done.stdout.strip()


def _until(condition, what: str, *jobs: str, timeout: float = 300) -> None:
    start = time.monotonic()
    while not condition():
        for job in jobs:
            assert _squeue_state(job), f"job {job} left the queue before {what}"
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_cell_requeued_or_signalled_while_it_trains_resumes_to_the_uninterrupted_weights(tmp_path, slurm):
    # one cell, two seeds, long enough (25 epochs of 34 steps) to be caught between its checkpoints
    long = '[train.epochs=25, "train.milestones=[]", attack.steps=2, train.batch_size=32]'
    text = f"""
seeds: [0, 1]
threads: 1
cells:
  pgd_at: {{recipe: pgd_at, overrides: {long}}}
eval: {{attacks: [clean, pgd20], checks: false, subset: 120}}
draws: 200
slurm: {{time_min: 15}}
"""
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    _grid(local, text), _grid(cluster, text)
    _compare(local)
    _compare(cluster, "--executor", "slurm")
    interrupt = {"pgd_at__seed0": ["scontrol", "requeue"], "pgd_at__seed1": ["scancel", "--signal=USR2"]}
    jobs = {name: _job_of(cluster, name) for name in interrupt}
    runs = cluster / "out" / "runs"

    def training() -> bool:  # both jobs running, both past their first checkpoint
        ready = [(runs / n / "checkpoints" / "train_state.pt").exists() for n in interrupt]
        return all(ready) and all(_squeue_state(j) == "RUNNING" for j in jobs.values())

    _until(training, "both cells' first checkpoint", *jobs.values())
    for name, command in interrupt.items():
        subprocess.run([*command, jobs[name]], check=True)
    for name, job in jobs.items():
        _until(lambda j=job: _squeue_state(j) == "PENDING", f"{name} requeued", job)
        # SLURM holds a requeued job back for a while (BeginTime): let it start now
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    _compare(cluster, "--executor", "slurm", "--wait")
    for name in interrupt:
        logs = Path(json.loads((cluster / "out" / "slurm" / "jobs.json").read_text())[name]["log"])
        text = logs.with_name(logs.name.replace(".out", ".err")).read_text() + logs.read_text()
        assert text.count("Starting with JobEnvironment") == 2, f"{name}: the job did not run twice:\n{text}"
        assert "resuming" in text and "after epoch" in text, text
        if "USR2" in " ".join(interrupt[name]):  # submitit's answer to SLURM's signal: checkpoint, requeue
            assert "Caught signal SIGUSR2" in text and "Calling checkpoint method" in text, text
        for which in ("last.safetensors", "best.safetensors"):
            ours = cluster / "out" / "runs" / name / "checkpoints" / which
            assert ours.read_bytes() == (local / "out" / "runs" / name / "checkpoints" / which).read_bytes(), name
    assert (cluster / "out" / "cells.csv").read_bytes() == (local / "out" / "cells.csv").read_bytes()


@pytest.mark.slow
def test_a_failed_job_is_shown_with_its_error_and_log_and_submitting_again_resubmits_it_alone(tmp_path, slurm):
    text = f"""
teachers:
  robust: {{path: no_teacher_here}}
cells:
  rslad: {{recipe: rslad, overrides: {CELL}}}
  pgd_at: {{recipe: pgd_at, overrides: {SHORT}}}
eval: {{attacks: [clean], checks: false, subset: 60}}
threads: 1
"""
    _grid(tmp_path, text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "robustdistill", "compare", "grid.yaml", "--out", "out"]
    done = subprocess.run(
        [*argv, "--executor", "slurm", "--wait"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr  # the report of the cell that finished, the failed one listed
    assert "2 runs: 1 finished, 1 failed" in done.stdout
    assert (
        "no run folder or checkpoint file at no_teacher_here"
        in (tmp_path / "out" / "slurm" / "failed" / "rslad__seed0.txt").read_text()
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["failed"]) == {"rslad__seed0"} and "logs/" in report["failed"]["rslad__seed0"]
    status = _compare(tmp_path, "--status").stdout
    line = next(row for row in status.splitlines() if row.startswith("| rslad__seed0"))
    assert "failed" in line and "no_teacher_here" in line and "_log.out" in line, line
    again = subprocess.run([*argv, "--executor", "slurm"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "submitted 1 cells" in again.stderr, again.stderr
    subprocess.run(["scancel", _job_of(tmp_path, "rslad__seed0")], check=False)


@pytest.mark.slow
def test_a_cell_with_two_processes_trains_through_torchrun_inside_its_job(tmp_path, slurm):
    text = f"""
cells:
  pgd_at: {{recipe: pgd_at, overrides: {CELL}}}
eval: {{attacks: [clean], checks: false, subset: 60}}
threads: 1
slurm: {{procs_per_node: 2, cpus_per_task: 2}}
"""
    _grid(tmp_path, text)
    waited = _compare(tmp_path, "--executor", "slurm", "--wait")
    assert "1 runs: 1 finished" in waited.stdout
    log = Path(json.loads((tmp_path / "out" / "slurm" / "jobs.json").read_text())["pgd_at__seed0"]["log"])
    text = log.with_name(log.name.replace(".out", ".err")).read_text()
    assert "torch.distributed.run --standalone --nnodes=1 --nproc_per_node=2 -m robustdistill train" in text, text
    epochs = [json.loads(line) for line in (tmp_path / "out" / "runs" / "pgd_at__seed0" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in epochs if r["type"] == "epoch"] == [1, 2]  # rank 0 alone writes
