"""The privacy report's inputs: bad arguments, a damaged results.json or model.pt, and a part that
fails after others are done each get a named error, and what was measured is kept."""

import json
import math
import subprocess
import sys

import pytest
import torch

from fgl_core.config import RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.models import build_model_for
from fgl_privacy.report import ReportError, _final_model, check_arguments, read_results, report
from tests.conftest import project_env

CONFIG = {"dataset": "digits", "generator": "offline-tiny", "min-nodes": 2}


def run_folder(tmp_path, **results) -> RunConfig:
    cfg = RunConfig.from_flower({**CONFIG, "cache-dir": str(tmp_path / "cache")})
    (tmp_path / "results.json").write_text(json.dumps({"config": cfg.to_flower(), **results}))
    return cfg


@pytest.mark.parametrize(
    "args, named",
    [
        (((math.nan,), 1, 1e-5, 0), "--noise [nan]"),
        (((0.0, math.inf), 1, 1e-5, 0), "--noise [inf]"),
        (((-0.1,), 1, 1e-5, 0), "--noise [-0.1]"),
        (((0.1,), 0, 1e-5, 0), "--per-silo 0"),
        (((0.1,), 1, 0.0, 0), "--delta 0.0"),
        (((0.1,), 1, 1e-5, 1), "--lira-shadows 1"),
    ],
)
def test_arguments_out_of_range_are_named_before_any_work(args, named):
    with pytest.raises(ReportError, match=named.replace("[", r"\[").replace("]", r"\]")):
        check_arguments(*args)


def test_the_command_exits_2_on_a_nan_noise_and_1_on_a_damaged_results_file(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "fgl_privacy.report", str(tmp_path), *args]
        return subprocess.run(command, env=project_env(), capture_output=True, text=True)

    nan = run("--noise", "nan")
    assert nan.returncode == 2 and "--noise [nan]" in nan.stderr and "Traceback" not in nan.stderr
    (tmp_path / "results.json").write_text('{"config": {"dataset": "dig')  # truncated
    damaged = run()
    assert damaged.returncode == 1 and "Traceback" not in damaged.stderr
    assert f"{tmp_path / 'results.json'}: not readable JSON, truncated or damaged" in damaged.stderr


def test_results_without_a_config_or_folder_are_named(tmp_path):
    with pytest.raises(ReportError, match="no such run folder"):
        read_results(tmp_path / "nope")
    with pytest.raises(ReportError, match=r"results.json: missing"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="holds a list, not a run's results"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"dataset": "digits"}))
    with pytest.raises(ReportError, match="holds no run config"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"results-version": 99, "config": {}}))
    with pytest.raises(ReportError, match="results-version 99; this code reads 1 and before"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"config": {"no-such-key": 1}}))
    with pytest.raises(ReportError, match="unknown key 'no-such-key'"):
        read_results(tmp_path)


def test_a_nan_or_foreign_model_is_not_measured_and_says_why(tmp_path):
    cfg = run_folder(tmp_path)
    data = load_dataset(cfg)
    assert _final_model(tmp_path, cfg, data) == (None, "the run left no model.pt")
    model = build_model_for(cfg, data.num_classes, data.image_size)
    state = model.state_dict()
    torch.save(
        {k: v.float() * math.nan if v.is_floating_point() else v for k, v in state.items()},
        tmp_path / "model.pt",
    )
    assert "has NaN or infinite weights" in _final_model(tmp_path, cfg, data)[1]
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "model.pt")
    assert "cannot be loaded as this run's cnn" in _final_model(tmp_path, cfg, data)[1]
    torch.save(state, tmp_path / "model.pt")
    found, problem = _final_model(tmp_path, cfg, data)
    assert found is not None and problem == ""


def test_a_part_that_fails_keeps_the_report_and_names_the_part(tmp_path):
    store = tmp_path / "store"
    store.mkdir()  # a store folder with no manifest: the replication search cannot open it
    cfg = run_folder(tmp_path, synthesis={"store": str(store)})
    data = load_dataset(cfg)
    torch.save(
        build_model_for(cfg, data.num_classes, data.image_size).state_dict(), tmp_path / "model.pt"
    )
    with pytest.raises(ReportError, match="written without: replication search: StoreError"):
        report(tmp_path, modes=())  # no inversion: what follows it is under test
    text = (tmp_path / "privacy_report.md").read_text()
    assert "## What the server could not compute itself" in text  # kept
    assert "Failed: StoreError" in text and "no readable manifest" in text
    assert "## Membership inference (LiRA)" in text  # the part after the failure still ran
    figures = json.loads((tmp_path / "privacy_report.json").read_text())
    assert figures["failed"]["replication search"].startswith("StoreError")
    assert "replication" not in figures and set(figures["seconds"]) == {
        "inversion",
        "replication search",
        "membership inference",
    }
