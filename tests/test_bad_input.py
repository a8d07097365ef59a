"""The bad-input catalogue: every mistake a user can make at the command line gets exit code 2 and
one line on stderr that names the key or file and what to do; no traceback, nothing created,
nothing that existed changed. Each case runs the real CLI in-process inside a workspace that holds
the files a careful user might pass by mistake (truncated, pickled, malicious, mislabelled)."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import snapshot
from robustdistill.cli import main
from robustdistill.core.threat import ThreatModel
from robustdistill.evaluation.metrics import sample_metrics
from robustdistill.models import ModelSpec, create_model
from robustdistill.models.checkpoint import ModelMeta, save_model
from robustdistill.storage.runs import MARKER

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"


class Evil:
    """Unpickling this would run a shell command: the loader must refuse and name `system`."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("workspace")
    spec = ModelSpec("small_cnn", 10, 1, {"width": 4})
    model = create_model(spec)
    save_model(
        ws / "model.safetensors",
        model,
        ModelMeta(spec, data={"name": "digits", "val_fraction": 0.2}, threat=ThreatModel(0.2)),
    )
    torch.save(model.net.state_dict(), ws / "state.pt")
    data = (ws / "state.pt").read_bytes()
    (ws / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save(model, ws / "module.pt")
    torch.save({"weights": Evil()}, ws / "evil.pt")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, ws / "broken_meta.safetensors", metadata={"robustdistill": "{not json"})
    save_file(tensors, ws / "bad_spec.safetensors", metadata={"robustdistill": json.dumps({"spec": {"nom": "x"}})})
    (ws / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (ws / "a_file").write_text("not a folder")
    (ws / "broken.yaml").write_text("train: {epochs: 3\n")
    (ws / "list.yaml").write_text("- 1\n- 2\n")
    existing = ws / "runs" / "existing"
    (existing / "checkpoints").mkdir(parents=True)
    (existing / MARKER).write_text("{}")
    (existing / "config.yaml").write_text((DIGITS / "natural.yaml").read_text())
    (ws / "finished_eval").mkdir()
    (ws / "finished_eval" / "report.json").write_text("{}")
    # the inputs of the reliability catalogue (issue 25)
    (ws / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (ws / "twice.yaml").write_text("train: {epochs: 1}\ntrain: {lr: 0.2}\n")
    levels = ['a0: &a0 ["lol", "lol", "lol"]'] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 3)}]" for i in range(1, 12)
    ]
    (ws / "bomb.yaml").write_text("\n".join(levels) + "\n")
    (ws / "huge.yaml").write_text("# " + "x" * 1_100_000 + "\n")
    damaged = ws / "damaged_run"
    damaged.mkdir()
    (damaged / "metrics.jsonl").write_text('{"type": "step", "step": 1}\n{garbage\n{"type": "step", "step": 2}\n')
    (damaged / "report.json").write_text('{"attacks": ')
    damaged_state = ws / "runs" / "damaged_state"
    (damaged_state / "checkpoints").mkdir(parents=True)
    (damaged_state / MARKER).write_text("{}")
    (damaged_state / "config.yaml").write_text((DIGITS / "natural.yaml").read_text())
    (damaged_state / "checkpoints" / "train_state.pt").write_bytes(b"PK\x03\x04 cut short")
    (ws / "ok_run").mkdir()
    (ws / "ok_run" / "metrics.jsonl").write_text('{"type": "step", "step": 1}\n')
    # the inputs of issue 29's catalogue
    _run_folder(ws / "runs" / "no_model", {"epoch": 0, "step": 17, "optimizer": {}})
    state = {"model": {}, "optimizer": {}, "method": {}, "epoch": 29, "step": 510}
    _run_folder(ws / "runs" / "finished", state | {"best_score": 0.9, "best_epoch": 30, "rng": []})
    (ws / "runs" / "linked").symlink_to("existing")
    broken = create_model(spec)
    with torch.no_grad():
        broken.net[0].weight.fill_(float("nan"))
    save_model(
        ws / "nan.safetensors",
        broken,
        ModelMeta(spec, data={"name": "digits", "val_fraction": 0.2}, threat=ThreatModel(0.2)),
    )
    huge = {"spec": {"name": "small_cnn", "num_classes": 10, "in_channels": 1, "kwargs": {"width": 200_000}}}
    huge |= {"eps": 0.2, "data": {"name": "digits", "val_fraction": 0.2}}
    save_file(tensors, ws / "huge.safetensors", metadata={"robustdistill": json.dumps(huge)})
    report = _report(ws / "ok_eval")
    report["attacks"]["clean"]["accuracy"] = 0.99  # a hand-edited number that its verdicts contradict
    (ws / "edited_eval").mkdir()
    (ws / "edited_eval" / "report.json").write_text(json.dumps(report))
    return ws


def _run_folder(folder: Path, state: dict) -> None:
    """A run folder of the natural digits recipe whose train_state.pt holds `state`."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / MARKER).write_text("{}")
    (folder / "config.yaml").write_text((DIGITS / "natural.yaml").read_text())
    torch.save(state, folder / "checkpoints" / "train_state.pt")


def _report(folder: Path) -> dict:
    """A small, consistent report.json in `folder` (clean and pgd20 over 8 images); returns it."""
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    clean = torch.tensor([True, True, True, False, True, True, True, True])
    attacks = {"clean": sample_metrics(clean, y, 4), "pgd20": sample_metrics(clean & (y != 1), y, 4)}
    report = {"data": {"name": "digits", "split": "test", "num_samples": 8}, "attacks": attacks}
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report))
    return report


def train(*args):
    return ["train", str(DIGITS / "natural.yaml"), "out_dir=runs", *args]


def student(*args):
    return ["train", str(DIGITS / "rslad.yaml"), "out_dir=runs", *args]


def teacher(path):
    return student(f"teachers.robust.path={path}", "teachers.robust.model={name: small_cnn, kwargs: {width: 4}}")


def evaluate(*args, target="model.safetensors"):
    return ["eval", target, *args]


CASES = [
    # budgets: finite and inside the image range
    (train("attack.eps=2"), "attack.eps must be in [0, 1]"),
    (train("attack.eps=inf"), "attack.eps must be a finite number"),
    (train("attack.eps=.nan"), "attack.eps must be a finite number"),
    (train("attack.eps=-0.1"), "attack.eps must be in [0, 1]"),
    (train("attack.step_size=0"), "attack.step_size must be in (0, 1]"),
    (train("attack.norm=l1"), "attack.norm must be one of linf, l2, got 'l1'"),
    (
        train("attack.norm=l2", "attack.eps=128"),
        "attack.eps is an L2 budget on images in [0, 1] and must be in [0, 16]",
    ),
    (train("attack.norm=l2", "attack.eps=0.5", "eval.eps=2", "eval.norm=linf"), "eval.eps must be in [0, 1]"),
    (train("attack.steps=0"), "attack.steps must be >= 1"),
    (train("eval.eps=8"), "eval.eps must be in [0, 1]"),
    (train("eval.large_eps=3"), "eval.large_eps must be in (0, 1]"),
    # numbers and names
    (train("train.epochs=0"), "train.epochs must be >= 1"),
    (train("train.lr=-1"), "train.lr must be > 0"),
    (train("train.lr=1/0"), "train.lr must be a number"),
    (train("train.batch_size=0"), "train.batch_size must be >= 1"),
    (train("train.batch_size=100000"), "larger than the training split"),
    (train("train.milestones=[5, 2]"), "train.milestones must be increasing"),
    (train("train.log_every=0"), "train.log_every must be >= 1"),
    (train("train.select_on=both"), "train.select_on must be one of val, test"),
    (train("train.select_metric=best"), "train.select_metric must be one of"),
    (train("train.device=tpu"), "train.device=tpu is not a device"),
    (train("train.device=cuda:x"), "train.device=cuda:x is not a device"),
    (train("train.eval_subset=0"), "train.eval_subset must be >= 1"),
    (train("train.eval_subset=100000"), "train.eval_subset = 100000 is larger than the val split"),
    (train("eval.subset=100000"), "eval.subset = 100000 is larger than the test split"),
    (train("eval.attacks=[clean, bogus]"), "unknown attack 'bogus'"),
    (train("eval.attacks=[clean, clean]"), "eval.attacks lists an attack twice"),
    (train("eval.restarts=0"), "eval.restarts must be >= 1"),
    (train("eval.seed=-3"), "eval.seed must be an integer in [0, 2**32)"),
    (train("seed=1e20"), "seed must be an integer"),
    (train("seed=100000000000000000000"), "seed must be an integer in [0, 2**32)"),
    (train("seed=-1"), "seed must be an integer in [0, 2**32)"),
    (train("data.split_seed=-1"), "data.split_seed must be an integer in [0, 2**32)"),
    (train("data.val_fraction=1.5"), "data.val_fraction must be in [0, 1)"),
    (train("data.name=mnist"), "unknown dataset 'mnist'"),
    (train("data.name=cifar10", "data.root=nowhere"), "cifar-10-batches-py"),
    (train("model.name=vgg"), "unknown model 'vgg'"),
    (train("model.kwargs.width=-4"), "model.kwargs {'width': -4} do not build model 'small_cnn'"),
    (train("model.kwargs.depth=3"), "model.kwargs.depth is not an option of model 'small_cnn'"),
    (train("method.name=nope"), "unknown method 'nope'"),
    (train("method=trades", "method.beta=lots"), "method.beta must be a number"),
    (train("foo.bar=1"), "unknown key 'foo'"),
    (train("train.epochs"), "must look like key=value"),
    (train("--no-such-flag"), "unrecognized arguments: --no-such-flag"),
    # files and folders
    (["train", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "broken.yaml"], "malformed YAML in broken.yaml (line 2"),
    (["train", "list.yaml"], "list.yaml must hold a YAML mapping"),
    (train("name=existing"), "run folder runs/existing already exists; pass --force"),
    (["train", "runs/existing", "--resume"], "cannot resume: runs/existing has no checkpoints/train_state.pt"),
    (["train", "runs/nothing", "--resume"], "--resume takes a run folder with a config.yaml"),
    (train("out_dir=a_file/runs"), "a_file is a file, not a folder"),
    (train("out_dir=.", "name=a_file"), "run folder a_file is an existing file"),
    # teachers: missing, truncated, pickled objects, broken headers
    (
        student("teachers.robust.path=nowhere"),
        "teacher 'robust' (teachers.robust.path): no run folder or checkpoint file at nowhere",
    ),
    (teacher("truncated.pt"), "truncated.pt is truncated or not a PyTorch checkpoint"),
    (teacher("module.pt"), "module.pt holds a whole pickled model, not a state dict"),
    (teacher("evil.pt"), "evil.pt needs the Python object(s) posix.system, which this tool refuses to unpickle"),
    (teacher("broken_meta.safetensors"), "broken_meta.safetensors has broken 'robustdistill' metadata"),
    (teacher("garbage.safetensors"), "garbage.safetensors is not a readable safetensors file"),
    (student("teachers.robust.path=state.pt"), "state.pt does not say which architecture it holds"),
    (
        student("teachers.robust.path=state.pt", "teachers.robust.model={name: small_cnn, kwargs: {width: 8}}"),
        "state.pt does not fit the model (wrong shapes",
    ),
    # eval
    (evaluate("--eps", "2"), "eval.eps must be in [0, 1]"),
    (evaluate("--eps", "inf"), "eval.eps must be a finite number"),
    (evaluate("--step-size", "0"), "eval.step_size must be in (0, "),
    (evaluate("--norm", "l1"), "eval.norm must be one of linf, l2, got 'l1'"),
    (evaluate("--norm", "l2"), "eval.norm=l2 is not the model's threat model (L-inf, eps 0.2): give its budget too"),
    (evaluate("--norm", "l2", "--eps", "128"), "128 looks like 0-255 units"),
    (evaluate("--step-size", "2"), "eval.step_size must be in (0, 1] under L-inf, eps 0.2"),
    (evaluate("--steps", "50"), "--steps is gone: the steps are in the attack's name (--attacks clean,pgd50)"),
    (evaluate("eval.pgd_steps=0"), "eval.pgd_steps must be an integer >= 1"),
    (evaluate("--attacks", "clean,pgd0"), "attack 'pgd0': write the steps as a number >= 1"),
    (evaluate("--attacks", "clean,pgd<N>"), "eval.attacks 'pgd<N>' needs its steps in the name, e.g. pgd20"),
    (evaluate("eval.bogus=1"), "unknown key 'eval.bogus'"),
    (
        evaluate("train.epochs=3"),
        "eval takes eval.*, model.*, data.* and teachers.* overrides, as train does (e.g. eval.subset=100 "
        "model.kwargs.width=16), got 'train.epochs=3'",
    ),
    (evaluate("--subset", "100000"), "eval.subset = 100000 is larger than the test split (359 images)"),
    (evaluate("--attacks", "clean,bogus"), "unknown attack 'bogus'"),
    (evaluate("--attacks", "clean,transfer"), "the transfer attack needs a surrogate"),
    (evaluate("--device", "tpu"), "device=tpu is not a device"),
    (evaluate("--seed", "-1"), "eval.seed must be an integer in [0, 2**32)"),
    (evaluate("--batch-size", "0"), "eval.batch_size must be >= 1"),
    (evaluate("--restarts", "many"), "argument --restarts: invalid int value: 'many'"),
    (evaluate("--out", "a_file"), "--out a_file is an existing file"),
    (evaluate("--out", "a_file/x"), "a_file is a file, not a folder"),
    (evaluate("--out", "finished_eval"), "finished_eval already holds a report"),
    (evaluate("--attacks", "clean,transfer", "--surrogate", "state.pt"), "state.pt does not say which architecture"),
    (evaluate(target="nowhere.pt"), "no run folder or checkpoint file at nowhere.pt"),
    (evaluate(target="truncated.pt"), "does not say which dataset"),
    (evaluate("--data", "digits", target="state.pt"), "no eps known for this model; set eval.eps (--eps)"),
    (
        evaluate("--data", "digits", "--model", "small_cnn", "--eps", "0.2", target="truncated.pt"),
        "truncated.pt is truncated",
    ),
    (
        evaluate("--data", "digits", "--model", "small_cnn", "--eps", "0.2", target="module.pt"),
        "module.pt holds a whole pickled model",
    ),
    (evaluate("--data", "digits", "--model", "small_cnn", "--eps", "0.2", target="evil.pt"), "refuses to unpickle"),
    (evaluate("--data", "digits", "--eps", "0.2", target="state.pt"), "state.pt does not say which architecture"),
    (evaluate(target="broken_meta.safetensors"), "broken 'robustdistill' metadata"),
    (evaluate(target="bad_spec.safetensors"), "bad_spec.safetensors has broken 'robustdistill' metadata"),
    (evaluate(target="garbage.safetensors"), "garbage.safetensors is not a readable safetensors file"),
    (
        evaluate("--data", "digits", "--eps", "0.2", target="robustbench:Nobody2099"),
        "RobustBench entry Nobody2099 (digits, Linf) is not one this tool builds itself",
    ),
    # files that are not what they claim, names that are not folder names, devices that are not here
    (["train", "latin1.yaml"], "latin1.yaml is not UTF-8 text (byte 0xe9"),
    (["train", "twice.yaml"], "twice.yaml: duplicate key 'train' (line 2)"),
    (["train", "bomb.yaml"], "bomb.yaml uses 33 YAML aliases (at most 20)"),
    (["train", "huge.yaml"], "larger than a config can be"),
    (train("name=../escaped"), "name must be a folder name"),
    (train("name=/tmp/elsewhere"), "name must be a folder name"),
    (train("name=" + "n" * 240), "name must be at most 200 bytes"),
    (train("train.device=mps"), "MPS (Apple GPU) is not available here"),
    (train("data.image_size=1"), "model small_cnn does not accept digits images of shape (1, 1, 1)"),
    (["report", "damaged_run"], "damaged_run/report.json is not a readable report"),
    (["report", "model.safetensors"], "model.safetensors is not a readable report"),
    (["report", "finished_eval", "--out", "a_file"], "--out a_file is an existing file"),
    (["plot", "damaged_run"], "damaged_run/metrics.jsonl line 2 is not a JSON record"),
    (["train", "runs/damaged_state", "--resume"], "train_state.pt is truncated or not a PyTorch checkpoint"),
    (["plot", "ok_run", "--out", "a_file"], "--out a_file is an existing file"),
    # issue 29: tracebacks, silently wrong answers and misleading messages, each now one line
    (["train", "runs/no_model", "--resume"], "train_state.pt is not a training state of this tool (it lacks model"),
    (["train", "runs/finished", "--resume", "train.epochs=4"], "train.epochs=4 but runs/finished has already trained"),
    (train("name=linked", "--force"), "--force refuses to delete runs/linked: it is a symbolic link"),
    (evaluate("--no-checks", target="nan.safetensors"), "nan.safetensors has non-finite weights (net.0.weight"),
    (evaluate(target="nan.safetensors"), "nan.safetensors has non-finite weights"),
    (evaluate(target="huge.safetensors"), "huge.safetensors asks for a small_cnn model of"),
    (["report", "edited_eval"], "edited_eval/report.json was edited: its clean accuracy 99.00 % is not what"),
    (["report", "ok_eval", "--attack", "bogus"], "--attack bogus is not in the report of ok_eval (attacks every"),
    (evaluate("--attacks", ","), "eval.attacks must name at least one attack"),
    (["demo", "--epochs", "0"], "--epochs must be >= 1"),
    (train("train="), "override 'train=' would replace the whole train section"),
    (train("data=7"), "override 'data=7' would replace the whole data section"),
    (evaluate("--device", "cuda:9"), "error: device=cuda:9 but"),
    (["train", "rslad", "out_dir=runs"], "at runs/trades; train it first: robustdistill train trades (or"),
    (student("teachers.robust.path=teachers/natural"), "train it first: robustdistill train natural out_dir=teachers"),
    # the other commands
    (["report", "nowhere"], "nowhere has no report.json"),
    (["plot", "nowhere"], "nowhere is not a run folder"),
    (["list", "bogus"], "argument kind: invalid choice: 'bogus'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(
    "args, fragment", CASES, ids=[" ".join(a[2:] if a[0] == "train" else a)[:60] for a, _ in CASES]
)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(workspace, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert fragment in err, err
    assert "Traceback" not in captured.err + captured.out and "\x1b[" not in err
    assert snapshot(workspace) == before  # nothing created, nothing changed


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 50


def test_overrides_may_follow_flags(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    assert main(["train", str(DIGITS / "natural.yaml"), "--print-config", "train.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out


def test_a_foreign_surrogate_takes_its_architecture(workspace, tmp_path, capsys):
    """`--surrogate-model` gives the transfer attack's surrogate the architecture a state dict lacks."""
    torch.save(create_model(ModelSpec("small_cnn", 10, 1)).net.state_dict(), tmp_path / "surrogate.pt")
    out = tmp_path / "eval"
    args = evaluate(
        "--attacks",
        "clean,transfer",
        "--surrogate",
        str(tmp_path / "surrogate.pt"),
        "--subset",
        "20",
        "--no-checks",
        "--out",
        str(out),
        target=str(workspace / "model.safetensors"),
    )
    assert main(args) == 2 and "does not say which architecture" in capsys.readouterr().err
    assert main(args + ["--surrogate-model", "small_cnn"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["num_samples"] == 20 and "transfer" in report["attacks"]


# --- issue 29: what is not an error, but must be said ---------------------------------------------


def test_an_evaluation_without_sanity_checks_says_so(workspace, tmp_path, capsys):
    out = tmp_path / "eval"
    target = str(workspace / "model.safetensors")
    assert main(evaluate("--no-checks", "--subset", "20", "--out", str(out), target=target)) == 0
    assert "sanity checks: not run (eval.checks=false" in capsys.readouterr().out
    assert "Not run (eval.checks=false, --no-checks): nothing here was checked" in (out / "report.md").read_text()


def test_a_naturally_trained_robust_teacher_is_named_in_a_warning(workspace, caplog):
    """The robust teacher's soft labels are what a student learns robustness from: a model this tool
    trained naturally, given in that role, is worth a warning (the run goes on: an ablation may mean it)."""
    from robustdistill.data import DataConfig, load_dataset
    from robustdistill.models.sources import TeacherConfig, load_teacher

    spec = ModelSpec("small_cnn", 10, 1, {"width": 4})
    path = workspace.parent / "natural_teacher.safetensors"
    save_model(
        path, create_model(spec), ModelMeta(spec, data={"name": "digits"}, threat=ThreatModel(0.2), method="natural")
    )
    dataset = load_dataset(DataConfig(name="digits"))
    with caplog.at_level("WARNING", logger="robustdistill"):
        load_teacher("clean", TeacherConfig(path=str(path)), dataset, torch.device("cpu"))
        assert not caplog.records  # the clean teacher is meant to be natural
        load_teacher("robust", TeacherConfig(path=str(path)), dataset, torch.device("cpu"))
    assert "was trained by natural training" in caplog.text and str(path) in caplog.text


def test_a_stray_rank_variable_does_not_silence_a_lone_process(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(train(f"out_dir={tmp_path}", "--estimate")) == 0
    assert "estimate for" in capsys.readouterr().out


def test_ctrl_c_before_the_first_checkpoint_says_the_folder_was_removed(tmp_path, monkeypatch, capsys):
    from robustdistill.methods.natural import Natural

    def interrupted(self, x, y):
        raise KeyboardInterrupt

    monkeypatch.setattr(Natural, "loss", interrupted)
    assert main(train(f"out_dir={tmp_path}")) == 130
    err = capsys.readouterr().err
    assert "was removed: the run stopped before its first checkpoint" in err and "kept" not in err
    assert list(tmp_path.iterdir()) == []
