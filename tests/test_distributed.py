"""DDP on CPU (gloo): two ranks launched by torchrun train one run; adaptive state agrees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustdistill.attacks import EvalSettings
from robustdistill.evaluation.suite import evaluate
from robustdistill.models.checkpoint import load_model
from robustdistill.storage.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]


TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "-m",
    "robustdistill",
    "train",
]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["absld", "bmtard"])
def test_torchrun_two_ranks(tmp_path, trained_runs, digits, which):
    teachers = [f"teachers.robust.path={trained_runs['trades']}"]
    if which == "bmtard":
        teachers.append(f"teachers.clean.path={trained_runs['natural']}")
    cmd = [
        *TORCHRUN,
        str(ROOT / "configs" / "digits" / f"{which}.yaml"),
        f"out_dir={tmp_path}",
        "train.epochs=2",
        "attack.steps=2",
        "train.device=cpu",
        *teachers,
    ]
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
    single = evaluate(model, digits.test, EvalSettings(eps=0.2, step_size=0.05, attacks=("clean",)), 10)
    assert report["attacks"]["clean"] == single["attacks"]["clean"]
    # the loop all-gathers the adaptive state every epoch and stops if ranks disagree; it moved:
    assert epochs[-1]["temperature_adv"] != ([1.0] * 10 if which == "absld" else 1.0) or epochs[-1]["weight_adv"] != 0.5


def _any_rank_worker(rank, port, results):
    import torch.distributed as dist

    from robustdistill.core.distributed import any_rank

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


def _fast_autoattack():
    """10 APGD iterations instead of 100: the same code paths, a fraction of the time."""
    import pyautoattack.autoattack as aa_module
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    aa_module.APGDAttack = lambda *a, **k: APGDAttack(*a, **{**k, "n_iter": 10})
    aa_module.APGDAttack_targeted = lambda *a, **k: APGDAttack_targeted(*a, **{**k, "n_iter": 10})


EVAL_ATTACKS = ["clean", "fgsm", "pgd20", "cw30", "autoattack_fast", "square", "transfer"]


def _evaluate_digits(model_path, surrogate_path, rank=0, world_size=1):
    import torch

    from conftest import digits_config
    from robustdistill.data import load_dataset

    torch.set_num_threads(1)
    _fast_autoattack()
    digits = load_dataset(digits_config(Path("."), "natural").data)
    model, _ = load_model(model_path)
    surrogate, _ = load_model(surrogate_path)
    settings = EvalSettings(
        eps=0.2,
        step_size=0.05,
        batch_size=8,
        restarts=2,
        square_queries=50,
        checks=True,
        checks_subset=70,
        attacks=tuple(EVAL_ATTACKS),
    )
    out = evaluate(
        model.eval(), digits.test.take(slice(0, 100)), settings, 10, rank, world_size, surrogate=surrogate.eval()
    )
    return json.loads(json.dumps(out))


def _eval_worker(rank, port, paths, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results[rank] = _evaluate_digits(*paths, rank=rank, world_size=2)
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_process_exactly(trained_runs):
    """Blocks of samples per rank and per-sample randomness: every attack (AutoAttack and Square
    included), every sanity check and every class-wise number is the single-process one."""
    import torch.multiprocessing as mp

    paths = (
        str(trained_runs["trades"] / "checkpoints" / "best.safetensors"),
        str(trained_runs["natural"] / "checkpoints" / "best.safetensors"),
    )
    single = _evaluate_digits(*paths)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_eval_worker, args=(_free_port(), paths, results), nprocs=2, join=True)
    assert results[0] == single and results[1] == single
    assert 0 < single["attacks"]["pgd20"]["accuracy"] < single["attacks"]["clean"]["accuracy"]


@pytest.mark.slow
def test_two_rank_resume_is_bit_identical_to_the_uninterrupted_run(tmp_path):
    import torch

    def torchrun(*args):
        cmd = [*TORCHRUN, *args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]

    common = [f"out_dir={tmp_path}", "attack.steps=2", "train.device=cpu", "eval.checks=false", "train.milestones=[1]"]
    torchrun(str(ROOT / "configs" / "digits" / "pgd_at.yaml"), "name=straight", "train.epochs=2", *common)
    torchrun(str(ROOT / "configs" / "digits" / "pgd_at.yaml"), "name=resumed", "train.epochs=1", *common)
    torchrun(str(tmp_path / "resumed"), "--resume", "train.epochs=2")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "train_state.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "train_state.pt", weights_only=True)
    assert len(a["rng"]) == 2 and not torch.equal(a["rng"][0], a["rng"][1])  # each rank's own stream is kept
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["rng"], b["rng"]))
