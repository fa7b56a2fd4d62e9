"""A deployment across separate hosts: docs/deployment.md's multi-machine commands, verbatim.

Four hosts, each a network namespace with its own address (tests/hosts.py): the server at
10.77.0.1 runs the doc's server blocks (certificates for that address, not `localhost`; the
SuperLink on its loopback with TLS, SuperNode authentication, `--isolation process` and its state
in `superlink.db`; Flower's SuperExec for the ServerApp with the shared secret; the Fleet proxy,
nginx, on the public address; the keys registered and the FGL run submitted with `flwr` on
loopback), and three silos run the doc's silo block with node-local data, through the proxy. The
run adds only test-sized settings to the doc's run config. From silo 0's host, holding its CA
certificate and key, every try of deploy/silo_attempts.py is made and must be refused (claiming
the run's task, polled while the run starts; the Runtime API; another node's messages; `flwr
run`, `flwr ls`, `flwr supernode register`; a SuperNode with an unregistered key); on the server
host, a process without the SuperExec secret cannot claim a task either. Drills, in order, in one
run:

1. one silo's link down for 30 s in the round after round 1: that round ends at `round-timeout`
   without it, and once the link is back the SuperNode reconnects over TLS and trains in a later
   round;
2. the SuperLink SIGKILLed in a later round and started again with the same command: what
   happens to the run is asserted, and the same `flwr run` again resumes it: no image is made
   twice, the one-shot model is not trained again, and only the rounds left are trained.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, silo_file
from tests.hosts import Hosts, host_script, namespaces_work, readme_block, stop_group, wait_for

pytestmark = pytest.mark.deployment

SERVER = "10.77.0.1"
PUBLIC = f"{SERVER}:9093"  # the Fleet proxy, as the doc's silo block reaches it
SILOS = 3
ACQUIRE_POLL_SECONDS = 60  # a silo tries to claim a task from before the run is submitted
ROUNDS = 8
LINK_DOWN_SECONDS = 30
ROUND_TIMEOUT = 20
# the deployment doc's run config, plus what makes it test-sized
TEST_SIZED = (
    f"images-per-class=4 steps=2 synthesis-batch-size=32 oneshot-epochs=2 local-epochs=1 "
    "evaluate-in-train=true "
    f'num-server-rounds={ROUNDS} round-timeout={ROUND_TIMEOUT}.0 eval-subset=400 run-name="hosts"'
)
APP_FILES = ["pyproject.toml", "README.md", "fgl_core", "fgl_client", "fgl_server", "strategies",
             "deploy"]  # fmt: skip


def checkout(folder: Path) -> Path:
    """A copy of the app as a host's clone holds it, with this environment as its `.venv`: the
    files git tracks or would (not what it ignores, such as the 3 GB of wheels deploy/images.py
    may be collecting into deploy/wheels meanwhile)."""
    listed = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    tracked = subprocess.run(
        [*listed, "--", *APP_FILES], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    files = [name for name in tracked.split("\0") if name and (ROOT / name).is_file()]
    assert "fgl_core/config.py" in files, f"git ls-files in {ROOT} listed {len(files)} files"
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    return folder


def host_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "PYTHONPATH"))}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def results(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def rounds_done(run_dir: Path) -> int:
    return max((r["round"] for r in results(run_dir).get("rounds", [])), default=-1)


def trained(run_dir: Path, node: str) -> list[int]:
    """The rounds in which `node` answered a train message without an error."""
    exchanges = results(run_dir).get("traffic", {}).get("exchanges", [])
    return sorted(
        e["round"]
        for e in exchanges
        if e["message-type"] == "train" and str(e["node-id"]) == node and not e["error"]
    )


def test_the_readme_deployment_across_hosts_survives_a_partition_and_a_superlink_restart(
    tmp_path, blood_npz, blood_names
):
    assert namespaces_work() is None, namespaces_work()
    server = checkout(tmp_path / "server")
    (server / "server-test-set.npz").symlink_to(blood_npz)
    server_env = host_env(server / "flwr-home")
    silo_dirs = [tmp_path / f"silo-{i}" for i in range(SILOS)]
    hosts = {"server": 1, **{f"silo{i}": 11 + i for i in range(SILOS)}}
    with Hosts(hosts) as net:
        setup = net.run("server", ["bash", "-euo", "pipefail", "-c",
                                   host_script(readme_block("server-setup"), {"SERVER": SERVER})],
                        cwd=server, env=server_env, timeout=300)  # fmt: skip
        assert setup.returncode == 0, setup.stdout + setup.stderr

        def start_server(block: str):
            """One of the doc's long-running server programs, as its own host process."""
            script = host_script(readme_block(block), {})
            return net.start("server", script, server / f"{block}.log", server, server_env)

        def start_superlink():
            return start_server("server-superlink")

        def flwr(*args: str) -> subprocess.CompletedProcess:
            path = f"{server / '.venv' / 'bin'}{os.pathsep}{server_env['PATH']}"
            return net.run("server", ["flwr", *args], cwd=server, env={**server_env, "PATH": path},
                           timeout=120)  # fmt: skip

        def superlink_answers() -> bool:
            out = flwr("supernode", "ls", "fgl", "--format", "json")
            return '"success": true' in out.stdout

        def newest_run() -> dict:
            out = flwr("ls", "fgl", "--format", "json")
            runs = json.loads(out.stdout).get("runs", []) if out.stdout.strip() else []
            return max(runs, key=lambda run: run["pending-at"], default={})

        def run_status() -> str:
            return str(newest_run().get("status", "none"))

        def attempts(host: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
            return net.run(host, [sys.executable, "-m", "deploy.silo_attempts", *args],
                           cwd=server, env=host_env(tmp_path / f"attempts-{host}"),
                           timeout=timeout)  # fmt: skip

        superlink = start_superlink()
        superexec = start_server("server-superexec")
        proxy = start_server("server-proxy")
        # the connection, as docs/deployment.md writes it (loopback), with this server's CA
        connection = readme_block("connection").replace(
            "/absolute/path/to/certs/ca.crt", str(server / "certs/ca.crt")
        )
        (server / "flwr-home" / "config.toml").write_text(connection)
        wait_for(superlink_answers, 120, "the SuperLink on the server host")
        certs = server / "certs"
        assert SERVER in subprocess.run(
            ["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-ext",
             "subjectAltName"], capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        health = [sys.executable, "-c", "import ssl, sys, urllib.request as u; print(u.urlopen("
                  f"'https://{PUBLIC}/health', context=ssl.create_default_context("
                  "cafile=sys.argv[1]"
                  "), timeout=10).status)", str(certs / "ca.crt")]  # fmt: skip
        wait_for(lambda: net.run("silo0", health).stdout.strip() == "200", 60,
                 "the Fleet proxy's /health from a silo's host")  # fmt: skip
        # on the server host, a process without the SuperExec secret claims no task
        local = attempts("server", "127.0.0.1:9091", "--ca", str(certs / "ca.crt"),
                         "--runtime-only")  # fmt: skip
        assert local.returncode == 0, local.stdout + local.stderr
        print("on the server host, without the secret:", local.stdout)
        # a silo tries to claim the run's task from before the run is submitted until it runs
        silo_ca = tmp_path / "silo-0-ca.crt"
        shutil.copy2(certs / "ca.crt", silo_ca)
        poll_out = tmp_path / "acquire-poll.json"
        poller = net.start(
            "silo0",
            f"{sys.executable} -m deploy.silo_attempts {PUBLIC} --ca {silo_ca} "
            f"--poll-acquire {ACQUIRE_POLL_SECONDS} --out {poll_out}",
            tmp_path / "acquire-poll.log", server, host_env(tmp_path / "poll-home"),
        )  # fmt: skip

        # the keys are registered, then the run is submitted; it waits for the silos
        registered = net.run("server", ["bash", "-c", readme_block("server-register")],
                             cwd=server, env=server_env, timeout=300)  # fmt: skip
        assert registered.returncode == 0, registered.stdout + registered.stderr
        run_block = readme_block("server-run").replace(
            "--stream", f"--run-config '{TEST_SIZED}' --stream"
        )
        runner = net.start("server", run_block, server / "flwr-run.log", server, server_env)
        wait_for(lambda: run_status() != "none", 180, "the run submitted")
        first_run = newest_run()["run-id"]

        nodes = []
        for i, folder in enumerate(silo_dirs):
            folder.mkdir()
            shutil.copy2(certs / "ca.crt", folder / "ca.crt")
            shutil.copy2(certs / f"supernode-{i}", folder / f"supernode-{i}")
            (folder / ".venv").symlink_to(Path(sys.prefix))
            silo_file(folder / "silo.npz", blood_npz, list(range(8)), 40, blood_names)
            values = {
                "SERVER": SERVER,
                "SILO_KEY": f"supernode-{i}",
                "SILO_DATA": str(folder / "silo.npz"),
            }
            script = host_script(readme_block("silo"), values)
            env = host_env(folder / "flwr-home")
            nodes.append(net.start(f"silo{i}", script, folder / "supernode.log", folder, env))

        # every other try of a silo, from silo 0's host with its CA certificate and key
        tried = attempts("silo0", PUBLIC, "--ca", str(silo_dirs[0] / "ca.crt"),
                         "--key", str(silo_dirs[0] / "supernode-0"), "--app", str(server),
                         "--direct", f"{SERVER}:9091",  # the SuperLink's own port
                         "--out", str(tmp_path / "attempts.json"))  # fmt: skip
        print("from a silo's host:", tried.stdout)
        outcomes = json.loads((tmp_path / "attempts.json").read_text())
        assert set(outcomes) == {
            "acquire-task", "pull-task-input", "get-nodes", "push-messages", "pull-messages",
            "fleet-pull-as-another-node", "flwr-ls", "flwr-run", "flwr-supernode-register",
            "supernode-unregistered-key", "superlink-direct",
        }  # fmt: skip
        let_in = {name: o["answer"] for name, o in outcomes.items() if not o["refused"]}
        assert not let_in and tried.returncode == 0, let_in
        assert "refused" in outcomes["superlink-direct"]["answer"].lower()  # loopback-bound

        run_dir = server / "outputs" / "hosts"
        # drill 1: silo 2's link down for 30 s during round 2
        wait_for(lambda: rounds_done(run_dir) >= 1, 600, "round 1")
        cut_in = rounds_done(run_dir) + 1  # the round in progress
        net.cut(f"silo{SILOS - 1}")
        cut_at = time.monotonic()
        time.sleep(LINK_DOWN_SECONDS)
        net.mend(f"silo{SILOS - 1}")
        assert len(results(run_dir)["traffic"]["silos"]) == SILOS

        def trained_again() -> bool:
            """Whether each failed node trained in a round after its last failure; the drill
            must end with rounds to spare for the second one."""
            failed = results(run_dir).get("traffic", {}).get("failed-nodes", {})
            back = bool(failed) and all(
                any(r > max(record["rounds"]) for r in trained(run_dir, node))
                for node, record in failed.items()
            )
            assert back or rounds_done(run_dir) < ROUNDS - 1, (
                f"the partitioned silo never trained again after its link came back: {failed}"
            )
            return back

        wait_for(trained_again, 600, "the partitioned silo to train again")
        after_drill = results(run_dir)
        failed = after_drill["traffic"]["failed-nodes"]
        assert len(failed) == 1, failed  # the partitioned silo, and only it
        ((_, record),) = failed.items()
        assert record["rounds"][0] == cut_in, record
        ends = {r["round"]: r["end-seconds"] for r in after_drill["rounds"]}
        assert ends[cut_in] - ends[cut_in - 1] < ROUND_TIMEOUT + 15  # it did not wait for the silo
        assert all(proc.poll() is None for proc in nodes)  # no SuperNode gave up
        print(f"link drill: the silo trained again {time.monotonic() - cut_at:.0f} s after the cut")

        # drill 2: the SuperLink killed in a round after the drill, and started again
        oneshot = run_dir / "checkpoint-one-shot.pt"
        trained_at = oneshot.stat().st_mtime_ns
        shards = sorted((server / ".cache").rglob("shard-*.npz"))
        made = {p: p.stat().st_mtime_ns for p in shards}
        os.kill(superlink.pid, signal.SIGKILL)  # not its children: a crash takes the process
        superlink.wait()
        killed_in, killed_at = rounds_done(run_dir) + 1, time.monotonic()
        superlink = start_superlink()
        wait_for(superlink_answers, 120, "the restarted SuperLink")
        ended = wait_for(lambda: run_status().startswith("finished:") and run_status(), 300,
                         "the interrupted run to end")  # fmt: skip
        details, after = newest_run().get("status-details"), time.monotonic() - killed_at
        print(f"SuperLink killed in round {killed_in}: the run ended {ended} ({details}) "
              f"{after:.0f} s later")  # fmt: skip
        first = results(run_dir)
        if ended != "finished:completed":  # then the same command again resumes the run
            stop_group(runner)
            runner = net.start("server", run_block, server / "flwr-rerun.log", server, server_env)
            wait_for(lambda: run_status() == "finished:completed", 600, "the resumed run")
        final = results(run_dir)
        assert [r["round"] for r in final["rounds"]] == list(range(ROUNDS + 1))
        last = [e for e in final["traffic"]["exchanges"] if e["round"] == ROUNDS]
        assert len(last) == SILOS and not any(e["error"] for e in last)  # every silo, at the end
        assert oneshot.stat().st_mtime_ns == trained_at  # never trained again
        assert {p: p.stat().st_mtime_ns for p in shards} == made and made  # no image made twice
        if ended != "finished:completed":
            assert final["synthesis"]["made"] == 0 and "resumed-at" in final
            retrained = sorted({e["round"] for e in final["traffic"]["exchanges"]
                                if e["message-type"] == "train"})  # fmt: skip
            assert min(retrained) >= rounds_done_before(first)  # only the rounds left
        # the silo's claim-task tries, from before the run was submitted until it ran
        assert poller.wait(ACQUIRE_POLL_SECONDS + 60) == 0, (
            tmp_path / "acquire-poll.log"
        ).read_text()[-2000:]
        poll = json.loads(poll_out.read_text())["acquire-task-poll"]
        print("a silo claiming the task while the run started:", poll)
        assert poll["tries"] > 100 and poll["refused"] == poll["tries"], poll
        # nothing a silo tried took hold: the operator's SuperLink knows only the registered
        # silos and the runs the operator submitted
        nodes_known = json.loads(flwr("supernode", "ls", "fgl", "--format", "json").stdout)
        assert len(nodes_known["nodes"]) == SILOS, nodes_known
        runs = json.loads(flwr("ls", "fgl", "--format", "json").stdout)["runs"]
        assert first_run in {r["run-id"] for r in runs} and len(runs) <= 2, runs
        # and the operator, on the server's loopback, reads the run's log (run, ls and
        # supernode register were the doc's own blocks above)
        log = flwr("log", str(first_run), "fgl", "--show")
        assert log.returncode == 0 and "configure_train" in log.stdout, log.stdout[-2000:]
        for proc in [runner, proxy, superexec, superlink, *nodes]:
            stop_group(proc)
    # nothing of the hosts is left running
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]


def rounds_done_before(earlier: dict) -> int:
    return max((r["round"] for r in earlier.get("rounds", [])), default=0) + 1
