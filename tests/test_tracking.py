"""`tracking`: a run's figures written where TensorBoard and MLflow read them, read back here."""

import json
import logging

import pytest

from fgl_core.config import RunConfig
from fgl_server.tracking import Tracker
from tests.conftest import small_fgl_run
from tests.hf_data import blood_dict, save_parquet

TRACKED = {"num-server-rounds": 1, "oneshot-epochs": 3, "local-epochs": 1, "progress-seconds": 0.01}


def pairs(rows):
    """[(step, value)] as two lists, which pytest.approx compares."""
    return [step for step, _ in rows], [value for _, value in rows]


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    return series, tags["images"]


def test_tensorboard_holds_the_rounds_the_one_shot_curve_progress_and_the_samples(tmp_path):
    results = small_fgl_run({"tracking": "tensorboard"}, tmp_path, "tb", **TRACKED)
    series, images = scalars(tmp_path / "tb")

    rounds = results["rounds"]
    steps, values = pairs(series["round/test-accuracy"])
    assert steps == [0, 1] == [r["round"] for r in rounds]
    assert values == pytest.approx([r["test-accuracy"] for r in rounds])
    assert [step for step, _ in series["round/silo-train-loss"]] == [1]
    exchanges = [e for e in results["traffic"]["exchanges"] if e["round"] == 1]
    assert series["round/bytes-up"][-1] == (1, sum(e["bytes-received"] for e in exchanges))
    assert [step for step, _ in series["round/seconds"]] == [0, 1]
    assert series["round/bytes-down"][-1][1] == sum(e["bytes-sent"] for e in exchanges) > 0

    curve = results["one-shot-curve"]
    steps, values = pairs(series["one-shot/val-accuracy"])
    assert steps == [1, 2, 3] == [row["epoch"] for row in curve]
    assert values == pytest.approx([row["val-accuracy"] for row in curve])
    ((step, rate),) = series["synthesis/images-per-second"]
    assert step == 0 and rate == pytest.approx(results["synthesis"]["images-per-second"])
    assert any(tag.startswith("progress/") for tag in series)  # progress while a phase ran
    assert set(images) == {"synthetic-samples", "accuracy"}
    assert series["summary/final-test-accuracy"][0][1] == pytest.approx(
        results["summary"]["final-test-accuracy"]
    )


def test_mlflow_holds_the_run_its_config_metrics_and_images(tmp_path, blood_npz, blood_names):
    """On a local Hugging Face dataset (parquet files), so that format runs a whole FGL run."""
    import mlflow

    per_class = {"train": 20, "val": 5, "test": 10}
    data = save_parquet(blood_dict(blood_npz, [0, 3, 6], per_class, blood_names), tmp_path / "hf")
    base = {"tracking": "mlflow", "dataset": f"hf:{data}"}
    results = small_fgl_run(base, tmp_path, "ml", **TRACKED)
    assert results["traffic"]["silos"] and len(results["synthesis"]["images-per-class"]) == 8
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fgl-flower").experiment_id])
    assert run.info.run_name == "ml" and run.info.status == "FINISHED"
    assert run.data.params["strategy"] == "fgl" and run.data.params["oneshot-epochs"] == "3"
    history = client.get_metric_history(run.info.run_id, "round/test-accuracy")
    steps, values = pairs(sorted((m.step, m.value) for m in history))
    assert steps == [0, 1]
    assert values == pytest.approx([r["test-accuracy"] for r in results["rounds"]])
    curve = client.get_metric_history(run.info.run_id, "one-shot/test-accuracy")
    assert sorted(m.step for m in curve) == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert artifacts == {"images/synthetic_samples.png", "images/accuracy.png"}
    assert (tmp_path / "mlartifacts").is_dir()  # beside the runs, not in the working directory

    # a second run joins the same experiment, so runs overlay
    small_fgl_run({**base, "seed": 1}, tmp_path, "ml-2", **TRACKED)
    assert len(client.search_runs([run.info.experiment_id])) == 2


def test_a_tracker_that_cannot_start_warns_once_and_the_run_goes_on(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("fgl_server"), "propagate", True)  # see console.py
    (tmp_path / "a-file").write_text("not a folder")
    cfg = RunConfig.from_flower(
        {"tracking": "mlflow", "tracking-uri": f"sqlite:///{tmp_path}/a-file/x.db"}
    )
    with caplog.at_level(logging.WARNING, logger="fgl_server.tracking"):
        tracker = Tracker(cfg, tmp_path, "broken")
        assert tracker.backend is None
        tracker.round(1, {"test-accuracy": 0.5}, None)  # no error: tracking is off now
        tracker.close()
    (warning,) = {r.getMessage() for r in caplog.records}
    assert "could not start mlflow" in warning and "the run goes on" in warning


def test_off_by_default_writes_no_events(tmp_path):
    results = small_fgl_run({"num-server-rounds": 0}, tmp_path, "plain")
    run_dir = tmp_path / "plain"
    assert results["config"]["tracking"] == "none"
    assert not list(run_dir.glob("events.out.tfevents.*"))
    assert not (tmp_path / "mlflow.db").exists()
    assert json.loads((run_dir / "results.json").read_text())["rounds"]
