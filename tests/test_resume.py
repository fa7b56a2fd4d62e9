"""Resumed state is verified before it is trusted: a damaged checkpoint or results.json is set
aside with a named reason and the phase starts again; nothing finished is deleted."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgl_core.config import RunConfig
from fgl_core.models import build_model
from fgl_server.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)
from fgl_server.results import RunRecorder

PRINT = "a" * 64


def fresh():
    return build_model("cnn", 10, 28, seed=0)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def saved(tmp_path, step=2, fingerprint=PRINT):
    trained = build_model("cnn", 10, 28, seed=1)
    save_checkpoint(tmp_path, "rounds", step, trained, fingerprint)
    return trained


def test_a_checkpoint_that_verifies_is_resumed_from(tmp_path):
    trained = saved(tmp_path)
    model = fresh()
    assert load_checkpoint(tmp_path, "rounds", model, PRINT, last_step=3) == 2
    assert same(model.state_dict(), trained.state_dict())


def rewrite(tmp_path, change) -> None:
    """Load the checkpoint, change it, save it again with a digest that matches the change
    (so the check under test, not the digest, is what refuses it)."""
    path = checkpoint_path(tmp_path, "rounds")
    record = torch.load(path, weights_only=True)
    change(record)
    record["digest"] = state_digest(record["model"])
    torch.save(record, path)


def nan(record):
    name = next(iter(record["model"]))
    record["model"][name] = torch.full_like(record["model"][name], float("nan"))


def drop_key(record):
    record["model"].pop(sorted(record["model"])[-1])


def past_the_end(record):
    record["step"] = 9


def zero_step(record):
    record["step"] = 0


def wrong_shape(record):
    name = sorted(record["model"])[0]
    record["model"][name] = torch.zeros(3)


def flip_byte(tmp_path):
    """A byte of the first tensor's data flipped on disk, the digest left as it was."""
    path = checkpoint_path(tmp_path, "rounds")
    record = torch.load(path, weights_only=True)
    name = sorted(record["model"])[0]
    tensor = record["model"][name]
    tensor.view(-1)[0] = tensor.view(-1)[0] + 1.0  # what a flipped bit does to the value
    torch.save(record, path)  # digest unchanged: it no longer matches


@pytest.mark.parametrize(
    "damage, reason",
    [
        (nan, "has NaN or infinite values"),
        (drop_key, "lacks"),
        (past_the_end, "is at step 9, outside this phase's 1..3"),
        (zero_step, "is at step 0"),
        (wrong_shape, "of shape torch.Size([3])"),
    ],
)
def test_a_damaged_checkpoint_is_set_aside_and_the_model_left_untouched(
    tmp_path, caplog, damage, reason
):
    saved(tmp_path)
    rewrite(tmp_path, damage)
    model = fresh()
    before = weights(model)
    assert load_checkpoint(tmp_path, "rounds", model, PRINT, last_step=3) == 0
    assert same(model.state_dict(), before)  # not half-copied
    assert not checkpoint_path(tmp_path, "rounds").exists()
    (aside,) = tmp_path.glob("checkpoint-rounds.pt.set-aside-*")  # kept, not deleted
    assert reason in caplog.text and aside.name in caplog.text


def test_a_changed_byte_or_another_config_is_refused(tmp_path, caplog):
    saved(tmp_path)
    flip_byte(tmp_path)
    assert load_checkpoint(tmp_path, "rounds", fresh(), PRINT, last_step=3) == 0
    assert "does not match its digest" in caplog.text
    saved(tmp_path, fingerprint="b" * 64)
    assert load_checkpoint(tmp_path, "rounds", fresh(), PRINT, last_step=3) == 0
    assert "written by another run config" in caplog.text
    path = checkpoint_path(tmp_path, "rounds")
    path.write_bytes(b"not a checkpoint")
    assert load_checkpoint(tmp_path, "rounds", fresh(), PRINT, last_step=3) == 0
    assert "unreadable" in caplog.text
    assert len(list(tmp_path.glob("checkpoint-rounds.pt.set-aside-*"))) >= 1


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"config": {"dataset": "dig', "is not readable JSON"),  # truncated
        ("[1, 2]", "holds a list"),
        ('{"config": {}, "rounds": "x"}', "has rounds that are not a list"),
        ('{"config": {}, "rounds": [{"round": "one"}]}', "has rounds that are not a list"),
    ],
)
def test_a_damaged_results_file_is_set_aside_and_the_checkpoints_kept(
    tmp_path, caplog, text, reason
):
    cfg = RunConfig.from_flower({"output-dir": str(tmp_path), "run-name": "run"})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(text)
    saved(run_dir)
    recorder = RunRecorder(cfg)  # no exception: the rerun starts
    assert checkpoint_path(run_dir, "rounds").is_file()  # the finished rounds are not lost
    assert reason in caplog.text
    (aside,) = run_dir.glob("results.json.set-aside-*")
    assert aside.read_text() == text
    assert recorder.results["rounds"] == []


def test_a_resumed_run_keeps_its_rounds_and_a_finished_one_starts_afresh(tmp_path):
    cfg = RunConfig.from_flower({"output-dir": str(tmp_path), "run-name": "run"})
    first = RunRecorder(cfg)
    first.log_round(1, {"test-accuracy": 0.5})
    save_checkpoint(first.dir, "rounds", 1, fresh(), first.fingerprint)
    again = RunRecorder(cfg)
    assert [r["round"] for r in again.results["rounds"]] == [1]
    assert again.fingerprint == first.fingerprint
    assert json.loads((again.dir / "results.json").read_text())["config-fingerprint"]
    assert load_checkpoint(again.dir, "rounds", fresh(), again.fingerprint, 3) == 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_whatever_byte_of_a_checkpoint_changes_the_model_is_the_saved_one_or_untouched(
    tmp_path, data
):
    trained = saved(tmp_path)
    path = checkpoint_path(tmp_path, "rounds")
    raw = bytearray(path.read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1), label="byte")
    raw[at] ^= data.draw(st.integers(1, 255), label="xor")
    path.write_bytes(bytes(raw))
    model = fresh()
    before = weights(model)
    step = load_checkpoint(tmp_path, "rounds", model, PRINT, last_step=3)
    if step:  # the change fell outside what the model is made of (zip metadata, padding)
        assert step == 2 and same(model.state_dict(), trained.state_dict())
    else:
        assert same(model.state_dict(), before) and not path.exists()
    for stale in tmp_path.glob("checkpoint-*"):
        stale.unlink()
