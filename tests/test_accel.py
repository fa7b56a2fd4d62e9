"""fgl_accel: Flower's SuperNode polling sooner, a SuperExec that forks its ClientApps, and both
falling back to Flower's own process on any Flower release they were not checked against; on the
installed release, the internals they patch have the names and signatures they use.

Both run for real in tests/test_deployment.py: the launcher starts them by default, and the
deployment with `--stock-flower` there runs without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import logging
import sys
import time

import pytest

import fgl_accel
from fgl_accel import superexec, supernode
from fgl_accel.supernode import CappedSleep, cap_supernode_sleeps, poll_seconds

NODE_FLAGS = ["--insecure", "--superlink", "127.0.0.1:9092", "--node-config", "partition-id=0"]
EXEC_FLAGS = ["--insecure", "--runtime-api-address", "127.0.0.1:9094"]


@pytest.fixture
def supernode_loop(monkeypatch):
    """Flower's SuperNode loop module, its `time` restored after the test."""
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(loop, "time", loop.time)
    return loop


@pytest.fixture
def flower_entry_points(monkeypatch):
    """Flower's flower-supernode and flower-superexec, recording the argv each was started with
    instead of running; the SuperExec loop's executor factory restored after the test."""
    started: dict[str, list[str]] = {}
    record = {
        name: (lambda name=name: started.setdefault(name, list(sys.argv)))
        for name in ("flower-supernode", "flower-superexec")
    }
    cli_node = importlib.import_module("flwr.supernode.cli.flower_supernode")
    cli_exec = importlib.import_module("flwr.supercore.cli.flower_superexec")
    monkeypatch.setattr(cli_node, "flower_supernode", record["flower-supernode"])
    monkeypatch.setattr(cli_exec, "flower_superexec", record["flower-superexec"])
    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    monkeypatch.setattr(loop, "get_executor", loop.get_executor)
    monkeypatch.setattr(sys, "argv", sys.argv)
    return started


def test_the_installed_flower_is_one_fgl_accel_was_checked_against():
    assert fgl_accel.installed_flower() in fgl_accel.CHECKED_AGAINST, (
        "pyproject pins a Flower that fgl_accel was not checked against: compare the internals "
        "below with the new release, then add it to CHECKED_AGAINST"
    )


def test_the_internals_fgl_accel_patches_have_the_names_and_signatures_it_uses():
    """What fgl_accel.supernode and fgl_accel.superexec reach into, as they use it, on the
    installed Flower (test_the_installed_flower_is_one... ties it to CHECKED_AGAINST)."""
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    assert loop.time is time  # the module sleeps through `time`, which CappedSleep replaces
    assert "time.sleep(3)" in inspect.getsource(loop.start_client_internal)  # the idle wait
    superexec_loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    assert "get_executor(" in inspect.getsource(superexec_loop.run_superexec)
    executor = importlib.import_module("flwr.supercore.superexec.executor")
    spec_fields = {f.name for f in dataclasses.fields(executor.ExecutionSpec)}
    used = {"task_type", "runtime_api_address", "token", "insecure", "root_certificates_path",
            "runtime_dependency_install", "parent_pid", "task_id"}  # fmt: skip
    assert used <= spec_fields, used - spec_fields
    for method in ("get_eligible_capacity", "wait_for_capacity", "launch", "reconcile", "close"):
        assert callable(getattr(executor.SubprocessExecutor, method)), method
        assert hasattr(executor.Executor, method), method  # the protocol ForkExecutor meets
    assert callable(executor.LaunchResult.accepted) and callable(executor.LaunchResult.failed)
    from flwr.supercore.constant import TaskType
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    assert TaskType.CLIENT_APP
    parameters = inspect.signature(run_clientapp).parameters
    assert {"runtime_api_address", "token", "insecure", "certificates", "parent_pid",
            "runtime_dependency_install"} <= set(parameters)  # fmt: skip
    assert list(inspect.signature(validate_and_resolve_root_certificates).parameters)[:2] == [
        "root_cert_path", "insecure"
    ]  # fmt: skip
    for module in superexec.PRELOAD:
        if not module.startswith("flwr."):
            continue
        importlib.import_module(module)
    cli_node = importlib.import_module("flwr.supernode.cli.flower_supernode")
    cli_exec = importlib.import_module("flwr.supercore.cli.flower_superexec")
    assert callable(cli_node.flower_supernode) and callable(cli_exec.flower_superexec)


def test_the_supernode_loop_sleeps_at_most_the_poll_and_keeps_the_rest_of_time(
    supernode_loop, monkeypatch
):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    cap_supernode_sleeps(0.2)
    assert isinstance(supernode_loop.time, CappedSleep)
    supernode_loop.time.sleep(3)  # Flower's wait when no message came
    supernode_loop.time.sleep(0.5)  # its wait for the ClientApp's reply
    supernode_loop.time.sleep(0.05)
    assert slept == [0.2, 0.2, 0.05]
    assert supernode_loop.time.monotonic() == pytest.approx(time.monotonic(), abs=1.0)
    cap_supernode_sleeps(1.0)  # capped again: the new cap stands
    supernode_loop.time.sleep(3)
    assert slept[-1] == 1.0


def test_a_flower_whose_supernode_loop_does_not_sleep_through_time_is_refused(
    supernode_loop, monkeypatch
):
    monkeypatch.setattr(supernode_loop, "time", object())
    with pytest.raises(RuntimeError, match=r"not one fgl_accel\.supernode was checked against"):
        cap_supernode_sleeps(0.2)


@pytest.mark.parametrize("text", ["0", "-1", "3.5", "nan"])
def test_a_poll_outside_flowers_own_range_is_refused(text):
    with pytest.raises((argparse.ArgumentTypeError, ValueError)):
        poll_seconds(text)


def test_polls_up_to_flowers_own_are_taken():
    assert poll_seconds("0.2") == 0.2 and poll_seconds("3") == 3.0


def test_on_a_flower_it_was_checked_against_each_runs_flowers_own_command_patched(
    supernode_loop, flower_entry_points, monkeypatch, caplog
):
    monkeypatch.setattr(fgl_accel, "installed_flower", lambda: min(fgl_accel.CHECKED_AGAINST))
    forks = []
    monkeypatch.setattr(superexec, "ForkExecutor", lambda: forks.append("fork server") or "F")
    supernode.main(["--poll", "0.5", *NODE_FLAGS])
    superexec.main(EXEC_FLAGS)
    assert flower_entry_points == {
        "flower-supernode": ["flower-supernode", *NODE_FLAGS],  # --poll is ours alone
        "flower-superexec": ["flower-superexec", *EXEC_FLAGS],
    }
    assert isinstance(supernode_loop.time, CappedSleep) and supernode_loop.time.cap == 0.5
    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    assert forks == ["fork server"] and loop.get_executor("subprocess") == "F"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_on_another_flower_each_runs_flowers_own_command_unchanged_after_one_warning(
    supernode_loop, flower_entry_points, monkeypatch, caplog
):
    monkeypatch.setattr(fgl_accel, "installed_flower", lambda: "1.43.0")
    flower_get_executor = importlib.import_module(
        "flwr.supercore.superexec.run_superexec"
    ).get_executor

    def no_fork_server():
        raise AssertionError("a fork server was started on a Flower it was not checked against")

    monkeypatch.setattr(superexec, "ForkExecutor", no_fork_server)
    for main, flags in (
        (supernode.main, ["--poll", "0.2", *NODE_FLAGS]),
        (superexec.main, EXEC_FLAGS),
    ):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            main(flags)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "was checked against flwr 1.41.0, 1.42.0, and flwr 1.43.0 is installed" in (
            warnings[0]
        )
        assert "running Flower's own" in warnings[0]
    assert flower_entry_points == {
        "flower-supernode": ["flower-supernode", *NODE_FLAGS],
        "flower-superexec": ["flower-superexec", *EXEC_FLAGS],
    }
    assert supernode_loop.time is time  # Flower's 3 s wait stands
    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    assert loop.get_executor is flower_get_executor
