"""DDP on CPU (gloo): two ranks launched by torchrun train one run; adaptive state agrees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustdistill.checkpoint import load_model
from robustdistill.evaluate import EvalSettings, evaluate
from robustdistill.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["absld", "bmtard"])
def test_torchrun_two_ranks(tmp_path, trained_runs, digits, which):
    teachers = [f"teachers.robust.path={trained_runs['trades']}"]
    if which == "bmtard":
        teachers.append(f"teachers.clean.path={trained_runs['natural']}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "robustdistill", "train", str(ROOT / "configs" / "digits" / f"{which}.yaml"),
           f"out_dir={tmp_path}", "train.epochs=2", "attack.steps=2", "train.device=cpu", *teachers]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / which
    epochs = [r for r in read_metrics(run) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]  # one writer: rank 0
    # each rank takes half of every global batch: 64 / 2 per step, as many steps as one process
    assert epochs[0]["step"] == len(digits.train) // 64
    # the sharded, all-reduced evaluation equals a single-process evaluation of the same checkpoint
    report = json.loads((run / "report.json").read_text())
    model, _ = load_model(run / "checkpoints" / "best.safetensors")
    single = evaluate(model, digits.test, ["clean"], EvalSettings(eps=0.2, step_size=0.05), 10)
    assert report["attacks"]["clean"] == single["attacks"]["clean"]
    # the loop all-gathers the adaptive state every epoch and stops if ranks disagree; it moved:
    assert epochs[-1]["temperature_adv"] != ([1.0] * 10 if which == "absld" else 1.0) or epochs[-1]["weight_adv"] != 0.5



def _any_rank_worker(rank, port, results):
    import torch.distributed as dist

    from robustdistill.distributed import any_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results[rank] = (any_rank(rank == 0, "cpu"), any_rank(False, "cpu"))
    finally:
        dist.destroy_process_group()


def test_any_rank_tells_every_rank_when_one_sees_a_problem():
    """The loop's non-finite-loss guard: a NaN on one rank stops all ranks, none waits forever."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_any_rank_worker, args=(port, results), nprocs=2, join=True)
    assert dict(results) == {0: (True, False), 1: (True, False)}
