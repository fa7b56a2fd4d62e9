"""A SuperLink and its SuperNodes on this machine, started, followed and stopped as one.

`Topology` says what to start; `LocalFederation` starts it (each process with its own log in the
run folder and its own FLWR_HOME), submits the run, follows it until Flower says it finished,
and on exit stops everything it started, by PID. `launch.json` in the run folder lists every
process as it starts and the PIDs stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deploy.certs import Certificates, make_certificates
from deploy.flower_cli import BIN, FlowerCLI
from deploy.processes import Descendants, ServerAppWatch, stop_process
from fgl_accel import module_command
from fgl_accel.supernode import FLOWER_POLL_SECONDS, POLL_SECONDS
from fgl_core.hf_datasets import absolute_source
from fgl_core.polling import poll_until
from fgl_core.progress import Snapshot


@dataclass
class Topology:
    """What to start: simulated silos, or real SuperNodes with their node configs."""

    simulation: int = 0
    node_configs: list[dict[str, str | int | float]] = field(default_factory=list)
    tls: bool = False
    certs_dir: Path | None = None  # None: a fresh CA and keys for this launch only
    fork_clientapp: bool = True  # each SuperNode's SuperExec is fgl_accel.superexec
    node_poll: float = POLL_SECONDS  # an idle SuperNode's wait; 3.0: Flower's own SuperNode

    @classmethod
    def partitions(cls, n: int, tls: bool = False, certs_dir: Path | None = None) -> Topology:
        configs = [{"partition-id": i, "num-partitions": n} for i in range(n)]
        return cls(node_configs=configs, tls=tls, certs_dir=certs_dir)  # type: ignore[arg-type]

    @classmethod
    def node_local(
        cls, paths: list[str], tls: bool = False, certs_dir: Path | None = None
    ) -> Topology:
        configs = [{"data-path": absolute_source(p, always=True)} for p in paths]
        return cls(node_configs=configs, tls=tls, certs_dir=certs_dir)  # type: ignore[arg-type]

    @property
    def num_silos(self) -> int:
        return self.simulation or len(self.node_configs)

    def describe(self) -> str:
        if self.simulation:
            return f"{self.simulation} simulated silos"
        secure = "TLS + SuperNode auth" if self.tls else "insecure"
        return f"{len(self.node_configs)} SuperNodes on loopback ({secure})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def superlink_args(port: int, certs: Certificates | None, simulation: bool = False) -> list[str]:
    """flower-superlink's flags: one HTTP port; TLS and SuperNode auth, or insecure."""
    args = ["--port", str(port)]
    if simulation:
        args.append("--simulation")
    if certs is None:
        return [*args, "--insecure"]
    return [
        *args,
        "--ssl-ca-certfile", str(certs.ca),
        "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key),
        "--enable-supernode-auth",
    ]  # fmt: skip


def supernode_args(
    superlink: str,
    port: int,
    node_config: str,
    certs: Certificates | None,
    private_key: Path | None = None,
    own_superexec: bool = False,
) -> list[str]:
    """flower-supernode's flags: its SuperLink, its own Runtime API port, its node config;
    `own_superexec`: it starts no SuperExec, one is started beside it (`--isolation process`)."""
    args = ["--superlink", superlink, "--port", str(port), "--node-config", node_config]
    if own_superexec:
        args += ["--isolation", "process"]
    if certs is None:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(certs.ca)]
    if private_key is not None:
        args += ["--auth-supernode-private-key", str(private_key)]
    return args


SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower 1.41's and 1.42's, in seconds
SUPEREXEC_POLL_SECONDS = "0.1"  # a SuperExec looks for a new task this often (Flower: 1 s)


def supernode_command(poll: float, python: str = sys.executable) -> list[str]:
    """The SuperNode program, before its flags: `fgl_accel.supernode`, asking for work every
    `poll` s, or Flower's own flower-supernode where `poll` is Flower's 3 s."""
    if poll >= FLOWER_POLL_SECONDS:
        return [str(BIN / "flower-supernode")]
    return [*module_command("fgl_accel.supernode", python), "--poll", f"{poll:g}"]


def superexec_args(runtime_port: int, supernode_pid: int) -> list[str]:
    """`fgl_accel.superexec` beside a SuperNode: its Runtime API (loopback, no TLS, as the
    SuperExec that flower-supernode starts itself uses it), and the SuperNode to outlive not."""
    return [
        *module_command("fgl_accel.superexec"),
        "--runtime-api-address", f"127.0.0.1:{runtime_port}",
        "--insecure",
        "--parent-pid", str(supernode_pid),
    ]  # fmt: skip


def threads_per_node(nodes: int) -> dict[str, str]:
    """OMP_NUM_THREADS for SuperNodes sharing this machine: its cores split among them.

    Every ClientApp process would otherwise start one PyTorch thread per core: three silos
    training at once on two cores ran six threads and trained 5-10 times slower than one silo
    alone. A value already in the environment is kept.
    """
    if "OMP_NUM_THREADS" in os.environ or nodes < 1:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // nodes))}


def node_config_string(node_config: dict[str, str | int | float]) -> str:
    """As --node-config takes it: `partition-id=0 num-partitions=3`, `data-path="/d/a.npz"`."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())


class LocalFederation:
    """The processes of one launch: a SuperLink, its SuperNodes, and whatever they start.

    Used as a context manager: on exit, whatever happened, every process is stopped (SuperNodes
    first), any descendant seen while it ran and still alive is killed (a SuperNode killed
    from outside leaves its SuperExec behind for a moment), and the PIDs land in launch.json.
    """

    def __init__(self, run_dir: Path, topology: Topology) -> None:
        self.run_dir = run_dir
        self.topology = topology
        self.home = Path(tempfile.mkdtemp(prefix="fgl-flwr-home-"))
        self.port = free_port()
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # they spawn SuperExec
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS)
        self.flwr = FlowerCLI(self.home, self.env)
        self.certs: Certificates | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self.superexecs: list[subprocess.Popen] = []  # one per SuperNode, with fork_clientapp
        self._helpers: list[subprocess.Popen] = []  # log streamers
        self._descendants = Descendants()
        self.launch_record: dict = {
            "port": self.port,
            "topology": topology.describe(),
            "superlink": None,
            "supernodes": [],
        }
        self._write_launch_record()

    # --- lifecycle ---
    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[int]:
        stopped: list[int] = []
        # a SuperExec before its SuperNode: stopped after it, a SuperExec would get two signals
        # (its parent watch raises SIGINT when the SuperNode is gone, then our SIGTERM), and a
        # second signal in the middle of Flower's exit handler is printed as a traceback
        for proc in [*self._helpers, *self.superexecs, *self.supernodes]:
            stopped += stop_process(proc, grace=5.0)
        if self.superlink is not None:
            stopped += stop_process(self.superlink)
        # a process re-parented before the stop (its parent was killed) is in no tree now
        survivors = self._descendants.kill_survivors(stopped)
        seen = self._descendants.seen
        self.launch_record["stopped-pids"] = sorted({*stopped, *survivors, *seen})
        self._write_launch_record()
        shutil.rmtree(self.home, ignore_errors=True)
        self.superlink, self.supernodes, self.superexecs, self._helpers = None, [], [], []
        return self.launch_record["stopped-pids"]

    def track_descendants(self) -> None:
        """Remember every process below the ones we started (call often while running)."""
        roots = [p for p in [self.superlink, *self.supernodes, *self.superexecs] if p is not None]
        self._descendants.refresh(roots)

    def _write_launch_record(self) -> None:
        (self.run_dir / "launch.json").write_text(json.dumps(self.launch_record, indent=2))

    def _popen(self, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with log.open("w") as out:  # the child keeps its own copy of the file descriptor
            return subprocess.Popen(
                args,
                env=env,
                cwd=env["FLWR_HOME"],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    # --- SuperLink ---
    def start_superlink(self, wait: float = 60.0) -> None:
        if self.topology.tls:
            self.certs = make_certificates(
                self.topology.certs_dir or self.home / "certs", len(self.topology.node_configs)
            )
        self.flwr.connect(self.port, self.certs and self.certs.ca, self.topology.simulation)
        args = [
            str(BIN / "flower-superlink"),
            *superlink_args(self.port, self.certs, bool(self.topology.simulation)),
        ]
        log = self.run_dir / "superlink.log"
        superlink = self.superlink = self._popen(args, log, self.env)
        self.launch_record["superlink"] = {"pid": superlink.pid, "log": str(log), "args": args[1:]}
        self._write_launch_record()

        def listening() -> bool:
            if superlink.poll() is not None:
                raise RuntimeError(
                    f"the SuperLink exited with code {superlink.returncode}; see {log}"
                )
            return port_open(self.port)

        failure = f"the SuperLink did not open port {self.port} within {wait:.0f} s"
        poll_until(listening, wait, failure, interval=0.2)

    # --- SuperNodes ---
    def start_supernode(
        self, index: int, node_config: dict[str, str | int], private_key: Path | None = None
    ) -> subprocess.Popen:
        """Start one `flower-supernode` with its own FLWR_HOME and Runtime API port (and, with
        `fork_clientapp`, `fgl_accel.superexec` beside it: superexec-<index>.log)."""
        home = self.home / f"supernode-{index}"
        home.mkdir(exist_ok=True)
        port = free_port()
        config = node_config_string(node_config)
        fork = self.topology.fork_clientapp
        command = supernode_command(self.topology.node_poll)
        args = [
            *command,
            *supernode_args(f"127.0.0.1:{self.port}", port, config, self.certs, private_key, fork),
        ]
        log = self.run_dir / f"supernode-{index}.log"
        threads = threads_per_node(len(self.topology.node_configs))
        env = {**self.env, **threads, "FLWR_HOME": str(home)}
        proc = self._popen(args, log, env)
        self.supernodes.append(proc)
        entry = {
            "index": index,
            "pid": proc.pid,
            "port": port,
            "node-config": config,
            "log": str(log),
            "args": args[len(command) :],
            "command": command,
        }
        if fork:
            superexec_log = self.run_dir / f"superexec-{index}.log"
            superexec = self._popen(superexec_args(port, proc.pid), superexec_log, env)
            self.superexecs.append(superexec)
            entry["superexec"] = {"pid": superexec.pid, "log": str(superexec_log)}
        self.launch_record["supernodes"].append(entry)
        self._write_launch_record()
        return proc

    def start_supernodes(self) -> None:
        for index, node_config in enumerate(self.topology.node_configs):
            key = None
            if self.certs is not None:
                self.flwr.register(self.certs.node_public_key(index))
                key = self.certs.node_key(index)
            self.start_supernode(index, node_config, key)

    def wait_for_supernodes(self, timeout: float = 120.0) -> None:
        """Until every SuperNode is online; a SuperNode that exits first is an error."""
        online = 0

        def all_online() -> bool:
            nonlocal online
            self.track_descendants()
            for what in self.exited_supernodes().values():
                raise RuntimeError(f"{what} before the run started")
            online = self.flwr.online_nodes()
            return online >= len(self.supernodes)

        poll_until(
            all_online,
            timeout,
            lambda: (
                f"only {online} of {len(self.supernodes)} SuperNodes came online within "
                f"{timeout:.0f} s; see the supernode-*.log files in {self.run_dir}"
            ),
        )

    def exited_supernodes(self) -> dict[int, str]:
        """SuperNode index -> what exited, its code and its log, for nodes that can no longer
        work (the SuperNode, or the SuperExec started beside it, exited)."""
        exited = {}
        for index, proc in enumerate(self.supernodes):
            superexec = self.superexecs[index] if self.superexecs else None
            if proc.poll() is not None:
                what, code, log = f"SuperNode {index}", proc.returncode, "supernode"
            elif superexec is not None and superexec.poll() is not None:
                what, code = f"the SuperExec of SuperNode {index}", superexec.returncode
                log = "superexec"
            else:
                continue
            exited[index] = (
                f"{what} exited with code {code}; see {self.run_dir / f'{log}-{index}.log'}"
            )
        return exited

    # --- the run ---
    def submit(self, app: Path, values: dict) -> str:
        run_id = self.flwr.submit(app, values)
        self.launch_record["run-id"] = run_id
        self._write_launch_record()
        return run_id

    def follow(self, run_id: str, timeout: float, show: Callable[[], None]) -> str:
        """Follow the run until Flower says it finished; return its final status.

        Its log streams into run.log; `show` is called at every poll (it prints what the user
        should see: the log, or a line per phase and round). Past `timeout` s the run is stopped.
        """
        log = self.run_dir / "run.log"
        self._helpers.append(self._popen(self.flwr.log_command(run_id), log, self.env))
        reported: set[int] = set()
        status = "unknown"
        serverapp = ServerAppWatch()

        def finished() -> bool:
            nonlocal status
            show()
            self.track_descendants()
            for index, what in self.exited_supernodes().items():
                if index not in reported:
                    reported.add(index)
                    print(f"{what}; the run goes on without it")
            if self.superlink is not None and self.superlink.poll() is not None:
                status = f"the SuperLink exited with code {self.superlink.returncode}"
                return True
            info = self.flwr.run_info(run_id)
            status = str(info.get("status", "unknown"))
            if status.startswith("finished:"):
                # wall time and bytes on the wire, as Flower counts them
                self.launch_record["run"] = info
                return True
            died = serverapp.died(self._descendants.seen)
            if died:  # the SuperLink would say so only when the heartbeats lapse
                self.flwr.stop(run_id)
                status = died
                return True
            return False

        try:
            poll_until(finished, timeout, "", interval=2.0)
        except TimeoutError:
            self.flwr.stop(run_id)
            status = f"timed out after {timeout:.0f} s"
        time.sleep(1)  # the log streamer's last lines
        show()
        self._write_launch_record()
        return status


class LogEcho:
    """Print what a log file gained since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def __call__(self) -> None:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            self.offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()


class Progress:
    """One line per phase and per round as results.json records them, with central accuracy,
    and the server's progress lines while a long phase runs (synthesis, one-shot)."""

    PHASES = ("load-data", "adapt", "embed", "synthesize", "one-shot")

    def __init__(self, results: Path, rounds: int) -> None:
        self.results, self.rounds = results, rounds
        self.phases: set[str] = set()
        self.logged: set[int] = set()
        self.adapted: set[int] = set()  # adaptation rounds printed
        self.progress: dict | None = None
        self.mtime = time.time_ns()  # a results.json from an earlier run is not this one's

    def __call__(self) -> None:
        try:
            mtime = self.results.stat().st_mtime_ns
            if mtime <= self.mtime:
                return
            results = json.loads(self.results.read_text())
            self.mtime = mtime
        except (OSError, ValueError):  # not written yet, or caught mid-write: next time
            return
        progress = results.get("progress")
        if isinstance(progress, dict) and progress != self.progress:
            self.progress = progress
            with contextlib.suppress(TypeError, ValueError):  # another version's: not shown
                print(f"  {Snapshot.from_json(progress).line()}", flush=True)
        adaptation = results.get("adaptation")
        for record in adaptation.get("rounds", []) if isinstance(adaptation, dict) else []:
            if record["round"] not in self.adapted:
                self.adapted.add(record["round"])
                silos = [s for s in record["silos"].values() if "left-out" not in s]
                loss = sum(s["adapt-loss"] for s in silos) / max(1, len(silos))
                print(f"  adaptation round {record['round']}: {len(silos)} silos averaged, "
                      f"mean loss {loss:.4f}", flush=True)  # fmt: skip
        for phase, seconds in results.get("phase-seconds", {}).items():
            if phase in self.PHASES and phase not in self.phases:
                self.phases.add(phase)
                extra = ""
                if phase == "one-shot" and "one-shot" in results:
                    extra = f": test accuracy {results['one-shot']['test-accuracy']:.3f}"
                print(f"  {phase} done in {seconds:.0f} s{extra}", flush=True)
        for row in results.get("rounds", []):
            if row["round"] not in self.logged and row["round"] > 0:
                self.logged.add(row["round"])
                print(
                    f"  round {row['round']}/{self.rounds}: test accuracy "
                    f"{row['test-accuracy']:.3f} ({row['end-seconds']:.0f} s)",
                    flush=True,
                )
