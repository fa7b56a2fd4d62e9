"""results.json's sections: one definition shared by the run that writes them and its readers."""

import json

import pytest

from fgl_core.config import RunConfig
from fgl_core.run_results import (
    RESULTS_VERSION,
    Evaluation,
    ResultsError,
    Summary,
    load_results,
    node_traffic,
    per_silo_mb,
)
from fgl_server.results import RunRecorder, results_problem


def test_a_section_read_back_is_what_was_written_and_a_bad_one_is_named():
    evaluation = Evaluation(val_accuracy=0.5, val_loss=1.25, test_accuracy=0.75, test_loss=0.5)
    assert Evaluation.of({"one-shot": evaluation.to_json()}) == evaluation
    assert Evaluation.read({}) is None
    with pytest.raises(ResultsError, match="has no 'one-shot' section"):
        Evaluation.of({})
    with pytest.raises(ResultsError, match="'one-shot' lacks 'test-loss'"):
        Evaluation.from_json({k: v for k, v in evaluation.to_json().items() if k != "test-loss"})
    with pytest.raises(ResultsError, match="'test-accuracy' is str"):
        Evaluation.from_json({**evaluation.to_json(), "test-accuracy": "0.75"})
    with pytest.raises(ResultsError, match="'summary' is a list"):
        Summary.from_json([])


def test_the_recorder_writes_the_version_and_the_summary_its_readers_read(tmp_path):
    recorder = RunRecorder(RunConfig.from_flower({"output-dir": str(tmp_path), "run-name": "r"}))
    recorder.log_round(0, {"val-accuracy": 0.5, "test-accuracy": 0.4})
    recorder.log_round(1, {"val-accuracy": 0.6, "test-accuracy": 0.7})
    recorder.summarize()
    recorder.write_json()
    results = load_results(tmp_path / "r")
    assert results["results-version"] == RESULTS_VERSION
    summary = Summary.of(results)
    assert (summary.final_test_accuracy, summary.best_val_at) == (0.7, "round 1")
    assert summary.protocol("test-accuracy-at-best-val") == 0.7


def test_a_later_version_is_refused_by_name_and_one_without_is_read(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results-version": RESULTS_VERSION + 1, "config": {}}))
    with pytest.raises(ResultsError, match=f"results-version {RESULTS_VERSION + 1}"):
        load_results(path)
    assert "results-version" in results_problem(json.loads(path.read_text()))  # not resumed
    path.write_text(json.dumps({"config": {}, "rounds": []}))  # written before versions
    assert load_results(tmp_path) == {"config": {}, "rounds": []}
    assert results_problem(load_results(tmp_path)) == ""


def test_per_silo_megabytes_come_from_the_ledgers_count_per_node():
    results = {"traffic": {"bytes-per-node": {
        "node 1": {"bytes-sent": 3_000_000, "bytes-received": 1_000_000},
        "node 2": {"bytes-sent": 1_000_000, "bytes-received": 3_000_000},
    }}}  # fmt: skip
    assert node_traffic(results)["node 2"].bytes_received == 3_000_000
    assert per_silo_mb(results) == (2.0, 2.0)
    with pytest.raises(ResultsError, match="'bytes-sent' is str"):
        node_traffic({"traffic": {"bytes-per-node": {"node 1": {"bytes-sent": "3",
                                                               "bytes-received": 1}}}})  # fmt: skip
