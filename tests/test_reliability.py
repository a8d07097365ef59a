"""No lost work under concurrency: a run folder is locked while a process trains it, evaluation
folders are created atomically and locked, the atomic writer leaves other live processes'
temporaries alone, and a finished run resumed keeps its earlier report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import digits_config, snapshot
from robustdistill.cli import main
from robustdistill.core.errors import UserError
from robustdistill.core.threat import ThreatModel
from robustdistill.storage.evals import EvalFolder
from robustdistill.storage.files import HOST, INSIDE_LOCK, FolderLock, atomic_write, save_torch
from robustdistill.storage.runs import MARKER
from robustdistill.training.loop import train

DIGITS_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "digits" / "pgd_at.yaml"


def test_a_locked_folder_refuses_a_second_holder_in_one_line_and_frees_on_release(tmp_path):
    folder = tmp_path / "runs" / "x"
    first = FolderLock(folder, "training").acquire()
    with pytest.raises(UserError, match=rf"is in use: robustdistill pid {os.getpid()} on .* is training it") as caught:
        FolderLock(folder, "training").acquire()
    assert "\n" not in str(caught.value)
    first.release()
    with FolderLock(folder, "training"):
        pass
    assert not folder.exists()  # the lock lives beside the folder: a new run's folder is not created by it


def test_the_atomic_writer_leaves_a_live_processs_temporary_alone_and_removes_dead_ones(tmp_path):
    target = tmp_path / "report.json"
    live = tmp_path / f".report.json.{HOST}.{os.getpid()}.abc123.tmp"  # this process: alive
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".report.json.{HOST}.{int(done.stdout)}.def456.tmp"  # a process that has ended
    other_host = tmp_path / ".report.json.elsewhere.example.1.ghi789.tmp"  # another machine's: assumed alive
    old_style = tmp_path / ".report.json.jkl012.tmp"  # written before temporaries carried host and pid
    for path in (live, dead, other_host, old_style):
        path.write_text("half")
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert target.read_text() == "{}"
    assert live.exists() and other_host.exists() and not dead.exists() and not old_style.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == sorted([live.name, other_host.name])


def test_evaluations_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    folders = [EvalFolder(str(model)).claim() for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() for f in folders)
    assert folders[1].name == folders[0].name + "-2"


def test_a_second_evaluation_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    with FolderLock(out, "evaluating into", inside=True):  # another evaluation is writing it
        before = snapshot(tmp_path)
        assert main(["eval", str(tmp_path / "m.safetensors"), "--out", str(out)]) == 2
        assert snapshot(tmp_path) == before
    err = capsys.readouterr().err
    assert f"{out} is in use" in err and "evaluating into it" in err and err.count("\n") == 1
    assert (out / INSIDE_LOCK).exists()  # the holder's; not removed by the refused one


def _train_in_background(tmp_path: Path, name: str, epochs: int) -> subprocess.Popen:
    config = digits_config(tmp_path, "pgd_at", name=name, train__epochs=epochs, attack__steps=2)
    config.eval.checks = False
    path = tmp_path / f"{name}.yaml"
    path.write_text(config.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "robustdistill", "train", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.mark.slow
def test_a_run_folder_being_trained_refuses_force_and_resume_until_its_process_ends(tmp_path, capsys):
    process = _train_in_background(tmp_path, "busy", epochs=40)
    run = tmp_path / "runs" / "busy"
    try:
        waited = 0.0
        while not (run / "checkpoints" / "train_state.pt").exists() and waited < 120:
            time.sleep(0.05)
            waited += 0.05
        assert process.poll() is None, "the training ended before the test could interrupt it"
        config = str(tmp_path / "busy.yaml")
        for argv in (["train", config, "--force"], ["train", str(run), "--resume"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"{run} is in use: robustdistill pid {process.pid} on" in err and "training it" in err, err
        assert process.poll() is None and (run / "config.yaml").exists()  # nothing of the first run was touched
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # kill -9: the operating system releases the lock
        process.wait()
    import torch

    # the killed process may have trained several epochs past its first checkpoint: one more than it did
    done = torch.load(run / "checkpoints" / "train_state.pt", weights_only=True)["epoch"] + 1
    cfg = digits_config(tmp_path, "pgd_at", name="busy", train__epochs=done + 1, attack__steps=2)
    cfg.eval.checks = False
    assert train(cfg, resume=True) == run  # resumable now, from its last checkpoint
    assert (run / "report.json").exists()


@pytest.mark.slow
def test_a_finished_run_resumed_keeps_its_earlier_report(tmp_path, caplog):
    cfg = digits_config(tmp_path, "pgd_at", name="done", train__epochs=1, attack__steps=2)
    cfg.eval.checks, cfg.eval.attacks = False, ["clean"]
    run = train(cfg)
    first = json.loads((run / "report.json").read_text())
    cfg.eval.attacks = ["clean", "fgsm"]  # only the evaluation changes: --resume evaluates it again
    train(cfg, resume=True)
    kept = sorted((run / "previous").glob("report-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == first
    assert kept[0].with_suffix(".md").exists()
    assert set(json.loads((run / "report.json").read_text())["attacks"]) == {"clean", "fgsm"}
    # the kept reports are the tool's own files: --force may still replace the folder
    cfg.eval.attacks = ["clean"]
    assert train(cfg, force=True) == run and not (run / "previous").exists()


@pytest.mark.slow
def test_a_finished_run_trained_on_evaluates_its_new_model_afresh_and_keeps_the_old_autoattack_state(tmp_path):
    cfg = digits_config(
        tmp_path, "pgd_at", name="longer", train__epochs=1, attack__steps=2, train__select_metric="clean"
    )
    cfg.eval.checks, cfg.eval.attacks, cfg.eval.subset = False, ["clean", "autoattack_fast"], 40
    run = train(cfg)
    state = run / "autoattack_fast_state.json"
    first = state.read_text()
    cfg.train.epochs = 2  # the model changes: the state of its last evaluation no longer applies
    train(cfg, resume=True)
    kept = sorted((run / "previous").glob("autoattack_fast_state-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == first
    assert json.loads(state.read_text())["key"]["model"] != json.loads(first)["key"]["model"]
    assert "autoattack_fast" in json.loads((run / "report.json").read_text())["attacks"]
    train(cfg, resume=True)  # nothing more to train: the evaluation resumes from its own state, nothing moves
    assert len(list((run / "previous").glob("autoattack_fast_state-*.json"))) == 1
    assert train(cfg, force=True) == run  # the kept states are the tool's own: --force may replace the folder


def _tiny(tmp_path, which, name, **overrides):
    cfg = digits_config(tmp_path, which, name=name, train__epochs=1, attack__steps=2, **overrides)
    cfg.eval.checks, cfg.eval.attacks = False, ["clean"]
    return cfg


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_an_edited_config_or_a_teacher_that_is_not_the_runs(tmp_path, capsys):
    import torch

    from robustdistill.models import ModelSpec, create_model
    from robustdistill.models.checkpoint import save_model

    run = train(_tiny(tmp_path, "pgd_at", "a"))
    other = train(_tiny(tmp_path, "pgd_at", "b", seed=1))
    state = run / "checkpoints" / "train_state.pt"
    mine = state.read_bytes()
    # a train_state.pt swapped in from another run (another seed)
    state.write_bytes((other / "checkpoints" / "train_state.pt").read_bytes())
    capsys.readouterr()  # what the trainings above printed
    assert main(["train", str(run), "--resume", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "train_state.pt was not trained with this config (seed: 1 -> 0)" in err and err.count("\n") == 1
    state.write_bytes(mine)
    # config.yaml edited by hand: the checkpoint's recorded config disagrees
    config = run / "config.yaml"
    text = config.read_text()
    config.write_text(text.replace("lr: 0.1", "lr: 0.3", 1))
    before = snapshot(run)
    assert main(["train", str(run), "--resume", "train.epochs=2"]) == 2
    assert "train.lr: 0.1 -> 0.3" in capsys.readouterr().err and snapshot(run) == before
    config.write_text(text)
    # a teacher file replaced by other weights
    spec = ModelSpec("small_cnn", 10, 1, {"width": 32})
    torch.manual_seed(0)
    save_model(tmp_path / "teacher.safetensors", create_model(spec), spec)
    student = train(_tiny(tmp_path, "rslad", "s", **{"teachers.robust.path": str(tmp_path / "teacher.safetensors")}))
    torch.manual_seed(1)
    save_model(tmp_path / "teacher.safetensors", create_model(spec), spec)
    assert main(["train", str(student), "--resume", "train.epochs=2"]) == 2
    assert "teacher 'robust'" in capsys.readouterr().err
    assert main(["train", str(run), "--resume", "train.epochs=2"]) == 0  # the run's own state resumes


def test_a_teacher_trained_on_another_dataset_is_refused(tmp_path, capsys):
    import torch

    from robustdistill.models import ModelSpec, create_model
    from robustdistill.models.checkpoint import ModelMeta, save_model

    spec = ModelSpec("small_cnn", 10, 1, {"width": 8})
    torch.manual_seed(0)
    teacher = tmp_path / "svhn_teacher.safetensors"
    save_model(teacher, create_model(spec), ModelMeta(spec, data={"name": "svhn"}, threat=ThreatModel(8 / 255)))
    overrides = [f"teachers.robust.path={teacher}", f"out_dir={tmp_path / 'runs'}", "train.epochs=1"]
    assert main(["train", str(DIGITS_RECIPE.parent / "rslad.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert "was trained on svhn, not on digits" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_run_edited_to_another_eps_or_holding_a_link_out_is_refused(tmp_path, capsys):
    run = train(_tiny(tmp_path, "pgd_at", "r"))
    config = run / "config.yaml"
    text = config.read_text()
    config.write_text(text.replace("eps: 0.2", "eps: 0.1", 1))
    assert main(["eval", str(run), "--attacks", "clean"]) == 2
    assert "says L-inf, eps 0.1 but best.safetensors was trained at L-inf, eps 0.2" in capsys.readouterr().err
    config.write_text(text)
    # metrics.jsonl a link to a file outside the folder: resuming would append to that file
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_bytes((run / "metrics.jsonl").read_bytes())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    before = outside.read_bytes()
    assert main(["train", str(run), "--resume", "train.epochs=2"]) == 2
    assert "is a symbolic link to" in capsys.readouterr().err and outside.read_bytes() == before


def _mount(*args: str) -> None:
    """mount(8), as root; where that is not allowed the test skips, except in CI (CI=true, which
    .ci/run sets), where it fails: CI never passes with these tests silently skipped."""
    done = subprocess.run(["mount", *args], capture_output=True)
    if done.returncode != 0:
        why = f"cannot mount here ({done.stderr.decode().strip()[:80]}): needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def mounts():
    """Mount points to unmount after the test, last first."""
    points = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", str(point)], check=False)


@pytest.fixture
def small_disk(tmp_path, mounts):
    """A 64 KiB file system (tmpfs; needs root and mount, as in CI), full after a few files."""
    mount = tmp_path / "disk"
    mount.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount))
    mounts.append(mount)
    return mount


def _read_only(folder: Path, mounts: list) -> None:
    """`folder` made read-only in place (a bind mount of itself, remounted read-only)."""
    _mount("--bind", str(folder), str(folder))
    mounts.append(folder)
    _mount("-o", "remount,bind,ro", str(folder))


def _resumable(folder: Path) -> Path:
    """A run folder with everything a resume looks at before it writes (its state is never read: the
    folder is refused first)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / MARKER).write_text("{}")
    (folder / "config.yaml").write_text(DIGITS_RECIPE.read_text())
    (folder / "metrics.jsonl").write_text('{"type": "step", "step": 1}\n')
    (folder / "checkpoints" / "train_state.pt").write_bytes(b"state")
    return folder


@pytest.mark.parametrize("which", ["the run folder", "its checkpoints"])
def test_resuming_a_read_only_run_is_refused_before_anything_changes(tmp_path, mounts, capsys, which):
    run = _resumable(tmp_path / "runs" / "pgd_at")
    _read_only(run if which == "the run folder" else run / "checkpoints", mounts)
    before = snapshot(tmp_path)
    assert main(["train", str(run), "--resume", "train.epochs=40"]) == 2  # a change config.yaml would record
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "is on a read-only file system" in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_a_full_disk_while_a_torch_file_is_written_is_one_line_and_changes_nothing(small_disk):
    import torch

    target = small_disk / "train_state.pt"
    save_torch({"epoch": 1}, target)
    before = target.read_bytes()
    with pytest.raises(UserError, match="no space left on the device while writing .*train_state.pt") as caught:
        save_torch({"weights": torch.zeros(100_000)}, target)
    assert "\n" not in str(caught.value)
    assert target.read_bytes() == before and [p.name for p in small_disk.iterdir()] == ["train_state.pt"]


@pytest.mark.slow
def test_a_disk_that_fills_at_the_first_training_state_leaves_no_run_and_says_so(tmp_path, mounts, capsys):
    """800 KiB: config, metrics and both model files of the first epoch fit, its train_state.pt does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=800k", "tmpfs", str(disk))
    mounts.append(disk)
    argv = ["train", str(DIGITS_RECIPE), f"out_dir={disk / 'runs'}", "train.epochs=2", "attack.steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no space left on the device while writing") and "train_state.pt" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert list((disk / "runs").iterdir()) == []  # the run failed before its first checkpoint: no folder


def test_a_full_disk_is_one_error_line_and_leaves_no_half_written_run(small_disk, capsys):
    argv = ["train", str(DIGITS_RECIPE), f"out_dir={small_disk / 'runs'}", "train.epochs=2", "attack.steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no space left on the device while writing" in err and err.count("\n") == 1, err
    assert list((small_disk / "runs").iterdir()) == []  # no run folder, no lock file: nothing half-written


def test_a_read_only_file_system_is_refused_before_anything_runs(small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(["train", str(DIGITS_RECIPE), f"out_dir={small_disk / 'runs'}"]) == 2
    assert f"cannot write {small_disk / 'runs' / 'pgd_at'}" in capsys.readouterr().err


def test_world_size_without_torchrun_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", str(DIGITS_RECIPE), f"out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not: launch with torchrun" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resume_refuses_a_damaged_metrics_line_but_drops_a_last_line_cut_by_a_crash(tmp_path, capsys):
    run = train(_tiny(tmp_path, "pgd_at", "m"))
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    lines = good.splitlines(keepends=True)
    metrics.write_text("".join(["{damaged\n", *lines]))  # a damaged first line, records after it
    damaged = metrics.read_bytes()
    capsys.readouterr()
    assert main(["train", str(run), "--resume", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the "resuming ... after epoch 1" line
    assert last.startswith("error: ") and "metrics.jsonl line 1 is not a JSON record" in last
    assert metrics.read_bytes() == damaged  # nothing rewritten
    metrics.write_text(good + '{"type": "step", "ste')  # a crash cut the last line
    assert main(["train", str(run), "--resume", "train.epochs=2"]) == 0
    assert all(json.loads(line) for line in metrics.read_text().splitlines())


@pytest.mark.slow
def test_a_run_interrupted_after_a_checkpoint_says_how_to_continue_it(tmp_path, monkeypatch, capsys):
    from robustdistill.methods.pgd_at import PGDAT

    run = train(_tiny(tmp_path, "pgd_at", "interrupted"))
    calls = {"n": 0}
    original = PGDAT.loss

    def interrupted_later(self, x, y):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(PGDAT, "loss", interrupted_later)
    assert main(["train", str(run), "--resume", "train.epochs=2"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted after epoch 1; to continue: robustdistill train {run} --resume" in err
    assert err.strip().endswith("interrupted") and "removed" not in err
    assert (run / "checkpoints" / "train_state.pt").is_file()
