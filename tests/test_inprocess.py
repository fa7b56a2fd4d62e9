"""A federation in one process (no Ray, no SuperLink): the runner a single-GPU machine uses."""

import json

import pytest
from flwr.supercore.task_identity import TaskIdentity

from fgl_core.config import ConfigError
from fgl_server.inprocess import run_in_process


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


def test_a_bad_key_fails_before_any_silo_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"num-server-round.*did you mean 'num-server-rounds'"):
        run_in_process({"num-server-round": 2, "output-dir": str(tmp_path)}, num_silos=2)
    assert not any(tmp_path.iterdir())
