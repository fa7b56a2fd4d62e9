"""Real processes on loopback: one SuperLink and its SuperNodes, insecure and with TLS + auth.

Every test checks that nothing it started is left running, pass or fail: the launcher's
launch.json lists every PID it saw, and the in-process federation stops in a `with` block.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from deploy.certs import make_node_key
from deploy.federation import LocalFederation, Topology, threads_per_node
from deploy.flower_cli import FlowerCLI
from deploy.quickstart import RUNS
from tests.conftest import is_running, launch, silo_file, start_launcher
from tests.hf_data import blood_dict, save_parquet


def assert_nothing_left(run_dir: Path) -> None:
    launched = json.loads((run_dir / "launch.json").read_text())
    nodes = launched["supernodes"]
    pids = [launched["superlink"]["pid"], *(n["pid"] for n in nodes)]
    pids += [n["superexec"]["pid"] for n in nodes if "superexec" in n]
    assert set(pids) <= set(launched["stopped-pids"])
    assert [pid for pid in launched["stopped-pids"] if is_running(pid)] == []


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def app_code_folders(log: Path) -> list[str]:
    """Where the ClientApps that logged to `log` ran the app's code from, one per message."""
    return re.findall(r"\(app code in (\S+)\)", log.read_text())


# insecure: the launcher's defaults (each SuperNode polls every 0.2 s, its ClientApps are forks
# of fgl_accel.superexec); TLS: Flower's own SuperNode and SuperExec, as Flower ships them
@pytest.mark.parametrize("tls", [False, True], ids=["insecure-ours", "tls-and-auth-plain-flower"])
def test_three_supernodes_run_the_quickstart_end_to_end(tls, tmp_path):
    # the quickstart's FGL run with a smaller synthesis: this tests the deployment, not fgl-mini;
    # on Flower's own processes the silos also adapt the generator (one short round of LoRA)
    quickstart = dict(item.split("=", 1) for item in RUNS["fgl"].split())
    quickstart |= {"images-per-class": "10", "steps": "4"}
    if tls:
        quickstart |= {"generator-adaptation": '"lora"', "adaptation-rounds": "1",
                       "adaptation-steps": "3", "adaptation-batch-size": "8"}  # fmt: skip
    smaller = " ".join(f"{k}={v}" for k, v in quickstart.items())
    overrides = (
        f'{smaller} num-server-rounds=2 run-name="deployed" '
        f'output-dir="{tmp_path}" cache-dir="{tmp_path / "cache"}"'
    )
    args = ["--supernodes", "3", "--quiet", "--run-config", overrides]
    proc = launch([*args, "--tls", "--stock-flower"] if tls else args, cwd=tmp_path, timeout=900)
    run_dir = tmp_path / "deployed"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished:completed" in proc.stdout
    assert_nothing_left(run_dir)

    launched = json.loads((run_dir / "launch.json").read_text())
    assert launched["run"]["status"] == "finished:completed"
    link_args = launched["superlink"]["args"]
    node_args = [n["args"] for n in launched["supernodes"]]
    assert "--simulation" not in link_args
    assert [n["node-config"] for n in launched["supernodes"]] == [
        f"partition-id={i} num-partitions=3" for i in range(3)
    ]
    if tls:
        assert "--insecure" not in link_args and "--enable-supernode-auth" in link_args
        for args in node_args:
            assert "--insecure" not in args and "--isolation" not in args
            assert "--root-certificates" in args and "--auth-supernode-private-key" in args
        for node in launched["supernodes"]:
            assert Path(node["command"][0]).name == "flower-supernode" and "superexec" not in node
            # Flower's SuperExec: each message a new flwr-clientapp running the run's FAB
            folders = app_code_folders(Path(node["log"]))
            assert len(folders) >= 4 and all("/apps/" in f for f in folders), folders
    else:
        assert "--insecure" in link_args and all("--insecure" in a for a in node_args)
        for node in launched["supernodes"]:
            assert node["command"][-4:] == ["-m", "fgl_accel.supernode", "--poll", "0.2"]
            assert node["args"][-3:-1] == ["--isolation", "process"]
            log = Path(node["superexec"]["log"])
            assert "is a fork of a process with Flower and PyTorch loaded" in log.read_text()
            assert "Traceback" not in log.read_text()
            # each fork runs the app from the run's FAB, as flwr-clientapp does, not this checkout
            folders = app_code_folders(log)
            assert len(folders) >= 4, folders  # embed, and train and evaluate twice
            assert all("fgl-flwr-home-" in f and "/apps/" in f for f in folders), folders

    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["embedding"]["nodes-accepted"]) == 3 and not results["embedding"]["rejected"]
    if tls:  # the adapter the three silos trained, averaged, and the store keyed by it
        (adapted,) = results["adaptation"]["rounds"]
        assert len(adapted["silos"]) == 3 and all("left-out" not in s
                                                   for s in adapted["silos"].values())  # fmt: skip
        store = json.loads((Path(results["synthesis"]["store"]) / "manifest.json").read_text())
        assert store["adapter-digest"] == results["adaptation"]["adapter-digest"]
    assert results["synthesis"]["images"] == int(quickstart["images-per-class"]) * 10
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert results["rounds"][-1]["test-accuracy"] > 0.3  # digits: real rounds learn (chance 0.1)
    traffic = results["traffic"]
    assert not traffic["failed"] and len(traffic["silos"]) == 3
    # Flower's own count of bytes on the wire covers at least the payloads the ledger saw, but
    # for the adapter the server sends: Flower addresses arrays by content, and the adapter of
    # round 1 is all-zero B factors, many of one shape, so a SuperNode pulls far fewer bytes
    # than the record's size (how many depends on the shapes, not on the silo)
    payload = sum(n["bytes-sent"] + n["bytes-received"] for n in traffic["bytes-per-node"].values())
    adapter = [e["bytes-sent"] for e in traffic["exchanges"] if e["message-type"] == "query.adapt"]
    assert len(adapter) == (3 if tls else 0)
    assert launched["run"]["network-traffic"]["total-bytes"] >= payload - sum(adapter)


def test_a_supernode_killed_during_the_rounds_is_recorded_and_the_rest_finish(tmp_path):
    overrides = (
        'strategy="fedavg" num-server-rounds=3 local-epochs=1 round-timeout=180.0 '
        f'run-name="killed" output-dir="{tmp_path}"'
    )
    args = ["--supernodes", "3", "--quiet", "--run-config", overrides]
    proc = start_launcher(args, cwd=tmp_path)
    run_dir = tmp_path / "killed"
    try:

        def rounds_done() -> int:
            try:
                return len(json.loads((run_dir / "results.json").read_text())["rounds"])
            except (OSError, ValueError, KeyError):
                return 0

        wait_for(lambda: rounds_done() >= 2, 300, "round 1")  # round 0 + round 1
        victim = json.loads((run_dir / "launch.json").read_text())["supernodes"][2]["pid"]
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a failed wait: SIGTERM makes the launcher stop its processes
            proc.terminate()
            proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SuperNode 2 exited" in output
    assert_nothing_left(run_dir)

    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2, 3]
    traffic = results["traffic"]
    partition_of = {node: s["partition-id"] for node, s in traffic["silos"].items()}
    missing = traffic["failed-nodes"]
    assert [partition_of[node] for node in missing] == [2]
    (record,) = missing.values()
    assert "Node Unavailable" in record["first-error"] and record["rounds"][0] == 2
    last_train = [
        e for e in traffic["exchanges"] if e["round"] == 3 and e["message-type"] == "train"
    ]
    assert len(last_train) == 2 and not any(e["error"] for e in last_train)


def test_node_local_data_trains_alone_and_a_missing_data_path_fails_clearly(
    blood_npz, blood_names, tmp_path
):
    names = blood_names  # a silo's file names the server's classes
    histograms = [
        silo_file(tmp_path / "silo-a.npz", blood_npz, [0, 1, 2, 3], 60, names),
        [0, 0, 0, 0, 40, 40, 40, 40],
    ]
    # silo b keeps its data as a Hugging Face dataset (parquet files, the hub's layout)
    per_class = {"train": 40, "val": 5, "test": 10}
    save_parquet(blood_dict(blood_npz, [4, 5, 6, 7], per_class, names), tmp_path / "silo-b")
    missing = tmp_path / "nowhere" / "silo-c.npz"
    overrides = (
        f'strategy="fedavg" dataset="{blood_npz}" eval-subset=400 num-server-rounds=1 '
        f'local-epochs=1 run-name="node-local" output-dir="{tmp_path}"'
    )
    args = ["--quiet", "--run-config", overrides]
    for path in (tmp_path / "silo-a.npz", f"hf:{tmp_path / 'silo-b'}", missing):
        args += ["--node-data", str(path)]
    proc = launch(args, cwd=tmp_path)
    run_dir = tmp_path / "node-local"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SuperNode 2 will fail every message: dataset file '{missing}' does not exist" in (
        proc.stderr
    )
    assert_nothing_left(run_dir)

    traffic = json.loads((run_dir / "results.json").read_text())["traffic"]
    silos = sorted(traffic["silos"].values(), key=lambda s: -s["num-train"])
    assert [s["num-train"] for s in silos] == [240, 160]  # each trained on its own file alone
    assert [s["label-histogram"] for s in silos] == histograms
    assert all(s["partition-id"] == -1 for s in silos)
    (failed,) = traffic["failed-nodes"].values()
    assert (
        str(missing) in failed["first-error"] and "not usable on this silo" in failed["first-error"]
    )
    assert "does not exist" not in failed["first-error"]  # the server learns nothing of its paths
    assert failed["rounds"] == [1]


def test_tls_superlink_refuses_a_supernode_whose_key_is_not_registered(tmp_path):
    with LocalFederation(tmp_path, Topology.partitions(1, tls=True)) as federation:
        federation.start_superlink()
        certs = federation.certs
        context = ssl.create_default_context(cafile=str(certs.ca))  # verifies name and chain
        address = ("127.0.0.1", federation.port)
        with (
            socket.create_connection(address, timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        with (
            socket.create_connection(address, timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),  # not any CA's certificate: ours
        ):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")

        federation.start_supernodes()  # node 0: its key registered
        federation.wait_for_supernodes()
        make_node_key(tmp_path / "stranger", tmp_path / "stranger.pub")
        stranger = federation.start_supernode(
            1, {"partition-id": 0, "num-partitions": 1}, tmp_path / "stranger"
        )
        assert stranger.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "supernode-1.log").read_text()
        assert federation.flwr.online_nodes() == 1
    assert_nothing_left(tmp_path)


def test_a_stopped_federation_stops_each_superexec_with_one_signal_its_own(tmp_path):
    # stopped after its SuperNode, a SuperExec got two signals (its parent watch's SIGINT, then
    # our SIGTERM): the second killed it in Flower's exit handler (-15) or printed a traceback
    with LocalFederation(tmp_path, Topology.partitions(1)) as federation:
        federation.start_superlink()
        federation.start_supernodes()
        federation.wait_for_supernodes()
        (superexec,) = federation.superexecs
    assert superexec.returncode == 0  # graceful (Flower exits 0 for SIGTERM), not killed
    assert "Traceback" not in (tmp_path / "superexec-0.log").read_text()
    assert_nothing_left(tmp_path)


def test_a_status_poll_that_times_out_on_a_busy_machine_is_asked_again(tmp_path, monkeypatch):
    # seen on a loaded 2-core machine: `flwr ls` took over 60 s once and killed the whole launch
    federation = LocalFederation(tmp_path, Topology.partitions(1))

    def busy(*args, **kwargs):
        raise subprocess.TimeoutExpired("flwr ls", 60)

    monkeypatch.setattr(FlowerCLI, "__call__", busy)
    assert federation.flwr.run_info("7") == {"status": "unknown"}
    assert federation.flwr.online_nodes() == 0
    federation.flwr.stop("7")  # after a time-out or a dead ServerApp: the SuperLink goes next


def test_supernodes_on_one_machine_split_its_cores_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))
    assert threads_per_node(3) == {"OMP_NUM_THREADS": "2"}
    assert threads_per_node(20) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads_per_node(3) == {}  # the user's choice stands


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (
            ["--supernodes", "2", "--node-poll", "0"],
            "argument --node-poll: 0 s: give seconds in (0, 3]",
        ),
        (
            ["--simulation", "2", "--stock-flower"],
            "--stock-flower and --flower-superexec apply to SuperNodes, not to --simulation",
        ),
    ],
    ids=["node-poll", "stock-flower-simulated"],
)
def test_a_bad_node_setting_is_refused_before_anything_starts(flags, error, tmp_path):
    proc = launch(flags, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and error in proc.stderr
    assert not list(tmp_path.iterdir())  # no run folder, nothing started


def test_a_dead_superexec_is_reported_and_a_dead_supernode_takes_its_superexec_along(tmp_path):
    with LocalFederation(tmp_path, Topology.partitions(2)) as federation:
        federation.start_superlink()
        federation.start_supernodes()
        federation.wait_for_supernodes()
        superexecs = [psutil.Process(p.pid) for p in federation.superexecs]
        # its fork server (and multiprocessing's resource tracker), started before any task
        helpers = [s.children() for s in superexecs]
        assert all(helpers)
        assert federation.exited_supernodes() == {}

        superexecs[0].kill()  # node 0 can no longer run a ClientApp: the launcher says so
        wait_for(lambda: 0 in federation.exited_supernodes(), 30, "the SuperExec to be reaped")
        log = tmp_path / "superexec-0.log"
        assert federation.exited_supernodes() == {
            0: f"the SuperExec of SuperNode 0 exited with code -9; see {log}"
        }
        os.kill(federation.supernodes[1].pid, signal.SIGKILL)

        def node_1_gone() -> bool:
            federation.exited_supernodes()  # reaps SuperNode 1, as the launcher's polls do
            return not any(is_running(p.pid) for p in [superexecs[1], *helpers[1]])

        wait_for(node_1_gone, 30, "SuperNode 1's SuperExec and its helpers to exit by themselves")
        assert federation.exited_supernodes()[1] == (
            f"SuperNode 1 exited with code -9; see {tmp_path / 'supernode-1.log'}"
        )
        wait_for(lambda: not any(is_running(p.pid) for p in helpers[0]), 30, "orphans to exit")
    assert_nothing_left(tmp_path)
