"""Crash drills with real processes: the ServerApp of a running FGL run is SIGKILLed, once during
synthesis and once during the FedAvg rounds, and each rerun of the same run goes on from what the
dead one had finished (the store's shards, the one-shot model, the last checkpointed round).

The runs go through the launcher and a real SuperLink (simulation mode), so the process that
dies is the one a crash takes down; `tests/test_inprocess.py` drills the same resumption in one
process, with results compared to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deploy.processes import Descendants, ServerAppWatch, alive, stop_process
from tests.conftest import start_launcher
from tests.test_deployment import assert_nothing_left, wait_for

ROUNDS = 20  # enough that a kill after the first checkpoint lands mid-rounds


def start(run_config: str, cwd: Path) -> subprocess.Popen:
    return start_launcher(["--simulation", "2", "--quiet", "--run-config", run_config], cwd)


def kill_serverapp(launcher: subprocess.Popen) -> None:
    """SIGKILL the process that runs the ServerApp (`flwr-simulation`, under the SuperLink)."""
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if any("flwr-simulation" in part for part in proc.cmdline()):
                proc.send_signal(signal.SIGKILL)
                return
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no flwr-simulation process under the launcher")


def finish(launcher: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = launcher.communicate(timeout=timeout)
    finally:
        if launcher.poll() is None:  # SIGTERM makes the launcher stop what it started
            launcher.terminate()
            launcher.communicate(timeout=120)
    return output


def results(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def rounds_trained(results: dict) -> list[int]:
    exchanges = results["traffic"]["exchanges"]
    return sorted({e["round"] for e in exchanges if e["message-type"] == "train"})


@pytest.mark.deployment
def test_a_killed_serverapp_resumes_from_its_shards_one_shot_model_and_last_round(tmp_path):
    run_config = (
        'strategy="fgl" dataset="digits" images-per-class=20 synthesis-shard-size=10 '
        f"synthesis-batch-size=10 steps=8 oneshot-epochs=5 num-server-rounds={ROUNDS} "
        f'local-epochs=1 run-name="drill" output-dir="{tmp_path}" cache-dir="{tmp_path / "cache"}"'
    )
    run_dir = tmp_path / "drill"

    def shards() -> list[Path]:  # finished shards (a shard being written is *.tmp.npz)
        return sorted((tmp_path / "cache" / "synthetic").glob("*/shard-[0-9]*[0-9].npz"))

    # 1. killed during synthesis, after its second shard
    launcher = start(run_config, tmp_path)
    try:
        wait_for(lambda: len(shards()) >= 2, 600, "two shards")
        kill_serverapp(launcher)
    finally:
        output = finish(launcher, 300)
    assert launcher.returncode != 0 and "the ServerApp process (PID" in output, output
    assert_nothing_left(run_dir)
    made_before = {path: path.stat().st_mtime_ns for path in shards()}
    assert 2 <= len(made_before) < 20 and "synthesis" not in results(run_dir)

    # 2. the rerun makes only the missing shards, then is killed after a round
    checkpoint = run_dir / "checkpoint-rounds.pt"
    launcher = start(run_config, tmp_path)
    try:
        wait_for(checkpoint.is_file, 600, "a checkpointed round")
        kill_serverapp(launcher)
    finally:
        output = finish(launcher, 300)
    assert launcher.returncode != 0 and "the ServerApp process (PID" in output, output
    assert_nothing_left(run_dir)
    synthesis = results(run_dir)["synthesis"]
    assert synthesis["reused"] == 10 * len(made_before)
    assert synthesis["made"] == 200 - synthesis["reused"]
    assert {path: path.stat().st_mtime_ns for path in made_before} == made_before
    done = max(r["round"] for r in results(run_dir)["rounds"])
    assert 1 <= done < ROUNDS
    oneshot = run_dir / "checkpoint-one-shot.pt"
    trained_at = oneshot.stat().st_mtime_ns

    # 3. the last rerun makes no image, trains no one-shot model, and only the rounds left
    launcher = start(run_config, tmp_path)
    output = finish(launcher, 600)
    assert launcher.returncode == 0, output
    assert_nothing_left(run_dir)
    final = results(run_dir)
    assert final["synthesis"]["made"] == 0 and final["synthesis"]["reused"] == 200
    assert oneshot.stat().st_mtime_ns == trained_at
    assert rounds_trained(final) == list(range(done + 1, ROUNDS + 1))
    assert [r["round"] for r in final["rounds"]] == list(range(ROUNDS + 1))
    assert "resumed-at" in final and "finished-at" in final


def test_a_serverapp_gone_before_its_run_finished_is_noticed_after_the_grace():
    # a stand-in SuperLink whose child bears a ServerApp's command name; the child is killed and
    # left unreaped, a zombie, as its SuperExec may leave it for a while
    child_code = "import time; time.sleep(120)"
    parent_code = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}, 'flwr-simulation']); "
        "print(child.pid, flush=True); time.sleep(120)"
    )
    superlink = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    bare = subprocess.Popen([sys.executable, "-c", child_code])
    descendants = Descendants()

    def seen(root: subprocess.Popen) -> dict[int, psutil.Process]:  # as the launcher's poll does
        descendants.refresh([root])
        return descendants.seen

    try:
        assert ServerAppWatch(grace=0.0).died(seen(bare)) is None  # no ServerApp seen: no verdict
        child = int(superlink.stdout.readline())
        watch = ServerAppWatch(grace=1.0)
        assert watch.died(seen(superlink)) is None and list(watch.processes) == [child]
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: not alive(watch.processes[child]), 10, "the ServerApp gone")
        assert psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        assert watch.died(seen(superlink)) is None  # gone, but within the grace
        time.sleep(1.1)
        assert watch.died(seen(superlink)) == (
            f"the ServerApp process (PID {child}) exited before the run finished"
        )
    finally:
        stop_process(superlink)
        stop_process(bare)
