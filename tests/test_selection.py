"""The one-shot model's epoch chosen by the silos (`oneshot-selection = "federated"`)."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from deploy.inprocess import run_in_process
from fgl_client.silo import load_silo
from fgl_core.config import ConfigError, RunConfig
from fgl_core.models import build_model
from fgl_core.payload import SELECT_MESSAGE_TYPE
from fgl_core.run_results import OneShotSelection
from fgl_core.training import InputSettings, evaluate_model
from fgl_server.selection import candidate_epochs, check_reply, weighted_choice
from tests.test_inprocess import TINY_FGL, Crash, crash_in_round


def test_candidates_are_evenly_spaced_and_end_at_the_last_epoch():
    assert candidate_epochs(120, 4) == [30, 60, 90, 120]
    assert candidate_epochs(120, 7) == [17, 34, 51, 69, 86, 103, 120]
    assert candidate_epochs(3, 8) == [1, 2, 3]  # fewer epochs than candidates
    assert candidate_epochs(0, 8) == []


def test_a_silo_that_claims_many_images_moves_the_choice_only_by_its_capped_share():
    epochs = [10, 20]
    accuracies = {1: [0.6, 0.0], 2: [0.0, 0.7], 3: [0.0, 0.7]}  # node 1 lies for epoch 10
    examples = {1: 10**9, 2: 100, 3: 100}
    uncapped = weighted_choice(epochs, accuracies, examples, max_silo_share=1.0)
    assert uncapped.record.chosen_epoch == 10
    capped = weighted_choice(epochs, accuracies, examples, max_silo_share=0.5)
    assert capped.record.weights == {"node 1": 0.5, "node 2": 0.25, "node 3": 0.25}
    assert capped.record.federated_accuracy == pytest.approx([0.3, 0.35])
    assert (capped.index, capped.record.chosen_epoch) == (1, 20)
    tie = weighted_choice(epochs, {1: [0.5, 0.5]}, {1: 3}, 1.0)
    assert tie.record.chosen_epoch == 10  # the first of equals
    assert weighted_choice(epochs, {}, {}, 0.5).record.chosen_epoch == 20  # no silo: the last


def select_reply(metrics: dict | None, error: str = "") -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"epochs": [1, 2]})}), dst_node_id=1,
                      message_type=SELECT_MESSAGE_TYPE)  # fmt: skip
    if error:
        return Message(Error(code=0, reason=error), reply_to=request)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request)


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({"num-examples": 5, "select-accuracy": [0.5]}, "not a list of 2 accuracies"),
        ({"num-examples": 5, "select-accuracy": [0.5, 1.5]}, "outside [0, 1]"),
        ({"num-examples": 5, "select-accuracy": [0.5, float("nan")]}, "outside [0, 1]"),
        ({"num-examples": 5, "select-accuracy": 0.5}, "not a list"),
        ({"num-examples": 0, "select-accuracy": [0.5, 0.5]}, "positive integer"),
        ({"select-accuracy": [0.5, 0.5]}, "num-examples None"),
    ],
)
def test_the_server_leaves_out_an_evaluation_it_cannot_use_by_name(task_identity, metrics, problem):
    assert problem in check_reply(select_reply(metrics), 2)[0]
    good = select_reply({"num-examples": 5, "select-accuracy": [0.25, 0.75]})
    assert check_reply(good, 2) == ("", [0.25, 0.75], 5)
    assert "error reply: boom" in check_reply(select_reply(None, error="boom"), 2)[0]


def test_the_config_refuses_a_choice_among_no_epochs():
    with pytest.raises(ConfigError, match="oneshot-epochs is 0"):
        RunConfig.from_flower({"oneshot-selection": "federated", "oneshot-epochs": 0})


@pytest.mark.simulation
def test_the_silos_choose_the_one_shot_epoch_and_a_rerun_keeps_their_choice(tmp_path):
    run_config = {
        **TINY_FGL,
        "oneshot-epochs": 4,
        "oneshot-selection": "federated",
        "oneshot-candidates": 2,
        "num-server-rounds": 1,
        "output-dir": str(tmp_path),
        "cache-dir": str(tmp_path / "cache"),
        "run-name": "select",
    }
    with pytest.raises(Crash):  # after the choice, in round 1
        run_in_process(run_config, num_silos=3, on_reply=crash_in_round(1, silos=3))
    folder = tmp_path / "select"
    first = json.loads((folder / "results.json").read_text())
    selection = first["one-shot-selection"]
    assert OneShotSelection.of(first).to_json() == selection  # the section as readers read it
    assert selection["epochs"] == [2, 4] and "kept-last-because" not in selection
    chosen = selection["chosen-epoch"]
    assert chosen == [2, 4][int(np.argmax(selection["federated-accuracy"]))]
    silos = selection["silos"]
    assert sorted(silos) == ["node 1", "node 2", "node 3"]
    mean = sum(selection["weights"][n] * np.array(s["accuracy"]) for n, s in silos.items())
    assert selection["federated-accuracy"] == pytest.approx(mean.tolist())
    # what each silo said is each candidate's accuracy on its own training images
    cfg = RunConfig.from_flower(first["config"])
    saved = torch.load(folder / "checkpoint-one-shot-candidates.pt", weights_only=True)["model"]
    candidates = {
        e: {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(f"epoch-{e}/")}
        for e in (2, 4)
    }
    measured = set()
    for p in range(3):
        silo = load_silo(cfg, {"partition-id": p, "num-partitions": 3})
        row = []
        for e in (2, 4):
            model = build_model(cfg.model, 10, cfg.model_input_size(silo.image_size))
            model.load_state_dict(candidates[e])
            inputs = InputSettings.from_config(cfg)
            row.append(evaluate_model(model, silo.train, torch.device("cpu"), inputs).accuracy)
        measured.add((tuple(row), len(silo.train)))
    assert measured == {(tuple(s["accuracy"]), s["num-examples"]) for s in silos.values()}
    # the rounds start from the chosen candidate, and the one-shot figures are its
    curve = {row["epoch"]: row for row in first["one-shot-curve"]}
    assert first["one-shot"]["test-accuracy"] == curve[chosen]["test-accuracy"]
    sent = [e for e in first["traffic"]["exchanges"] if e["message-type"] == SELECT_MESSAGE_TYPE]
    model_bytes = sum(v.numel() * 4 for v in candidates[4].values())
    assert len(sent) == 3 and all(e["bytes-sent"] > 2 * model_bytes for e in sent)
    what = "each silo's accuracy of the one-shot candidates on its training images"
    assert what in first["privacy"]["not-covered"]

    trained_at = (folder / "checkpoint-one-shot-candidates.pt").stat().st_mtime_ns
    run_in_process(run_config, num_silos=3)
    after = json.loads((folder / "results.json").read_text())
    assert (folder / "checkpoint-one-shot-candidates.pt").stat().st_mtime_ns == trained_at
    assert not any(e["message-type"] == SELECT_MESSAGE_TYPE for e in after["traffic"]["exchanges"])
    assert after["one-shot-selection"] == selection
    assert after["one-shot"]["test-accuracy"] == first["one-shot"]["test-accuracy"]
    assert [r["round"] for r in after["rounds"]] == [0, 1]
