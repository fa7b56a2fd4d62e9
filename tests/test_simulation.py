"""End to end: the launcher starts its own SuperLink, runs a Flower simulation, stops it."""

import json
import os
import time

import numpy as np
import torch

from fgl_core.config import RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.models import build_model
from fgl_core.training import pick_device
from fgl_server.centralized import run_centralized
from fgl_server.results import RunRecorder
from tests.conftest import is_running, launch


def test_three_silo_fedavg_simulation_end_to_end(blood_npz, tmp_path):
    overrides = (
        f'dataset="{blood_npz}" train-subset=3000 eval-subset=600 num-server-rounds=2 '
        f'local-epochs=3 augment="crop-flip" run-name="fedavg-e2e" output-dir="{tmp_path}"'
    )
    proc = launch(["--simulation", "3", "--quiet", "--run-config", overrides], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished:completed" in proc.stdout
    run_dir = tmp_path / "fedavg-e2e"
    results = json.loads((run_dir / "results.json").read_text())

    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["test-accuracy"] > 0.3 > rounds[0]["test-accuracy"]  # chance is 1/8
    assert "silo-eval-accuracy" in rounds[1] and "silo-train-loss" in rounds[2]
    assert results["summary"]["best-val-at"] in ("round 1", "round 2")
    assert results["config"]["min-nodes"] == 3 and results["phase-seconds"]["rounds"] > 0

    # three silos, each trained and evaluated in both rounds; bytes match the model's size
    traffic = results["traffic"]
    model = build_model("cnn", 8, 28)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    train = [e for e in traffic["exchanges"] if e["message-type"] == "train"]
    assert len(train) == 6 and len({e["node-id"] for e in train}) == 3
    assert not traffic["failed"]
    for e in train:
        assert model_bytes <= e["bytes-sent"] < model_bytes + 2048
        assert model_bytes <= e["bytes-received"] < model_bytes + 4096
        assert e["metrics"]["num-examples"] > 0
    silos = traffic["silos"].values()
    assert sorted(s["partition-id"] for s in silos) == [0, 1, 2]
    assert sum(sum(s["label-histogram"]) for s in silos) == 3000

    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert (run_dir / "accuracy.png").stat().st_size > 10_000

    # nothing the launcher started is left running: not the SuperLink, nor anything below it
    launched = json.loads((run_dir / "launch.json").read_text())
    stopped = launched["stopped-pids"]
    assert launched["superlink"]["pid"] in stopped and len(stopped) >= 3  # SuperExec, simulation
    assert [pid for pid in stopped if is_running(pid)] == []


def test_launcher_refuses_a_bad_config_before_starting_anything(tmp_path):
    proc = launch(["--simulation", "2", "--run-config", "alpha=-1 partiton='iid'"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown key 'partiton'" in proc.stderr and "did you mean 'partition'" in proc.stderr
    proc = launch(["--simulation", "2", "--run-config", "alpha=-1"], cwd=tmp_path)
    assert proc.returncode == 2 and "'alpha' = -1" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_launcher_refuses_a_missing_dataset_file(tmp_path):
    missing = tmp_path / "blood.npz"
    proc = launch(["--simulation", "2", "--run-config", f'dataset="{missing}"'], cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{missing}" in proc.stderr and "does not exist" in proc.stderr


def test_centralized_baseline_trains_on_the_union_and_writes_results(blood_npz, tmp_path):
    cfg = RunConfig.from_flower(
        {
            "strategy": "centralized",
            "dataset": str(blood_npz),
            "train-subset": 2000,
            "eval-subset": 500,
            "num-server-rounds": 2,
            "local-epochs": 2,
            "output-dir": str(tmp_path),
            "run-name": "central",
        }
    )
    data = load_dataset(cfg)
    recorder = RunRecorder(cfg)
    model = run_centralized(cfg, data, recorder, pick_device("cpu"))
    recorder.finish(model)
    results = json.loads((tmp_path / "central" / "results.json").read_text())
    accuracies = [r["test-accuracy"] for r in results["rounds"]]
    majority = np.bincount(data.test.labels).max() / len(data.test)
    assert len(accuracies) == 3 and accuracies[-1] > majority + 0.2
    assert results["phase-seconds"]["train"] > 0
    assert os.path.exists(tmp_path / "central" / "model.pt")


def test_progress_prints_each_phase_and_round_of_this_run_once(tmp_path, capsys):
    from deploy.federation import Progress

    results = tmp_path / "results.json"
    earlier = {"phase-seconds": {"embed": 1.0}, "rounds": [{"round": 1, "test-accuracy": 0.5}]}
    results.write_text(json.dumps(earlier))  # a finished earlier run of the same name
    os.utime(results, ns=(0, 0))
    show = Progress(results, rounds=2)
    show()
    assert capsys.readouterr().out == ""
    adapted = {"1": {"adapt-loss": 0.04}, "2": {"adapt-loss": 0.06}, "3": {"left-out": "no reply"}}
    running = {
        "phase-seconds": {"load-data": 0.4, "adapt": 5.0},
        "adaptation": {"rounds": [{"round": 1, "silos": adapted}]},
        "progress": {
            "phase": "synthesis",
            "done": 240,
            "total": 600,
            "unit": "images",
            "per-second": 3.1,
            "seconds-left": 116.1,
        },
    }
    results.write_text(json.dumps(running))
    show()
    now = {
        "phase-seconds": {"load-data": 0.4, "adapt": 5.0, "embed": 2.0, "rounds": 3.0},
        "adaptation": running["adaptation"],
        "progress": running["progress"],  # the last progress the server wrote stays
        "rounds": [{"round": 0, "test-accuracy": 0.1, "end-seconds": 1.0}]
        + [{"round": r, "test-accuracy": 0.5 + r / 10, "end-seconds": 2.0 * r} for r in (1, 2)],
    }
    results.write_text(json.dumps(now))
    os.utime(results, ns=(time.time_ns() + 10**9,) * 2)  # a later write, whatever the clock
    show()
    show()  # nothing new: nothing printed twice
    assert capsys.readouterr().out.splitlines() == [
        "  synthesis: 240/600 images (40%), 3.1 images/s, about 1 min 56 s left",
        "  adaptation round 1: 2 silos averaged, mean loss 0.0500",
        "  load-data done in 0 s",
        "  adapt done in 5 s",
        "  embed done in 2 s",
        "  round 1/2: test accuracy 0.600 (2 s)",
        "  round 2/2: test accuracy 0.700 (4 s)",
    ]
