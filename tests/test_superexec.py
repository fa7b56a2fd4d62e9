"""fgl_client.supernode (Flower's SuperNode, polling sooner) and fgl_client.superexec's flags.

Both run for real in tests/test_deployment.py: the launcher starts them by default, and the
plain-Flower deployment there runs without them.
"""

from __future__ import annotations

import argparse
import importlib
import time

import pytest

from fgl_client import superexec
from fgl_client.supernode import CappedSleep, cap_supernode_sleeps, poll_seconds


@pytest.fixture
def supernode_loop(monkeypatch):
    """Flower's SuperNode loop module, its `time` restored after the test."""
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(loop, "time", loop.time)
    return loop


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
    with pytest.raises(RuntimeError, match=r"not the one fgl_client\.supernode was written for"):
        cap_supernode_sleeps(0.2)


@pytest.mark.parametrize("text", ["0", "-1", "3.5", "nan"])
def test_a_poll_outside_flowers_own_range_is_refused(text):
    with pytest.raises((argparse.ArgumentTypeError, ValueError)):
        poll_seconds(text)


def test_polls_up_to_flowers_own_are_taken():
    assert poll_seconds("0.2") == 0.2 and poll_seconds("3") == 3.0


@pytest.mark.parametrize(
    "flags", [[], ["--insecure", "--root-certificates", "ca.pem"]], ids=["neither", "both"]
)
def test_the_superexec_needs_exactly_one_of_insecure_and_a_ca(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        superexec.main(["--runtime-api-address", "127.0.0.1:9094", *flags])
    assert exit_.value.code == 2
    assert "give exactly one of --insecure and --root-certificates" in capsys.readouterr().err
