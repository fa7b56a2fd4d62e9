"""A node's warm worker (`fgl_client.worker`): the same replies as the ClientApp's own process,
one worker for a node's messages, failures that cost time and nothing else, a clean exit."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from deploy.inprocess import silo_context, task_identity
from fgl_client import worker
from fgl_client.app import app
from fgl_client.handlers import MOON_PREVIOUS
from fgl_core.config import RunConfig
from fgl_core.models import build_model, state_dict_float32
from tests.conftest import is_running, project_env

IDLE = 20.0


def worker_processes() -> list[psutil.Process]:
    """The live warm workers this test process started."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone, or a zombie not reaped yet
            if proc.status() != psutil.STATUS_ZOMBIE and "fgl_client.worker" in proc.cmdline():
                found.append(proc)
    return found


@pytest.fixture
def sockets(tmp_path_factory, monkeypatch):
    """Worker sockets in a short folder of this test's own; no worker outlives the test."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("w")))
    yield
    for proc in worker_processes():
        with contextlib.suppress(psutil.Error):
            proc.kill()
            proc.wait(10)


def context_for(tmp_path, idle: float, node_id: int = 2, **overrides):
    values = {"dataset": "digits", "local-epochs": 1, "cache-dir": str(tmp_path / "cache")}
    cfg = RunConfig.from_flower({**values, **overrides})
    context = silo_context(cfg.to_flower(), node_id=node_id, partition_id=1, num_partitions=3)
    if idle:
        context.node_config[worker.IDLE_KEY] = idle
    return context


def train_message(config: dict, classes: int = 10) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(state_dict_float32(build_model("cnn", classes, 28))),
            "config": ConfigRecord({"server-round": 1, **config}),
        }
    )
    with task_identity():
        return Message(content, dst_node_id=2, message_type="train")


def send(message: Message, context) -> Message:
    with task_identity():
        return app(message, context)


def arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def assert_same_reply(a: Message, b: Message) -> None:
    assert arrays(a).keys() == arrays(b).keys()
    for key, value in arrays(a).items():
        np.testing.assert_array_equal(value, arrays(b)[key])
    timing = ("samples-per-second", "train-seconds")
    metrics_a, metrics_b = (
        {k: v for k, v in r.content["metrics"].items() if k not in timing} for r in (a, b)
    )
    assert metrics_a == metrics_b
    assert dict(a.content["silo"]) == dict(b.content["silo"])


def test_a_warm_worker_answers_as_the_clientapp_process_does_and_keeps_its_state(tmp_path, sockets):
    moon = {"moon-mu": 1.0, "moon-temperature": 0.5}
    here, warm = context_for(tmp_path, 0), context_for(tmp_path, IDLE)
    for round_config in ({}, moon, moon):  # MOON's second round reads the state the first left
        message = train_message(round_config)
        own, delegated = send(message, here), send(message, warm)
        assert_same_reply(own, delegated)
        assert delegated.metadata.reply_to_message_id == message.metadata.message_id
    assert set(warm.state.keys()) == set(here.state.keys()) == {MOON_PREVIOUS}
    for key, value in here.state[MOON_PREVIOUS].items():
        np.testing.assert_array_equal(value.numpy(), warm.state[MOON_PREVIOUS][key].numpy())
    assert len(worker_processes()) == 1  # one worker served all three messages
    assert worker.socket_path(warm, worker.code_root()).exists()


def test_a_handler_error_in_the_worker_is_raised_as_its_own_type_and_message(tmp_path, sockets):
    message = train_message({}, classes=5)  # digits has 10 classes: the silo refuses the model
    with pytest.raises(ValueError, match="global model has 5"):
        send(message, context_for(tmp_path, IDLE))
    (proc,) = worker_processes()  # the worker survives a handler's failure
    assert proc.is_running()


def test_a_worker_that_hangs_up_leaves_the_message_to_the_clientapp(tmp_path, sockets, caplog):
    warm = context_for(tmp_path, IDLE)
    path = worker.socket_path(warm, worker.code_root())
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts, then closes
    impostor.bind(str(path))
    impostor.listen()
    message = train_message({})

    def hang_up() -> None:
        conn, _ = impostor.accept()
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    with caplog.at_level(logging.WARNING, logger="fgl_client.app"):
        reply = send(message, warm)
    thread.join()
    impostor.close()
    assert "did not answer" in caplog.text and "runs in its own process" in caplog.text
    assert_same_reply(reply, send(message, context_for(tmp_path, 0)))
    assert worker_processes() == []  # it found a listener, so it started none


def test_a_killed_worker_is_replaced_by_the_next_message(tmp_path, sockets):
    warm = context_for(tmp_path, IDLE)
    message = train_message({})
    first = send(message, warm)
    (proc,) = worker_processes()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert worker.socket_path(warm, worker.code_root()).exists()  # stale: nobody listens
    assert_same_reply(first, send(message, warm))
    (replacement,) = worker_processes()
    assert replacement.pid != proc.pid


def listening_worker(path, watch_pid: int) -> subprocess.Popen:
    """A worker on `path` watching `watch_pid`, once it listens."""
    served = subprocess.Popen(
        [sys.executable, "-m", "fgl_client.worker", str(path), str(watch_pid), "600"],
        env=project_env(),
    )
    deadline = time.monotonic() + 120
    while not path.exists():
        assert served.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    return served


def test_a_worker_exits_when_idle_when_its_node_stops_and_on_sigterm(tmp_path, sockets):
    idle = context_for(tmp_path, 2.0)
    send(train_message({}), idle)
    path = worker.socket_path(idle, worker.code_root())
    (proc,) = worker_processes()
    proc.wait(30)  # 2 s without a message
    assert not path.exists() and not path.with_suffix(".lock").exists()

    node = subprocess.Popen(["sleep", "60"])  # stands for the node's SuperExec
    path = worker.socket_dir() / "watch.sock"
    served = listening_worker(path, node.pid)
    node.kill()
    node.wait()
    assert served.wait(30) == 0  # within a second or two of its node
    assert not path.exists() and not is_running(served.pid)

    served = listening_worker(path, os.getpid())
    served.terminate()  # SIGTERM, as the launcher stops what is left of a node
    assert served.wait(30) == 0 and not path.exists()


def test_a_socket_folder_others_can_enter_is_refused_and_the_message_runs_here(
    tmp_path, sockets, caplog
):
    folder = worker.socket_dir()
    os.chmod(folder, 0o755)
    with pytest.raises(worker.WorkerUnavailable, match="not a directory of this user's alone"):
        worker.socket_dir()
    with caplog.at_level(logging.WARNING, logger="fgl_client.app"):
        reply = send(train_message({}), context_for(tmp_path, IDLE))
    assert "runs in its own process" in caplog.text
    assert reply.content["metrics"]["num-examples"] > 0 and worker_processes() == []


@pytest.mark.parametrize("value", [-1, "soon", True])
def test_a_bad_idle_value_in_the_node_config_is_named(value):
    with pytest.raises(ValueError, match=f"node config {worker.IDLE_KEY}"):
        worker.idle_seconds({worker.IDLE_KEY: value})
    assert worker.idle_seconds({}) == 0.0
