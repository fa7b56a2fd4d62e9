"""A federation in one process (no Ray, no SuperLink): the runner a single-GPU machine uses."""

import json

import pytest
from flwr.supercore.task_identity import TaskIdentity

from deploy.inprocess import run_in_process
from fgl_core.config import ConfigError
from tests.conftest import silo_file


def test_the_serverapp_runs_every_round_with_every_silo_in_this_process(tmp_path):
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    run_config = {
        "dataset": "digits",
        "num-server-rounds": 2,
        "local-epochs": 1,
        "min-nodes": 3,
        "output-dir": str(tmp_path),
        "run-name": "one-process",
    }
    run_in_process(run_config, num_silos=3)
    results = json.loads((tmp_path / "one-process" / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]  # 0: the initial model
    trained = {
        (e["round"], e["node-id"])
        for e in results["traffic"]["exchanges"]
        if e["message-type"] == "train" and not e["error"]
    }
    assert trained == {(r, n) for r in (1, 2) for n in (1, 2, 3)}
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before
    run_in_process(run_config, num_silos=3)  # a finished run, run again, starts afresh
    again = json.loads((tmp_path / "one-process" / "results.json").read_text())
    assert rounds_trained(again) == [1, 2] and "resumed-at" not in again


def test_a_bad_key_fails_before_any_silo_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"num-server-round.*did you mean 'num-server-rounds'"):
        run_in_process({"num-server-round": 2, "output-dir": str(tmp_path)}, num_silos=2)
    assert not any(tmp_path.iterdir())


def test_a_silo_whose_class_list_is_shifted_takes_part_in_no_round(
    tmp_path, blood_npz, blood_names
):
    names = blood_names
    shifted = names[1:] + names[:1]  # as an ImageFolder that lacks its first class folder
    silo_file(tmp_path / "shifted.npz", blood_npz, list(range(8)), 10, shifted)
    run_config = {
        "dataset": str(blood_npz),
        "train-subset": 400,
        "eval-subset": 80,
        "num-server-rounds": 2,
        "local-epochs": 1,
        "min-nodes": 3,
        "output-dir": str(tmp_path),
        "run-name": "shifted",
    }
    run_in_process(run_config, 3, node_configs={3: {"data-path": str(tmp_path / "shifted.npz")}})
    traffic = json.loads((tmp_path / "shifted" / "results.json").read_text())["traffic"]
    trained = {(e["round"], e["node-id"]) for e in traffic["exchanges"] if not e["error"]}
    assert trained == {(r, n) for r in (1, 2) for n in (1, 2)}
    failed = traffic["failed-nodes"]["3"]
    assert failed["rounds"] == [1, 2]
    assert (
        "first difference at label 0: the server has 'basophil', the silo the server's "
        "'eosinophil' (the server's label 1)" in failed["first-error"]
    )
    assert sorted(traffic["silos"]) == ["1", "2"]


def test_the_paper_preset_trains_on_crops_and_evaluates_on_centre_crops(tmp_path):
    run_config = {
        "preset": "paper",
        "image-size": 40,  # set by the run: kept; the preset's other keys fill in
        "crop-size": 32,
        "train-subset": 300,
        "eval-subset": 60,
        "num-server-rounds": 1,
        "local-epochs": 1,
        "min-nodes": 2,
        "output-dir": str(tmp_path),
        "run-name": "paper",
    }
    run_in_process(run_config, num_silos=2)
    results = json.loads((tmp_path / "paper" / "results.json").read_text())
    config = results["config"]
    assert (config["augment"], config["normalization"]) == ("random-resized-crop", "imagenet")
    assert (config["image-size"], config["crop-size"], config["batch-size"]) == (40, 32, 128)
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    assert results["rounds"][1]["silo-eval-accuracy"] >= 0  # the silos evaluated centre crops


class Crash(Exception):
    """The ServerApp dying mid-run."""


def crash_in_round(k: int, silos: int):
    seen = []

    def on_reply(reply, _):
        if reply.metadata.message_type == "train":
            seen.append(reply)
            if len(seen) > (k - 1) * silos:  # the first silo's reply of round k
                raise Crash(f"killed during round {k}")
        return reply

    return on_reply


def rounds_trained(results: dict) -> list[int]:
    exchanges = results["traffic"]["exchanges"]
    return sorted({e["round"] for e in exchanges if e["message-type"] == "train"})


def test_a_run_killed_in_round_2_resumes_there_and_ends_as_if_never_stopped(tmp_path):
    run_config = {
        "dataset": "digits",
        "num-server-rounds": 3,
        "local-epochs": 1,
        "min-nodes": 3,
        "output-dir": str(tmp_path),
    }
    run_in_process({**run_config, "run-name": "whole"}, num_silos=3)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())

    crashed = {**run_config, "run-name": "crashed"}
    with pytest.raises(Crash):
        run_in_process(crashed, num_silos=3, on_reply=crash_in_round(2, silos=3))
    before = json.loads((tmp_path / "crashed" / "results.json").read_text())
    assert [r["round"] for r in before["rounds"]] == [0, 1]
    run_in_process(crashed, num_silos=3)
    after = json.loads((tmp_path / "crashed" / "results.json").read_text())
    assert rounds_trained(after) == [2, 3]  # round 1 was not trained again
    assert [r["round"] for r in after["rounds"]] == [0, 1, 2, 3]
    for key in ("final-test-accuracy", "test-accuracy-at-best-val", "best-val-at"):
        assert after["summary"][key] == whole["summary"][key]


# a small FGL run of 3 silos on the offline generator (add output-dir and cache-dir)
TINY_FGL = {
    "strategy": "fgl",
    "generator": "offline-tiny",
    "dataset": "digits",
    "images-per-class": 4,
    "steps": 2,
    "local-epochs": 1,
    "min-nodes": 3,
}


def test_an_fgl_run_killed_in_its_rounds_reuses_its_images_and_one_shot_model(tmp_path):
    run_config = {
        **TINY_FGL,
        "oneshot-epochs": 2,
        "num-server-rounds": 2,
        "output-dir": str(tmp_path),
        "cache-dir": str(tmp_path / "cache"),
        "run-name": "fgl",
    }
    with pytest.raises(Crash):
        run_in_process(run_config, num_silos=3, on_reply=crash_in_round(2, silos=3))
    oneshot = tmp_path / "fgl" / "checkpoint-one-shot.pt"
    trained_at = oneshot.stat().st_mtime_ns
    run_in_process(run_config, num_silos=3)
    results = json.loads((tmp_path / "fgl" / "results.json").read_text())
    assert results["synthesis"]["made"] == 0 and results["synthesis"]["reused"] == 40
    assert oneshot.stat().st_mtime_ns == trained_at  # the one-shot model was not trained again
    curve = results["one-shot-curve"]  # kept from the run that died
    assert [row["epoch"] for row in curve] == [1, 2]
    assert curve[-1]["test-accuracy"] == results["one-shot"]["test-accuracy"]
    best = max(row["test-accuracy"] for row in [*curve, *results["rounds"]])
    assert results["summary"]["best-test-accuracy"] == best
    assert rounds_trained(results) == [2]
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]


def test_a_centralized_run_killed_in_round_2_resumes_there_and_ends_as_if_never_stopped(
    tmp_path, monkeypatch
):
    import fgl_server.centralized as centralized

    run_config = {
        "strategy": "centralized",
        "dataset": "digits",
        "num-server-rounds": 3,
        "local-epochs": 1,
        "output-dir": str(tmp_path),
    }
    run_in_process({**run_config, "run-name": "whole"}, num_silos=2)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())

    trained, train_model = [], centralized.train_model
    crashes = ["killed during round 2"]

    def dies_in_round_2(model, dataset, settings, device, desc):
        if desc == "centralized round 2" and crashes:
            raise Crash(crashes.pop())
        trained.append(desc)
        return train_model(model, dataset, settings, device, desc=desc)

    monkeypatch.setattr(centralized, "train_model", dies_in_round_2)
    crashed = {**run_config, "run-name": "crashed"}
    with pytest.raises(Crash):
        run_in_process(crashed, num_silos=2)
    assert trained == ["centralized round 1"]
    run_in_process(crashed, num_silos=2)  # the rerun dies nowhere
    assert trained == ["centralized round 1", "centralized round 2", "centralized round 3"]
    after = json.loads((tmp_path / "crashed" / "results.json").read_text())
    assert [r["round"] for r in after["rounds"]] == [0, 1, 2, 3]
    for key in ("final-test-accuracy", "test-accuracy-at-best-val", "best-val-at"):
        assert after["summary"][key] == whole["summary"][key]


def test_silos_can_evaluate_in_their_train_reply_with_one_message_per_round(tmp_path):
    """The same numbers as a separate evaluate round, one message per silo per round fewer."""
    base = {
        "dataset": "digits",
        "num-server-rounds": 2,
        "local-epochs": 1,
        "min-nodes": 3,
        "output-dir": str(tmp_path),
    }
    run_in_process({**base, "run-name": "separate"}, num_silos=3)
    run_in_process({**base, "run-name": "in-train", "evaluate-in-train": True}, num_silos=3)
    separate, in_train = (
        json.loads((tmp_path / name / "results.json").read_text())
        for name in ("separate", "in-train")
    )

    def per_node(results, message_type):
        return {
            (e["round"], e["node-id"]): e["metrics"].get("eval-accuracy")
            for e in results["traffic"]["exchanges"]
            if e["message-type"] == message_type
        }

    assert {e["message-type"] for e in in_train["traffic"]["exchanges"]} == {"train"}
    evaluated = per_node(separate, "evaluate")  # silos evaluating the model of round r
    received = per_node(in_train, "train")  # silos evaluating what round r + 1 sent them
    assert all(v is not None for v in received.values())
    assert {(r - 1, n): v for (r, n), v in received.items() if r > 1} == {
        k: v for k, v in evaluated.items() if k[0] == 1
    }
    rows = in_train["rounds"]
    assert "silo-eval-accuracy" in rows[0] and "silo-eval-accuracy" in rows[1]
    assert "silo-eval-accuracy" not in rows[2]  # no later round evaluated the final model
    assert "silo-eval-accuracy" not in separate["rounds"][0]
