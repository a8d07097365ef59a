"""DDP on CPU (gloo): two ranks launched by torchrun train one run; adaptive state agrees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustdistill.attacks import EvalSettings
from robustdistill.core.threat import ThreatModel
from robustdistill.core.timing import intra_op_threads
from robustdistill.evaluation.suite import evaluate_model
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


def _torchrun_digits(which: str, out: Path, *overrides: str) -> list[dict]:
    """Two epochs of the digits recipe `which` on two gloo ranks through the CLI (2 PGD steps); the
    run's epoch records, after checking that it finished."""
    cmd = [
        *TORCHRUN,
        str(ROOT / "configs" / "digits" / f"{which}.yaml"),
        f"out_dir={out}",
        "train.epochs=2",
        "attack.steps=2",
        "train.device=cpu",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [r for r in read_metrics(out / which) if r["type"] == "epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["absld", "bmtard"])
def test_torchrun_two_ranks(tmp_path, trained_runs, digits, which):
    teachers = [f"teachers.robust.path={trained_runs['trades']}"]
    if which == "bmtard":
        teachers.append(f"teachers.clean.path={trained_runs['natural']}")
    epochs = _torchrun_digits(which, tmp_path, *teachers)
    run = tmp_path / which
    assert [r["epoch"] for r in epochs] == [1, 2]  # one writer: rank 0
    # each rank takes half of every global batch: 64 / 2 per step, as many steps as one process
    assert epochs[0]["step"] == len(digits.train) // 64
    # the sharded, all-reduced evaluation equals a single-process evaluation of the same checkpoint
    report = json.loads((run / "report.json").read_text())
    model, _ = load_model(run / "checkpoints" / "best.safetensors")
    single = evaluate_model(model, digits.test, EvalSettings(ThreatModel(0.2), step_size=0.05, attacks=("clean",)), 10)
    assert report["attacks"]["clean"] == single["attacks"]["clean"]
    # the loop all-gathers the adaptive state every epoch and stops if ranks disagree; it moved:
    assert epochs[-1]["temperature_adv"] != ([1.0] * 10 if which == "absld" else 1.0) or epochs[-1]["weight_adv"] != 0.5


@pytest.mark.slow
@pytest.mark.parametrize("which", ["saad", "ciard"])
def test_torchrun_two_ranks_trains_saads_average_and_ciards_teacher(tmp_path, trained_runs, which):
    """SAAD's weight average (its BatchNorm recomputed on each rank's share, then averaged) and
    CIARD's online robust teacher (its gradients averaged over the ranks) under torchrun: the run
    finishes, the ranks agree (the loop checks every epoch), and the average and the teacher moved."""
    import torch

    overrides = [f"teachers.robust.path={trained_runs['trades']}"]
    if which == "saad":
        overrides.append("method.average_from=1")
    else:
        overrides += [f"teachers.clean.path={trained_runs['natural']}", "method.teacher_from=1", "train.decay_from=0"]
    epochs = _torchrun_digits(which, tmp_path, "eval.attacks=[clean]", *overrides)
    run = tmp_path / which
    assert [r["epoch"] for r in epochs] == [1, 2]
    state = torch.load(run / "checkpoints" / "train_state.pt", weights_only=True)
    if which == "saad":
        assert [r["average_updated"] for r in epochs] == [True, True] and state["average"] is not None
    else:
        teacher = state["method"]["robust_teacher"]
        loaded, _ = load_model(trained_runs["trades"] / "checkpoints" / "best.safetensors")
        original = loaded.state_dict()
        assert any(not torch.equal(teacher[k], original[k]) for k in teacher if teacher[k].is_floating_point())


# --- the collectives, fast: two gloo processes, uneven shards, against one process on the union ---

# the samples of a tiny split: 10 of them, 3 per block, so rank 0 owns blocks 0 and 2 (6 samples)
# and rank 1 blocks 1 and 3 (4): uneven shards, with classes spread unevenly over the ranks
N, BLOCK = 10, 3
LABELS = [0, 1, 2, 2, 0, 1, 1, 2, 0, 2]
LOSSES = [0.5, 1.25, 2.0, 0.75, 3.0, 0.25, 1.5, 2.5, 0.125, 1.0]  # their sums are exact in float32


def _collectives(rank: int, world: int) -> dict:
    """What the adaptive state and the evaluation assembly give on this rank's shard (the whole
    split when world is 1): the numbers every rank of a DDP run must agree on with one process."""
    import torch

    from robustdistill.core.distributed import all_reduce_mean, any_rank, assemble, from_main, owned_indices
    from robustdistill.methods.balance import ClassWiseTemperature, EntropyBalance, LossBalance

    mine = owned_indices(N, BLOCK, rank, world)
    y, losses = torch.tensor(LABELS)[mine], torch.tensor(LOSSES)[mine]
    out = {"verdicts": assemble(losses > 1, mine, N).tolist()}  # each rank's verdicts, assembled
    temperature = ClassWiseTemperature(3)  # ABSLD: the class-wise error risk, summed over every rank
    temperature.accumulate(losses, y)
    temperature.update(0.1)
    out["tau"] = temperature.tau.tolist()
    # EBB and NLB: batch means, weighted by each rank's count (the global batch's mean on any shards).
    # EBB moves by the sign of h_adv / h_nat - 1: the mean loss 1.2875 against 1.285 is above it on all
    # ten samples and on rank 0's six (1.3125), below it on rank 1's four (1.25) and in the unweighted
    # mean of the two ranks' means (1.28125)
    entropy, weights = EntropyBalance(), LossBalance()
    for step in range(3):
        entropy.update(losses.mean(), torch.tensor(1.285), 0.5, len(mine))
        weights.update(torch.stack([(losses ** (step + 1)).mean(), losses.mean()]), 0.3, len(mine))
    out["ebb"], out["nlb"] = entropy.tau.tolist(), weights.w.tolist()
    out["mean"] = all_reduce_mean(torch.stack([losses.mean(), (losses * losses).mean()]), len(mine)).tolist()
    # SAAD's weights: the entropy's minimum and the weights' maximum are the global batch's
    from robustdistill.methods.sample_weighting import saad_weights

    logits = 3 * torch.randn(N, 3, generator=torch.Generator().manual_seed(3))
    w, v = saad_weights(logits[mine])
    out["saad"] = (assemble(w, mine, N).tolist(), assemble(v, mine, N).tolist())
    out["any"] = (any_rank(rank == 0, "cpu"), any_rank(False, "cpu"))
    out["from_main"] = from_main(lambda: f"chosen by rank {rank}")
    return out


def _evaluation(rank: int, world: int) -> dict:
    """`evaluate` of a tiny linear model on 20 images in blocks of 8 (rank 0: 12 images, rank 1: 8),
    every attack and check assembled over the ranks."""
    import torch
    from torch import nn

    from robustdistill.attacks import EvalSettings
    from robustdistill.data import Split
    from robustdistill.evaluation.suite import evaluate_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[::4] = (y[::4] + 1) % 3  # a quarter of the labels wrong: clean accuracy 75 %
    settings = EvalSettings(ThreatModel(0.05), step_size=0.0125, attacks=("clean", "pgd3"), batch_size=2, checks=True)
    return json.loads(json.dumps(evaluate_model(model, Split(x, y), settings, 3, rank, world)))


def _collectives_worker(rank, port, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results[rank] = (_collectives(rank, 2), _evaluation(rank, 2))
    finally:
        dist.destroy_process_group()


def test_every_collective_gives_every_rank_the_one_process_numbers_on_uneven_shards():
    """The all-reduces behind the verdicts, ABSLD's class-wise risk, EBB and NLB, and `from_main`:
    two gloo ranks holding 6 and 4 samples get what one process gets on all 10. Without any one of
    these all-reduces a rank would see only its own shard, and this fails."""
    import torch.multiprocessing as mp

    with intra_op_threads(1):  # as the workers; the suite's own thread count is restored after
        one, evaluation = _collectives(0, 1), _evaluation(0, 1)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_collectives_worker, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        got, got_evaluation = results[rank]
        assert got["verdicts"] == one["verdicts"] and got["tau"] == one["tau"], f"rank {rank}"
        assert got["ebb"] == one["ebb"] and got["nlb"] == pytest.approx(one["nlb"], rel=1e-6), f"rank {rank}"
        assert got["mean"] == pytest.approx(one["mean"], rel=1e-6), f"rank {rank}"
        for ours, theirs in zip(got["saad"], one["saad"]):
            assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7), f"rank {rank}"
        assert got["any"] == (True, False) and got["from_main"] == "chosen by rank 0"
        assert got_evaluation == evaluation, f"rank {rank}"
    assert one["tau"] != [1.0, 1.0, 1.0] and one["nlb"] != [0.5, 0.5] and one["ebb"] != [1.0, 1.0]  # it moved
    assert min(one["saad"][0]) == 0.0 and max(one["saad"][1]) == pytest.approx(1.0)  # the global batch: one 0, one 1
    assert evaluation["attacks"]["pgd3"]["accuracy"] < evaluation["attacks"]["clean"]["accuracy"]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fast_autoattack(patch=setattr):
    """10 APGD iterations instead of 100: the same code paths, a fraction of the time. `patch`: how
    (monkeypatch.setattr in the test's own process, undone after it; plain setattr in a worker process
    that ends with the test)."""
    import pyautoattack.autoattack as aa_module
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    patch(aa_module, "APGDAttack", lambda *a, **k: APGDAttack(*a, **{**k, "n_iter": 10}))
    patch(aa_module, "APGDAttack_targeted", lambda *a, **k: APGDAttack_targeted(*a, **{**k, "n_iter": 10}))


EVAL_ATTACKS = ["clean", "fgsm", "pgd20", "cw30", "autoattack_fast", "square", "transfer"]


def _evaluate_digits(model_path, surrogate_path, rank=0, world_size=1, patch=setattr):
    from conftest import digits_config
    from robustdistill.data import load_dataset

    _fast_autoattack(patch)
    digits = load_dataset(digits_config(Path("."), "natural").data)
    model, _ = load_model(model_path)
    surrogate, _ = load_model(surrogate_path)
    settings = EvalSettings(
        ThreatModel(0.2),
        step_size=0.05,
        batch_size=8,
        restarts=2,
        square_queries=50,
        checks=True,
        checks_subset=70,
        attacks=tuple(EVAL_ATTACKS),
    )
    with intra_op_threads(1):
        out = evaluate_model(
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


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_process_exactly(trained_runs, monkeypatch):
    """Blocks of samples per rank and per-sample randomness: every attack (AutoAttack and Square
    included), every sanity check and every class-wise number is the single-process one."""
    import torch.multiprocessing as mp

    paths = (
        str(trained_runs["trades"] / "checkpoints" / "best.safetensors"),
        str(trained_runs["natural"] / "checkpoints" / "best.safetensors"),
    )
    single = _evaluate_digits(*paths, patch=monkeypatch.setattr)
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


@pytest.mark.slow
def test_torchrun_eval_through_the_cli_writes_one_report_equal_to_one_processes(tmp_path, trained_runs):
    """`torchrun ... -m robustdistill eval RUN` joins the group and splits the samples (eval blocks of
    4 x 32 images: rank 0 attacks blocks 0 and 2, rank 1 block 1); rank 0 alone creates, locks and
    writes one folder, whose report is the one-process report (less its time of creation)."""
    import shutil

    run = tmp_path / "trades"
    shutil.copytree(trained_runs["trades"], run)  # eval folders are created inside a run folder
    flags = ["--batch-size", "32", "--attacks", "clean,pgd20"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def evaluate_cli(*launch, out=()):
        command = [*launch, "-m", "robustdistill", "eval", str(run), *flags, *out]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    def report(folder):
        document = json.loads((folder / "report.json").read_text())
        document.pop("created")
        return document

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    evaluate_cli(sys.executable, out=["--out", str(tmp_path / "one")])
    done = evaluate_cli(*torchrun, out=["--out", str(tmp_path / "two")])
    one = report(tmp_path / "one")
    assert report(tmp_path / "two") == one and done.stdout.count("report: ") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".robustdistill-lock",
        *sorted(["classwise.png", "report.json", "report.md"]),
    ]
    before = {p.name for p in run.iterdir()}
    evaluate_cli(*torchrun)  # without --out: one new eval-<time> folder in the run, not one per rank
    (created,) = {p.name for p in run.iterdir()} - before
    assert created.startswith("eval-") and report(run / created) == one
    assert 0 < one["attacks"]["pgd20"]["accuracy"] < one["attacks"]["clean"]["accuracy"]


@pytest.mark.slow
def test_torchrun_trains_with_extra_data_streamed_from_array_files(tmp_path, digits):
    """Two ranks through the CLI: the digits as an .npz, noisy copies mixed into every batch at 0.5,
    both streamed from their files; an epoch is one pass over the original images, and the report
    names the extra set."""
    import numpy as np
    import torch

    pool = digits.train
    x = (pool.x * 255).round().to(torch.uint8).numpy()
    np.savez(tmp_path / "digits.npz", image=x, label=pool.y.numpy())
    noise = np.random.default_rng(0).normal(0, 20, x.shape)
    np.savez(tmp_path / "noisy.npz", image=np.clip(x + noise, 0, 255).astype(np.uint8), label=pool.y.numpy())
    cmd = [
        *TORCHRUN,
        str(ROOT / "configs" / "digits" / "pgd_at.yaml"),
        f"out_dir={tmp_path}",
        "name=extra",
        "train.epochs=2",
        "attack.steps=2",
        "train.device=cpu",
        "eval.checks=false",
        "eval.attacks=[clean]",
        "data.name=arrays",
        f"data.root={tmp_path / 'digits.npz'}",
        "data.loader=stream",
        "data.extra.source.name=arrays",
        f"data.extra.source.root={tmp_path / 'noisy.npz'}",
        "data.extra.fraction=0.5",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "streamed from the host" in result.stderr
    report = json.loads((tmp_path / "extra" / "report.json").read_text())
    extra = report["data"]["extra"]
    assert extra["fraction"] == 0.5 and extra["images"] == len(pool) and extra["root"].endswith("noisy.npz")
    train_images = report["data"]["train_class_counts"]
    epochs = [r for r in read_metrics(tmp_path / "extra") if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[0]["step"] == sum(train_images) // 32  # 32 original images (and 32 extra) a global batch
