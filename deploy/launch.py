"""Run the app end to end on this machine, as a simulation or as a real local deployment.

    python deploy/launch.py --simulation 5 --run-config 'dataset="data/blood.npz" alpha=0.1'
    python deploy/launch.py --supernodes 3 --tls --run-config 'strategy="fgl"'
    python deploy/launch.py --node-data silo-a.npz --node-data silo-b/ --tls

`--simulation N` starts one SuperLink in simulation mode with N virtual silos. `--supernodes N`
starts a SuperLink and N `flower-supernode` processes on loopback, each with its own FLWR_HOME
and port, each given `partition-id`/`num-partitions`; `--node-data PATH` (repeatable) starts one
SuperNode per PATH that trains and embeds from that node-local dataset alone. `--tls` makes a CA,
a server certificate and one key pair per SuperNode (deploy/certs.py), starts the SuperLink with
TLS and `--enable-supernode-auth`, and registers every SuperNode's public key before it starts.

The launcher validates the run config before starting anything, waits until the SuperLink and
every SuperNode are up, submits the run with `flwr run`, streams its log, polls `flwr ls` until
the run is finished (`flwr run --stream` exits 0 even when a run fails), stops every process it
started (and everything they started) by PID, and exits 0 only when the run ended
`finished:completed`. Results land in `<output-dir>/<run-name>/`, with one log per process and
`launch.json`, which lists every PID as it starts and the PIDs stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from certs import Certificates, make_certificates
from flwr.common.config import parse_config_args

from fgl_core.config import ConfigError, RunConfig
from fgl_core.datasets import DatasetError, load_dataset
from fgl_core.partition import PartitionError, partition_dataset

CONNECTION = "fgl-local"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode of this environment


@dataclass
class Topology:
    """What to start: simulated silos, or real SuperNodes with their node configs."""

    simulation: int = 0
    node_configs: list[dict[str, str | int]] = field(default_factory=list)
    tls: bool = False
    certs_dir: Path | None = None  # None: a fresh CA and keys for this launch only

    @classmethod
    def partitions(cls, n: int, **kwargs: object) -> Topology:
        configs = [{"partition-id": i, "num-partitions": n} for i in range(n)]
        return cls(node_configs=configs, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def node_local(cls, paths: list[str], **kwargs: object) -> Topology:
        configs = [{"data-path": str(Path(p).expanduser().resolve())} for p in paths]
        return cls(node_configs=configs, **kwargs)  # type: ignore[arg-type]

    @property
    def num_silos(self) -> int:
        return self.simulation or len(self.node_configs)

    def describe(self) -> str:
        if self.simulation:
            return f"{self.simulation} simulated silos"
        secure = "TLS + SuperNode auth" if self.tls else "insecure"
        return f"{len(self.node_configs)} SuperNodes on loopback ({secure})"


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_time(pid: int) -> str | None:
    """The kernel's start tick of `pid`: tells a process from a later one with the same PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (Linux /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> list[int]:
    """Stop a process we started and every process below it; return the PIDs stopped.

    The tree is taken before anything is signalled: SuperLink and SuperNode start their
    SuperExec in a session of their own, and children are re-parented once their parent dies.
    """
    tree = process_tree(proc.pid) if proc.poll() is None else [proc.pid]
    signal_all(tree, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    time.sleep(0.5)
    signal_all(tree, signal.SIGKILL)
    proc.wait()
    return tree


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
) -> list[str]:
    """flower-supernode's flags: its SuperLink, its own Runtime API port, its node config."""
    args = ["--superlink", superlink, "--port", str(port), "--node-config", node_config]
    if certs is None:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(certs.ca)]
    if private_key is not None:
        args += ["--auth-supernode-private-key", str(private_key)]
    return args


def node_config_string(node_config: dict[str, str | int]) -> str:
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
        self.certs: Certificates | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self._helpers: list[subprocess.Popen] = []  # log streamers
        self._seen: dict[int, str] = {}  # every descendant PID seen, with its start time
        self.record: dict = {
            "port": self.port,
            "topology": topology.describe(),
            "superlink": None,
            "supernodes": [],
        }
        self._write_record()

    # --- lifecycle ---
    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[int]:
        stopped: list[int] = []
        for proc in [*self._helpers, *self.supernodes]:
            stopped += stop_process(proc, grace=5.0)
        if self.superlink is not None:
            stopped += stop_process(self.superlink)
        # a process re-parented before the stop (its parent was killed) is not in any tree
        # now, but it was seen while running: its start time tells it from a reused PID
        leftovers = [p for p, t in self._seen.items() if p not in stopped and _start_time(p) == t]
        signal_all(leftovers, signal.SIGKILL)
        self.record["stopped-pids"] = sorted({*stopped, *leftovers, *self._seen})
        self._write_record()
        shutil.rmtree(self.home, ignore_errors=True)
        self.superlink, self.supernodes, self._helpers = None, [], []
        return self.record["stopped-pids"]

    def refresh(self) -> None:
        """Remember every process below the ones we started (poll often while running)."""
        roots = [p for p in [self.superlink, *self.supernodes] if p is not None]
        for proc in roots:
            if proc.poll() is None:
                for pid in process_tree(proc.pid):
                    if pid not in self._seen and (started := _start_time(pid)):
                        self._seen[pid] = started

    def _write_record(self) -> None:
        (self.run_dir / "launch.json").write_text(json.dumps(self.record, indent=2))

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
        connection = [f'address = "127.0.0.1:{self.port}"']
        if self.topology.tls:
            self.certs = make_certificates(
                self.topology.certs_dir or self.home / "certs", len(self.topology.node_configs)
            )
            connection.append(f'root-certificates = "{self.certs.ca}"')
        else:
            connection.append("insecure = true")
        args = [
            str(BIN / "flower-superlink"),
            *superlink_args(self.port, self.certs, bool(self.topology.simulation)),
        ]
        config = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        config += "\n".join(connection) + "\n"
        if self.topology.simulation:
            config += (
                f"\n[superlink.{CONNECTION}.options]\nnum-supernodes = {self.topology.simulation}\n"
            )
        (self.home / "config.toml").write_text(config)
        log = self.run_dir / "superlink.log"
        self.superlink = self._popen(args, log, self.env)
        self.record["superlink"] = {"pid": self.superlink.pid, "log": str(log), "args": args[1:]}
        self._write_record()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(
                    f"the SuperLink exited with code {self.superlink.returncode}; see {log}"
                )
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the SuperLink did not open port {self.port} within {wait:.0f} s")

    def flwr(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.home,
            text=True,
            capture_output=True,
            timeout=timeout,
        )

    # --- SuperNodes ---
    def register(self, public_key: Path) -> str:
        """Register a SuperNode's public key with the SuperLink (auth mode); its node ID."""
        out = self.flwr(["supernode", "register", str(public_key), CONNECTION, "--format", "json"])
        try:
            return str(json.loads(out.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(
                f"could not register {public_key}: {out.stdout.strip()} {out.stderr.strip()}"
            ) from None

    def start_supernode(
        self, index: int, node_config: dict[str, str | int], private_key: Path | None = None
    ) -> subprocess.Popen:
        """Start one `flower-supernode` with its own FLWR_HOME and Runtime API port."""
        home = self.home / f"supernode-{index}"
        home.mkdir(exist_ok=True)
        port = free_port()
        config = node_config_string(node_config)
        args = [
            str(BIN / "flower-supernode"),
            *supernode_args(f"127.0.0.1:{self.port}", port, config, self.certs, private_key),
        ]
        log = self.run_dir / f"supernode-{index}.log"
        proc = self._popen(args, log, {**self.env, "FLWR_HOME": str(home)})
        self.supernodes.append(proc)
        self.record["supernodes"].append(
            {
                "index": index,
                "pid": proc.pid,
                "port": port,
                "node-config": config,
                "log": str(log),
                "args": args[1:],
            }
        )
        self._write_record()
        return proc

    def start_supernodes(self) -> None:
        for index, node_config in enumerate(self.topology.node_configs):
            key = None
            if self.certs is not None:
                self.register(self.certs.node_public_key(index))
                key = self.certs.node_key(index)
            self.start_supernode(index, node_config, key)

    def online_nodes(self) -> int:
        try:
            out = self.flwr(["supernode", "ls", CONNECTION, "--format", "json"], timeout=60)
            nodes = json.loads(out.stdout)["nodes"]
        except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError):
            return 0  # a busy machine or a SuperLink still starting: ask again
        return sum(node.get("status") == "online" for node in nodes)

    def wait_for_supernodes(self, timeout: float = 120.0) -> None:
        """Until every SuperNode is online; a SuperNode that exits first is an error."""
        deadline = time.monotonic() + timeout
        while (online := self.online_nodes()) < len(self.supernodes):
            self.refresh()
            for index, code in self.exited_supernodes().items():
                raise RuntimeError(
                    f"SuperNode {index} exited with code {code} before the run started; "
                    f"see {self.run_dir / f'supernode-{index}.log'}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {online} of {len(self.supernodes)} SuperNodes came online within "
                    f"{timeout:.0f} s; see the supernode-*.log files in {self.run_dir}"
                )
            time.sleep(0.5)

    def exited_supernodes(self) -> dict[int, int]:
        """SuperNode index -> exit code, for those no longer running."""
        return {
            entry["index"]: proc.returncode
            for entry, proc in zip(self.record["supernodes"], self.supernodes, strict=True)
            if proc.poll() is not None
        }

    # --- the run ---
    def submit(self, app: Path, values: dict) -> str:
        overrides = self.home / "run-config.toml"
        overrides.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n")
        out = self.flwr(
            ["run", str(app), CONNECTION, "--run-config", str(overrides), "--format", "json"],
            timeout=300,
        )
        try:
            run_id = str(json.loads(out.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr run failed:\n{out.stdout}\n{out.stderr}") from None
        self.record["run-id"] = run_id
        self._write_record()
        return run_id

    def run_info(self, run_id: str) -> dict:
        try:
            out = self.flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], timeout=60)
            return dict(json.loads(out.stdout)["runs"][0])
        except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError, IndexError):
            return {"status": "unknown"}  # a poll that timed out on a busy machine: ask again

    def follow(self, run_id: str, timeout: float, echo: bool) -> str:
        """Stream the run's log into run.log (and stdout); return its final status."""
        run_log = self.run_dir / "run.log"
        self._helpers.append(
            self._popen(
                [str(BIN / "flwr"), "log", run_id, CONNECTION, "--stream"], run_log, self.env
            )
        )
        tail = _Follow(run_log) if echo else (lambda: None)
        reported: set[int] = set()
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            tail()
            self.refresh()
            for index, code in self.exited_supernodes().items():
                if index not in reported:
                    reported.add(index)
                    print(f"SuperNode {index} exited with code {code}; the run goes on without it")
            if self.superlink is not None and self.superlink.poll() is not None:
                status = f"the SuperLink exited with code {self.superlink.returncode}"
                break
            info = self.run_info(run_id)
            status = str(info.get("status", "unknown"))
            if status.startswith("finished:"):
                self.record["run"] = info  # wall time and bytes on the wire, as Flower counts
                break
            time.sleep(2)
        else:
            self.flwr(["stop", run_id, CONNECTION], timeout=60)
            status = f"timed out after {timeout:.0f} s"
        time.sleep(1)
        tail()
        self._write_record()
        return status


class _Follow:
    """Echo new lines of a log file each time it is called."""

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


# --- config and data checks ---------------------------------------------------------------


def resolve_run_config(app: Path, overrides: list[str]) -> tuple[RunConfig, dict]:
    """App defaults + overrides, validated; relative output/cache paths made absolute here."""
    defaults = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    values = {**defaults, **parse_config_args(overrides)}
    cfg = RunConfig.from_flower(values, where="--run-config")
    for key in ("output-dir", "cache-dir", "dataset", "model-weights"):
        value = values[key]
        if value and not Path(value).is_absolute() and Path(value).exists():
            values[key] = str(Path(value).resolve())
    values["output-dir"] = str(Path(values["output-dir"]).resolve())
    values["cache-dir"] = str(Path(values["cache-dir"]).resolve())
    if not values["run-name"]:
        values["run-name"] = cfg.default_run_name(time.strftime("%Y%m%d-%H%M%S"))
    return RunConfig.from_flower(values, where="--run-config"), values


def check_silo_data(cfg: RunConfig, topology: Topology) -> None:
    """Fail now on data the silos share; warn about node-local data that will not load.

    A SuperNode whose own data is broken still starts, as a real silo would: it fails every
    message it gets, the run records why, and the other silos go on.
    """
    if cfg.strategy == "centralized":
        return
    if topology.simulation or any("partition-id" in c for c in topology.node_configs):
        partition_dataset(cfg, load_dataset(cfg), topology.num_silos)
    for index, node_config in enumerate(topology.node_configs):
        if "data-path" in node_config:
            try:
                load_dataset(cfg, source=str(node_config["data-path"]))
            except DatasetError as err:
                print(f"warning: SuperNode {index} will fail every message: {err}", file=sys.stderr)


# --- entry points -------------------------------------------------------------------------


def launch(
    app: Path, topology: Topology, overrides: list[str], timeout: float, quiet: bool = False
) -> int:
    cfg, values = resolve_run_config(app, overrides)
    values["min-nodes"] = topology.num_silos
    check_silo_data(cfg, topology)
    run_dir = Path(values["output-dir"]) / values["run-name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with LocalFederation(run_dir, topology) as federation:
        try:
            federation.start_superlink()
            federation.start_supernodes()
            federation.wait_for_supernodes()
            run_id = federation.submit(app, values)
        except (RuntimeError, TimeoutError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"run {run_id} submitted: {topology.describe()}, strategy {cfg.strategy}")
        status = federation.follow(run_id, timeout, echo=not quiet)
    print(f"run {run_id}: {status}; results in {run_dir}")
    return 0 if status == "finished:completed" else 1


def launch_simulation(
    app: Path, num_silos: int, overrides: list[str], timeout: float, quiet: bool = False
) -> int:
    return launch(app, Topology(simulation=num_silos), overrides, timeout, quiet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--simulation", type=int, metavar="N", help="N simulated silos")
    where.add_argument(
        "--supernodes", type=int, metavar="N", help="N SuperNodes, one partition of 'dataset' each"
    )
    where.add_argument(
        "--node-data",
        action="append",
        metavar="PATH",
        help="one SuperNode with this node-local dataset (.npz or ImageFolder); repeatable",
    )
    parser.add_argument(
        "--tls", action="store_true", help="TLS and SuperNode authentication (not --simulation)"
    )
    parser.add_argument(
        "--certs", type=Path, help="keep (or reuse) the CA and keys here instead of a temp dir"
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        help="overrides, as in flwr run: 'key=value key2=\"text\"'",
    )
    parser.add_argument("--app", type=Path, default=PROJECT_ROOT, help="the Flower app directory")
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds before the run is stopped"
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the run's log")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C does, so that every process started so far is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    secure = {"tls": args.tls, "certs_dir": args.certs.resolve() if args.certs else None}
    if args.simulation is not None:
        if args.simulation < 1:
            parser.error("--simulation needs at least 1 silo")
        if args.tls or args.certs:
            parser.error("--tls and --certs apply to SuperNodes, not to --simulation")
        topology = Topology(simulation=args.simulation)
    elif args.supernodes is not None:
        if args.supernodes < 1:
            parser.error("--supernodes needs at least 1 SuperNode")
        topology = Topology.partitions(args.supernodes, **secure)
    else:
        topology = Topology.node_local(args.node_data, **secure)
    try:
        return launch(args.app.resolve(), topology, args.run_config, args.timeout, args.quiet)
    except (ConfigError, DatasetError, PartitionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
