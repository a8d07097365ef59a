"""The CUDA paths, run on a GPU by `python -m benchmarks.gpu_kit` (and skipped without one): bf16
autocast, channels-last and torch.compile give the eager verdicts, an NCCL group, an exact resume on
the GPU, attacks on the GPU give the CPU's verdicts. `ROBUSTDISTILL_KIT_DEVICE=cpu` (the kit's dry run
on a machine without a GPU, tested in CI) runs the same tests on the CPU, so they cannot rot."""

import copy
import json
import os
import socket

import pytest
import torch

from conftest import digits_config
from robustdistill.attacks import AttackConfig, EvalSettings
from robustdistill.core.threat import ThreatModel
from robustdistill.data import load_dataset
from robustdistill.evaluation.metrics import unpack_verdicts
from robustdistill.evaluation.suite import evaluate_model
from robustdistill.methods import Context, create_method
from robustdistill.models import ModelSpec, create_model
from robustdistill.models.checkpoint import load_model
from robustdistill.training.config import load_config
from robustdistill.training.loop import train

pytestmark = pytest.mark.cuda
KIT_DEVICE = os.environ.get("ROBUSTDISTILL_KIT_DEVICE")  # "cpu": the GPU kit's dry run


@pytest.fixture(scope="module")
def device() -> str:
    if KIT_DEVICE:
        return KIT_DEVICE
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here (python -m benchmarks.gpu_kit runs these on one)")
    return "cuda"


@pytest.fixture(scope="module")
def trained(device, tmp_path_factory):
    """A digits CNN trained briefly on the device, and the digits data."""
    tmp = tmp_path_factory.mktemp("cuda")
    cfg = digits_config(tmp, "natural", train__epochs=3, train__milestones="[]", train__device=device)
    cfg.eval.checks = False
    run = train(cfg)
    model, _ = load_model(run / "checkpoints" / "best.safetensors")
    return model.eval(), load_dataset(cfg.data)


def _agreement(a: dict, b: dict, attack: str, n: int) -> float:
    va = unpack_verdicts(a["attacks"][attack]["verdicts"], n)
    vb = unpack_verdicts(b["attacks"][attack]["verdicts"], n)
    return float((va == vb).mean())


def test_a_bf16_autocast_training_step_is_finite_and_close_to_fp32(device):
    torch.manual_seed(0)
    spec = (
        ModelSpec("resnet18", 10, 3, {}) if device.startswith("cuda") else ModelSpec("small_cnn", 10, 3, {"width": 8})
    )
    student = create_model(spec).to(device)
    teacher = create_model(spec).to(device).eval()
    ctx = Context(student, student, 10, AttackConfig(eps=8 / 255, step_size=2 / 255, steps=3), {"robust": teacher})
    method = create_method(load_config(None, ["method=rslad"]).method, ctx)
    x, y = torch.rand(32, 3, 32, 32, device=device), torch.randint(0, 10, (32,), device=device)
    results = []
    for amp in (False, True):
        student.zero_grad()
        torch.manual_seed(1)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = method.loss(x, y)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters()])
        results.append((loss.detach().float(), grads.float()))
    (fp32, g32), (bf16, g16) = results
    assert torch.isfinite(bf16) and torch.isfinite(g16).all()
    assert abs(bf16 - fp32) <= 0.1 * abs(fp32) + 1e-4, (bf16.item(), fp32.item())
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.95


def test_channels_last_and_compile_give_the_eager_verdicts(device, trained):
    model, data = copy.deepcopy(trained[0]).to(device), trained[1]
    split = data.test.take(torch.arange(128)).to(device)
    settings = EvalSettings(ThreatModel(0.2), step_size=0.05, attacks=("clean", "pgd20"))
    eager = evaluate_model(model, split, settings, 10)
    last = evaluate_model(model.to(memory_format=torch.channels_last), split, settings, 10)
    backend = "inductor" if device.startswith("cuda") else "aot_eager"  # the dry run: the tracing, not codegen
    compiled = evaluate_model(torch.compile(model, backend=backend), split, settings, 10)
    for other in (last, compiled):
        assert _agreement(eager, other, "clean", 128) == 1.0
        assert _agreement(eager, other, "pgd20", 128) >= 0.97  # a few verdicts at the boundary may flip


def test_a_process_group_initialises_and_all_reduces(device):
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        value = torch.arange(4.0, device=device)
        dist.all_reduce(value)
        assert value.tolist() == [0.0, 1.0, 2.0, 3.0] and dist.get_backend() == backend
    finally:
        dist.destroy_process_group()


def test_a_resume_on_the_device_is_bit_identical(device, tmp_path):
    def cfg(name, epochs):
        c = digits_config(tmp_path, "natural", name=name, train__epochs=epochs, train__device=device)
        c.train.milestones, c.eval.checks, c.eval.attacks = [1], False, ["clean"]
        return c

    straight = train(cfg("straight", 2))
    train(cfg("resumed", 1))
    resumed = train(cfg("resumed", 2), resume=True)
    a, _ = load_model(straight / "checkpoints" / "last.safetensors")
    b, _ = load_model(resumed / "checkpoints" / "last.safetensors")
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    report = json.loads((resumed / "report.json").read_text())
    assert report["attacks"]["clean"]["accuracy"] > 0.5


def test_attacks_on_the_device_give_the_cpus_verdicts(device, trained):
    model, data = copy.deepcopy(trained[0]), trained[1]
    split = data.test.take(torch.arange(96))
    settings = EvalSettings(ThreatModel(0.2), step_size=0.05, attacks=("clean", "pgd20", "autoattack_fast"))
    on_cpu = evaluate_model(model.to("cpu"), split, settings, 10)
    on_device = evaluate_model(model.to(device), split.to(device), settings, 10)
    assert _agreement(on_cpu, on_device, "clean", 96) == 1.0
    for attack in ("pgd20", "autoattack_fast"):
        assert _agreement(on_cpu, on_device, attack, 96) >= 0.95, attack
    assert on_device["attacks"]["pgd20"]["accuracy"] < on_device["attacks"]["clean"]["accuracy"]
