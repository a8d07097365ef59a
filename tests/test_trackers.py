"""Trackers (logging.tensorboard / wandb / mlflow): every metrics record, the config, the final report
and the figures reach each one, read back from its own offline store (TensorBoard's event file,
W&B's offline run file, an MLflow file store); a resume continues the same tracker runs; a missing
package is refused before anything is written; an unreachable or failing tracker never stops a run."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import digits_config, run_page
from robustdistill.cli import main
from robustdistill.core.errors import ConfigError
from robustdistill.storage.runs import read_metrics
from robustdistill.training.loop import train
from robustdistill.training.preflight import preflight
from robustdistill.training.trackers import Trackers, report_scalars, scalars


def test_a_record_becomes_one_number_per_curve():
    record = {"type": "epoch", "step": 40, "epoch": 2, "loss": torch.tensor(0.5).item(), "lr": 0.1}
    record |= {"temperatures": [1.0, 2.5], "average_updated": True, "note": "x", "nan": float("nan")}
    assert scalars(record) == {
        "epoch/epoch": 2.0,
        "epoch/loss": 0.5,
        "epoch/lr": 0.1,
        "epoch/temperatures/0": 1.0,
        "epoch/temperatures/1": 2.5,
    }
    report = {"attacks": {"clean": {"accuracy": 0.9, "worst_class_accuracy": 0.5, "nsd": None}}}
    report["w_robust"] = {"value": 0.7}
    expected = {"test/clean/accuracy": 0.9, "test/clean/worst_class_accuracy": 0.5, "test/w_robust": 0.7}
    assert report_scalars(report) == expected  # NSD None: left out


@pytest.mark.parametrize(
    "tracker, key, extra",
    [
        ("wandb", "logging.wandb.project=p", "wandb"),
        ("mlflow", "logging.mlflow.experiment=e", "mlflow"),
        ("torch.utils.tensorboard", "logging.tensorboard=true", "tensorboard"),
    ],
)
def test_a_tracker_whose_package_is_missing_is_refused_in_one_line_before_anything_is_written(
    tmp_path, monkeypatch, capsys, tracker, key, extra
):
    monkeypatch.setitem(sys.modules, tracker, None)  # import fails as if it were not installed
    name, value = key.split("=")
    cfg = digits_config(tmp_path, "natural", **{name.replace(".", "__"): value})
    with pytest.raises(ConfigError, match=rf"pip install 'robustdistill\[{extra}\]'"):
        preflight(cfg, force=False, resume=False)
    args = ["train", "natural", f"out_dir={tmp_path / 'runs'}", key]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: logging.") and f"robustdistill[{extra}]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_tracker_keys_are_checked_like_any_other():
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        digits_config(Path("/nonexistent"), "natural", logging__wandb__mode="sometimes")
    with pytest.raises(ConfigError, match="logging.mlflow.experiment must not be empty"):
        digits_config(Path("/nonexistent"), "natural", logging__mlflow__experiment="''")


def _curve(points, key=None):
    """(steps, values) of tracker points (`.step`, `.value`) or of metrics records' `key`, values as
    float32 (TensorBoard stores them so)."""
    steps = [p["step"] if key else p.step for p in points]
    return steps, [float(torch.tensor(p[key] if key else p.value, dtype=torch.float32)) for p in points]


def _wandb_records(run_dir: Path):
    """The records of the run's W&B offline file (LevelDB-log framing of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, buf, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _key(item) -> str:
    """A W&B record item's key ('a/b' may be stored as the nested key [a, b])."""
    return item.key or "/".join(item.nested_key)


def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _mlflow(uri: str):
    import mlflow

    from robustdistill.training.trackers import _mlflow_env

    with _mlflow_env(uri):
        return mlflow.MlflowClient(uri)


@pytest.mark.slow
def test_every_record_the_config_the_report_and_the_figures_reach_each_tracker_and_a_resume_continues_them(tmp_path):
    uri = (tmp_path / "mlruns").as_uri()
    tracked = dict(logging__tensorboard="true", logging__wandb__mode="offline", logging__mlflow__tracking_uri=uri)
    cfg = digits_config(tmp_path, "pgd_at", train__epochs=2, **tracked)
    cfg.train.milestones, cfg.train.log_every = [1], 5
    run_dir = train(cfg, progress=False)
    records, report = read_metrics(run_dir), json.loads((run_dir / "report.json").read_text())
    epochs = [r for r in records if r["type"] == "epoch"]
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert set(ids) == {"tensorboard", "wandb", "mlflow"}

    events = _tensorboard(run_dir)
    assert _curve(events.Scalars("epoch/loss")) == _curve(epochs, "loss")
    assert len(events.Scalars("step/loss")) == sum(r["type"] == "step" for r in records)
    assert events.Scalars("test/pgd20/accuracy")[-1].value == pytest.approx(report["attacks"]["pgd20"]["accuracy"])
    assert {"config/text_summary", "report/text_summary"} <= set(events.Tags()["tensors"])
    assert "figures/classwise" in events.Tags()["images"]

    wandb_records = _wandb_records(run_dir)
    rows = [r.history.item for r in wandb_records if r.HasField("history")]
    history = [{_key(i): json.loads(i.value_json) for i in row} for row in rows]
    logged = [h["epoch/loss"] for h in history if "epoch/loss" in h]
    assert logged == pytest.approx([r["loss"] for r in epochs])
    summary = {_key(i): i.value_json for r in wandb_records if r.HasField("summary") for i in r.summary.update}
    assert float(summary["test/clean/accuracy"]) == pytest.approx(report["attacks"]["clean"]["accuracy"])
    (run_record,) = [r.run for r in wandb_records if r.HasField("run")]
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert config["method"]["name"] == "pgd_at" and config["train"]["epochs"] == 2

    client = _mlflow(uri)
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["method.name"] == "pgd_at"
    history = client.get_metric_history(run.info.run_id, "epoch/loss")
    assert _curve(history) == _curve(epochs, "loss")
    assert run.data.metrics["test/clean/accuracy"] == pytest.approx(report["attacks"]["clean"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md", "figures"} <= artifacts

    # resumed for one more epoch: the same tracker runs go on, TensorBoard holds each step once
    cfg.train.epochs = 3
    train(cfg, resume=True, progress=False)
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    steps = [e.step for e in _tensorboard(run_dir).Scalars("epoch/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 3
    assert len(client.get_metric_history(run.info.run_id, "epoch/loss")) == 3
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    # the trackers' folders are the tool's own: --force may replace the run
    cfg.train.epochs = 1
    assert train(cfg, force=True, progress=False) == run_dir


@pytest.mark.slow
def test_an_unreachable_mlflow_or_a_failing_tracker_never_stops_the_run(tmp_path, caplog, monkeypatch):
    cfg = digits_config(tmp_path, "natural", train__epochs=1, logging__mlflow__tracking_uri="http://127.0.0.1:9")
    cfg.logging.tensorboard = True
    calls = []

    def failing(self, values, step):
        calls.append(step)
        raise OSError("disk full")

    monkeypatch.setattr("robustdistill.training.trackers.TensorBoard.log", failing)
    with caplog.at_level("WARNING", logger="robustdistill"):
        run_dir = train(cfg, progress=False)
    assert (run_dir / "report.json").is_file() and len(calls) == 1  # dropped after its first failure
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("MLflow at http://127.0.0.1:9" in w and "its start failed" in w for w in warnings)
    assert any("TensorBoard" in w and "disk full" in w for w in warnings)
    assert all(f"kept in {run_dir / 'metrics.jsonl'}" in w for w in warnings if "stopped tracking" in w)
    assert json.loads((run_dir / "trackers.json").read_text()).keys() == {"tensorboard"}


def test_trackers_off_cost_nothing(tmp_path):
    trackers = Trackers.open(digits_config(tmp_path, "natural").logging, tmp_path, {}, None)
    trackers.log({"type": "step", "step": 1, "loss": 1.0})
    trackers.close(failed=False)
    assert not list(tmp_path.iterdir())  # no trackers.json, no folders


@pytest.mark.slow
def test_the_how_to_page_runs_as_written(tmp_path):
    """docs/how-to/trackers.md: one run followed by the three trackers, each read back."""
    page = Path(__file__).resolve().parents[1] / "docs" / "how-to" / "trackers.md"
    done = run_page(page, tmp_path)
    run = tmp_path / "runs" / "tracked"
    epochs = [r for r in read_metrics(run) if r["type"] == "epoch"]
    assert _curve(_tensorboard(run).Scalars("epoch/loss")) == _curve(epochs, "loss")
    ids = json.loads((run / "trackers.json").read_text())
    assert set(ids) == {"tensorboard", "wandb", "mlflow"} and "trackers.json" in done.stdout
    client = _mlflow(str(tmp_path / "mlruns"))
    assert len(client.get_metric_history(ids["mlflow"]["run_id"], "epoch/loss")) == 3
    assert [r for r in _wandb_records(run) if r.HasField("history")]
