import json
import logging
import math

import pytest
import torch
import yaml

from conftest import digits_config, snapshot
from robustdistill.core.errors import ConfigError, TrainingError, UserError
from robustdistill.core.timing import FlopCount, duration, time_left
from robustdistill.data import load_dataset
from robustdistill.storage.runs import read_metrics
from robustdistill.training.builders import lr_decays
from robustdistill.training.config import load_config
from robustdistill.training.estimate import estimate
from robustdistill.training.loop import setup, train


def test_lr_decays_counts_milestones_reached():
    assert [lr_decays(e, [2, 4]) for e in range(6)] == [0, 0, 1, 1, 2, 2]


def test_the_builders_of_a_run_work_one_by_one(tmp_path):
    """`setup` is these builders in a row; each takes only what it needs and can be called alone."""
    from robustdistill.core.distributed import DistInfo
    from robustdistill.training.builders import Optimiser, build_loader, build_method, build_models, build_selection

    cfg = digits_config(tmp_path, "mtard", train__milestones="[2, 4]", train__batch_size=32)
    cfg.teachers = {}  # MTARD's teachers are not needed to build its parts
    cfg.method.name = "natural"
    dataset = load_dataset(cfg.data)
    models = build_models(cfg, dataset, DistInfo(), torch.device("cpu"))
    assert models.student is models.forward is models.attacked and models.teachers == {}  # one process, no compile
    assert models.student(dataset.test.images()[:3]).shape == (3, 10)
    method = build_method(cfg, models, dataset.num_classes)
    assert method.ctx.student is models.forward and method.ctx.num_classes == 10
    optimiser = Optimiser.build(cfg.train, models.student)
    lrs = [optimiser.set_epoch(e) for e in range(6)]
    assert lrs == pytest.approx([cfg.train.lr] * 2 + [cfg.train.lr * 0.1] * 2 + [cfg.train.lr * 0.01] * 2)
    assert optimiser.optimizer.param_groups[0]["lr"] == lrs[-1]
    loader = build_loader(cfg, dataset, DistInfo())
    assert len(loader) == len(dataset.train) // 32
    selection = build_selection(cfg, dataset, method)
    assert (selection.metric, len(selection.split)) == ("clean", len(dataset.val))
    assert selection.settings.threat == cfg.threat
    cfg.train.batch_size = 10_000
    with pytest.raises(ConfigError, match="larger than the training split"):
        build_loader(cfg, dataset, DistInfo())


def test_flop_count_by_hand_and_through_autograd_grad():
    layer = torch.nn.Linear(10, 5)
    x = torch.rand(4, 10, requires_grad=True)
    with FlopCount() as count:
        (grad,) = torch.autograd.grad(layer(x).sum(), x)  # what the inner maximisation does
    # forward 2*4*10*5 = 400; backward to the input 400 (the weight's gradient is not asked for)
    assert count.total == 800 and grad.shape == x.shape
    with FlopCount() as count:
        layer(x.detach()).sum().backward()
    assert count.total == 800  # forward 400 + the weight's gradient 400


def test_flop_count_sees_composite_operators_under_inference_mode():
    """Inference mode (the teachers' soft labels) dispatches conv2d and linear undecomposed."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 3)).eval()
    x = torch.rand(2, 1, 8, 8)
    by_hand = 2 * 2 * 4 * 36 * 9 + 2 * 2 * 144 * 3  # 2 FLOP per MAC x batch x (conv: 4 x 36 x 9; linear: 144 x 3)
    for mode in (torch.no_grad, torch.inference_mode):
        with FlopCount() as count, mode():
            out = model(x)
        assert count.total == by_hand and torch.allclose(out, model(x)), mode.__name__


def test_a_run_folder_has_everything(trained_runs):
    run = trained_runs["trades"]
    assert (run / "config.yaml").is_file() and (run / "report.md").is_file()
    for name in ("best.safetensors", "last.safetensors", "train_state.pt"):
        assert (run / "checkpoints" / name).is_file()
    assert load_config(run / "config.yaml").method.name == "trades"
    records = read_metrics(run)
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, 7))
    assert all("val_robust" in r and "loss" in r for r in epochs)
    # every FLOP of a TRADES step is counted: the 10 attack steps make it several student passes
    assert all(r["gflop_per_s"] > 0 and r["images_per_s"] > 0 for r in epochs)
    assert any(r["type"] == "step" for r in records)
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["split"] == "test" and report["selection"]["split"] == "val"
    # the best checkpoint is the epoch with the highest validation robust accuracy
    best = max(epochs, key=lambda r: r["val_robust"])
    assert report["selection"]["best_epoch"] == best["epoch"]
    assert set(report["attacks"]) == {"clean", "pgd20"}


def test_adversarial_training_buys_robustness(trained_runs):
    reports = {k: json.loads((v / "report.json").read_text()) for k, v in trained_runs.items()}
    natural, trades = reports["natural"]["attacks"], reports["trades"]["attacks"]
    assert natural["clean"]["accuracy"] > 0.9
    assert trades["pgd20"]["accuracy"] > natural["pgd20"]["accuracy"] + 0.2


@pytest.mark.slow
def test_existing_run_folder_is_never_overwritten_silently(tmp_path):
    cfg = digits_config(tmp_path, "natural", train__epochs=1)
    run = train(cfg)
    stamp = (run / "checkpoints" / "last.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError, match="already exists; pass --force"):
        train(cfg)
    assert (run / "checkpoints" / "last.safetensors").stat().st_mtime_ns == stamp
    train(cfg, force=True)
    assert (run / "checkpoints" / "last.safetensors").stat().st_mtime_ns != stamp


def test_force_refuses_to_delete_a_folder_that_is_not_a_run(tmp_path):
    """A folder with a config.yaml is not a run folder: only the tool's marker makes it one."""
    cfg = digits_config(tmp_path, "natural", train__epochs=1, name="precious")
    folder = tmp_path / "runs" / "precious"
    (folder / "data").mkdir(parents=True)
    (folder / "config.yaml").write_text("mine: true\n")
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data" / "raw.csv").write_text("1,2,3")
    before = snapshot(folder)
    with pytest.raises(UserError, match="this tool did not create it"):
        train(cfg, force=True)
    assert snapshot(folder) == before


@pytest.mark.slow
def test_force_replaces_only_what_the_tool_wrote(tmp_path):
    cfg = digits_config(tmp_path, "natural", train__epochs=1, eval__checks="false")
    run = train(cfg)
    (run / "eval-20260101-000000").mkdir()
    (run / "eval-20260101-000000" / "report.json").write_text("{}")
    (run / "checkpoints" / ".last.safetensors.x1.tmp").write_text("left by a killed write")
    (run / "checkpoints" / "average.safetensors").write_text("CFA's weight average (train.fawa)")
    (run / "notes.txt").write_text("my notes")
    (run / "plots").mkdir()
    (run / "plots" / "mine.svg").write_text("<svg/>")
    before = snapshot(run)
    with pytest.raises(UserError, match=r"files this tool did not write \(notes.txt, plots/mine.svg\)"):
        train(cfg, force=True)
    assert snapshot(run) == before
    (run / "notes.txt").unlink()
    (run / "plots" / "mine.svg").unlink()
    train(cfg, force=True)
    assert not (run / "eval-20260101-000000").exists() and (run / ".robustdistill-run").is_file()


def test_time_left_and_durations_by_hand():
    assert time_left(30.0, 3, 7) == pytest.approx(70.0)  # 10 s an epoch, 7 to go
    assert time_left(30.0, 3, 0) == 0.0 and math.isnan(time_left(0.0, 0, 5))
    shown = [duration(s) for s in (0.44, 9.96, 42, 59.6, 60, 725, 3599, 3600, 11220)]
    assert shown == ["0.4s", "10s", "42s", "1m 00s", "1m 00s", "12m 05s", "59m 59s", "1h 00m", "3h 07m"]


@pytest.mark.slow
def test_resume_continues_to_the_same_weights(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="robustdistill"):
        straight = train(
            digits_config(
                tmp_path, "pgd_at", name="straight", train__epochs=2, attack__steps=2, train__milestones="[1]"
            )
        )
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    # the first epoch's line estimates the time the other takes, the last one has nothing left to estimate
    assert len(epochs) == 2 and "to go before the final evaluation)" in epochs[0] and "to go" not in epochs[1]
    cfg = digits_config(tmp_path, "pgd_at", name="resumed", train__epochs=1, attack__steps=2, train__milestones="[1]")
    run = train(cfg)
    cfg.train.epochs = 2
    train(cfg, resume=True)
    a = torch.load(straight / "checkpoints" / "train_state.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "train_state.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit-identical
    assert all(torch.equal(x, y) for x, y in zip(a["rng"], b["rng"]))
    assert [r["epoch"] for r in read_metrics(run) if r["type"] == "epoch"] == [1, 2]
    # the change of train.epochs is recorded, and config.yaml describes the run as it now is
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["changes"] == {"train.epochs": [1, 2]} and history[0]["resumed_after_epoch"] == 1
    assert load_config(run / "config.yaml").train.epochs == 2


@pytest.mark.slow
def test_estimate_times_the_run_and_writes_nothing(tmp_path, capsys):
    from robustdistill.cli import main

    cfg = digits_config(tmp_path, "pgd_at", train__epochs=5, train__eval_every=2, attack__steps=2)
    e = estimate(cfg, steps=3)
    assert not (tmp_path / "runs").exists() and e.folder_note == ""
    assert e.epochs == 5 and e.validations == 3  # after epochs 2, 4 and the last, 5
    assert e.steps_per_epoch == len(setup(cfg, force=False, resume=False, write=False).loader)
    assert e.step > 0 and e.validation > 0
    assert e.total == pytest.approx(5 * e.steps_per_epoch * e.step + 3 * e.validation)
    assert e.final_attacks == tuple(cfg.eval.attacks)
    # an existing run: the estimate says train would refuse it, and leaves it as it was; --resume
    # estimates the epochs still to train
    cfg.train.epochs = 1
    run = train(cfg)
    before = snapshot(run)
    assert "already exists" in estimate(cfg, steps=1).folder_note
    cfg.train.epochs = 3
    assert estimate(cfg, resume=True, steps=1).epochs == 2
    assert main(["train", str(run), "--resume", "--estimate", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "2 epochs" in out and "nothing was written" in out
    assert snapshot(run) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, key",
    [
        ("train.lr=0.3", "train.lr"),
        ("method=trades", "method.name"),
        ("model.kwargs.width=8", "model.kwargs.width"),
        ("attack.eps=0.1", "attack.eps"),
        ("train.threads=2", "train.threads"),  # the thread count changes the float rounding (recipes: 1)
    ],
)
def test_resume_refuses_a_changed_config(tmp_path, change, key):
    from robustdistill.training.config import from_dict

    cfg = digits_config(tmp_path, "pgd_at", train__epochs=1, attack__steps=2, eval__checks="false")
    run = train(cfg)
    before = snapshot(run)
    changed = from_dict(cfg.to_dict(), [change, "train.epochs=2"])
    with pytest.raises(ConfigError, match=rf"--resume refuses to change .*{key}"):
        train(changed, resume=True)
    assert snapshot(run) == before


@pytest.mark.slow
def test_metrics_log_holds_each_record_once_after_a_crash(tmp_path):
    """Records written after the last checkpoint (here: all of epoch 2's) are trimmed on resume."""
    cfg = digits_config(tmp_path, "natural", train__epochs=1, train__log_every=1, eval__checks="false")
    run = train(cfg)
    state = (run / "checkpoints" / "train_state.pt").read_bytes()
    cfg.train.epochs = 2
    train(cfg, resume=True)
    (run / "checkpoints" / "train_state.pt").write_bytes(state)  # as if killed before epoch 2's checkpoint
    train(cfg, resume=True)
    records = read_metrics(run)
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == sorted(set(steps)) and len(steps) == records[-1]["step"]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]


def test_atomic_writes_clean_up_and_keep_normal_permissions(tmp_path):
    import os
    import stat
    from pathlib import Path

    from robustdistill.storage.files import atomic_write

    (tmp_path / ".report.json.abc123.tmp").write_bytes(b"x" * 1000)  # left by a killed write
    (tmp_path / ".other.json.def.tmp").write_bytes(b"y")  # another file's write: not ours to touch
    atomic_write(tmp_path / "report.json", lambda tmp: Path(tmp).write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.def.tmp", "report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~umask


def test_missing_teacher_is_reported_before_anything_is_written(tmp_path):
    cfg = digits_config(tmp_path, "rslad", **{"teachers.robust.path": str(tmp_path / "nowhere")})
    with pytest.raises(UserError, match="teacher 'robust'.*nowhere"):
        train(cfg)
    assert not (tmp_path / "runs").exists()
    cfg = digits_config(tmp_path, "rslad")
    cfg.teachers = {}
    with pytest.raises(ConfigError, match="needs a 'robust' teacher"):
        train(cfg)


def test_teacher_with_wrong_class_count_is_refused(tmp_path):
    from robustdistill.models import ModelSpec, create_model
    from robustdistill.models.checkpoint import save_model

    spec = ModelSpec("small_cnn", 7, 1, {"width": 4})
    save_model(tmp_path / "t7.safetensors", create_model(spec), spec)
    cfg = digits_config(
        tmp_path, "rslad", train__epochs=1, **{"teachers.robust.path": str(tmp_path / "t7.safetensors")}
    )
    with pytest.raises(UserError, match="has 7 outputs but digits has 10 classes"):
        train(cfg)
    assert not (tmp_path / "runs").exists()  # refused before the run folder was written


def test_errors_found_while_loading_write_no_run_folder(tmp_path):
    cfg = digits_config(tmp_path, "natural", train__batch_size=100000)
    with pytest.raises(UserError, match="larger than the training split"):
        train(cfg)
    cfg = digits_config(tmp_path, "natural", data__name="cifar10", **{"data.root": str(tmp_path)})
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    cfg = digits_config(tmp_path, "natural", train__epochs=2, train__lr=1e30)
    with pytest.raises(TrainingError, match="non-finite loss at epoch 1, .*; no checkpoint was written"):
        train(cfg)
    assert not cfg.run_dir.exists()  # it failed before its first checkpoint: no folder is left behind
    # diverging after a checkpoint (the loss turns NaN in the second epoch): the error names the
    # checkpoint, and the folder, resumable from it, stays
    from robustdistill.methods.natural import Natural

    plain = Natural.loss

    def diverging(self, x, y):
        loss, stats = plain(self, x, y)
        return (loss * float("nan") if self.progress.epoch >= 1 else loss), stats

    monkeypatch.setattr(Natural, "loss", diverging)
    cfg = digits_config(tmp_path, "natural", train__epochs=3)
    with pytest.raises(TrainingError, match=f"epoch 2, .*the last good checkpoint is in {cfg.run_dir / 'checkpoints'}"):
        train(cfg)
    assert (cfg.run_dir / "checkpoints" / "train_state.pt").exists()


def test_a_teacher_with_nan_weights_is_named_as_the_cause(tmp_path):
    from robustdistill.models import ModelSpec, create_model
    from robustdistill.models.checkpoint import save_model

    spec = ModelSpec("small_cnn", 10, 1, {"width": 8})
    model = create_model(spec)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_model(tmp_path / "nan.safetensors", model, spec)
    cfg = digits_config(tmp_path, "rslad", **{"teachers.robust.path": str(tmp_path / "nan.safetensors")})
    with pytest.raises(UserError, match="teacher 'robust' .* gives non-finite outputs"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_select_on_test_is_possible_but_explicit(tmp_path):
    run = train(digits_config(tmp_path, "natural", train__epochs=1, train__select_on="test"))
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["select_on"] == "test"
    assert "test_clean" in read_metrics(run)[-1]


def test_init_from_starts_the_student_from_given_weights(trained_runs, tmp_path):
    """`train.init_from` (fine-tuning, as the FRL scripts do): the student's first weights are the
    given run's best ones; weights of another architecture are refused before anything is written."""
    from robustdistill.core.errors import CheckpointError
    from robustdistill.models.checkpoint import load_model
    from robustdistill.training.loop import setup

    source = trained_runs["natural"]
    cfg = digits_config(tmp_path, "natural", name="finetune", **{"train.init_from": str(source)})
    run = setup(cfg, force=False, resume=False)
    expected, _ = load_model(source / "checkpoints" / "best.safetensors")
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in run.student.state_dict().items())
    wrong = digits_config(
        tmp_path, "trades", name="wrong", model__kwargs="{width: 8}", **{"train.init_from": str(source)}
    )
    with pytest.raises(CheckpointError, match="train.init_from"):
        train(wrong)
    assert not (tmp_path / "runs" / "wrong").exists()
    with pytest.raises(CheckpointError, match="train.init_from: no run folder or checkpoint file"):
        train(digits_config(tmp_path, "natural", name="missing", **{"train.init_from": str(tmp_path / "nowhere")}))


def test_the_final_report_is_the_one_evaluation_pipeline(trained_runs):
    """A run's report.json is `pipeline.evaluate_source` of its best checkpoint with its config's
    settings and memory format (the only evaluation path), and `robustdistill eval RUN`
    (api.evaluate) resolves those same settings from the run folder: every attack's per-sample
    verdicts agree."""
    from robustdistill.api import evaluate
    from robustdistill.evaluation.pipeline import evaluate_source
    from robustdistill.models.sources import resolve_model_source

    run = trained_runs["trades"]
    trained = json.loads((run / "report.json").read_text())
    cfg = load_config(run / "config.yaml")
    dataset = load_dataset(cfg.data)
    settings = cfg.eval.resolve(cfg.threat)
    direct = evaluate_source(
        resolve_model_source(run), dataset, "test", cfg.eval, settings, memory_format=cfg.train.memory_format
    )
    again = evaluate(run, progress=False)
    assert list(direct["attacks"]) == list(again["attacks"]) == list(trained["attacks"])
    assert len(trained["attacks"]) >= 2 and cfg.train.memory_format == torch.channels_last
    for name, result in trained["attacks"].items():
        assert direct["attacks"][name]["verdicts"] == again["attacks"][name]["verdicts"] == result["verdicts"], name
    assert direct["checks"] == trained["checks"]


def test_intra_op_threads_sets_and_restores():
    from robustdistill.core.timing import intra_op_threads

    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    with intra_op_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError("restored on an error too")
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_a_run_trains_and_is_evaluated_on_its_own_thread_count(tmp_path):
    """train.threads: the run's config records it, its training and final report use it (report.json
    `threads`), `robustdistill eval RUN` uses it again, and the caller's thread count is restored."""
    from robustdistill.api import evaluate

    before = torch.get_num_threads()
    cfg = digits_config(tmp_path, "natural", train__epochs=1, train__threads=1, eval__checks="false")
    run = train(cfg)
    assert torch.get_num_threads() == before
    assert load_config(run / "config.yaml").train.threads == 1
    report = json.loads((run / "report.json").read_text())
    again = evaluate(run, progress=False)
    assert report["threads"] == again["threads"] == 1 and torch.get_num_threads() == before
    assert report["machine"]["cpu"] and report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert again["attacks"]["pgd20"]["verdicts"] == report["attacks"]["pgd20"]["verdicts"]
