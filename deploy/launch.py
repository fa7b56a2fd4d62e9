"""Run the app end to end on this machine: start a SuperLink, submit the run, follow it, stop.

    python deploy/launch.py --simulation 5 --run-config 'dataset="data/blood.npz" alpha=0.1'

It validates the run config before starting anything, gives the SuperLink its own FLWR_HOME
and port, streams the run's log, polls `flwr ls` until the run is finished (`flwr run --stream`
exits 0 even when a run fails), stops every process it started, and exits 0 only when the
run ended `finished:completed`. Results land in `<output-dir>/<run-name>/`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import ExitStack
from pathlib import Path

from flwr.common.config import parse_config_args

from fgl_core.config import ConfigError, RunConfig
from fgl_core.datasets import DatasetError, load_dataset
from fgl_core.partition import PartitionError, partition_dataset

CONNECTION = "fgl-local"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flwr and flower-superlink of this environment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {proc.returncode}; see {log_file}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the SuperLink did not open port {port} within {timeout:.0f} s")


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

    The tree is taken before anything is signalled: the SuperLink starts its SuperExec in a
    session of its own, and Ray's workers would be re-parented once their parent is gone.
    """
    tree = process_tree(proc.pid) if proc.poll() is None else [proc.pid]
    signal_all(tree, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    time.sleep(0.5)
    signal_all(tree, signal.SIGKILL)
    proc.wait()
    return tree


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


def flwr(args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=env,
        text=True,
        capture_output=True,
        **kwargs,
    )


def run_status(run_id: str, env: dict[str, str]) -> str:
    out = flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], env, timeout=60)
    try:
        runs = json.loads(out.stdout)["runs"]
        return str(runs[0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown"


def launch_simulation(
    app: Path, num_silos: int, overrides: list[str], timeout: float, quiet: bool = False
) -> int:
    cfg, values = resolve_run_config(app, overrides)
    values["min-nodes"] = num_silos
    if cfg.strategy != "centralized":  # the simulated silos share this machine's data: check it now
        partition_dataset(cfg, load_dataset(cfg), num_silos)
    run_dir = Path(values["output-dir"]) / values["run-name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fgl-flwr-home-")))
        port = free_port()
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperLink spawns SuperExec
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n\n'
            f"[superlink.{CONNECTION}.options]\nnum-supernodes = {num_silos}\n"
        )
        overrides_file = home / "run-config.toml"
        overrides_file.write_text(
            "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n"
        )
        link_log = run_dir / "superlink.log"
        link = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--simulation", "--insecure", "--port", str(port)],
            env=env,
            cwd=home,
            stdout=link_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        launch_record = {"superlink-pid": link.pid, "port": port, "num-silos": num_silos}
        launch_file = run_dir / "launch.json"
        launch_file.write_text(json.dumps(launch_record, indent=2))

        def stop_superlink() -> None:
            launch_record["stopped-pids"] = stop_process(link)
            launch_file.write_text(json.dumps(launch_record, indent=2))

        stack.callback(stop_superlink)
        wait_for_port(port, link, 60, link_log)

        submitted = flwr(
            ["run", str(app), CONNECTION, "--run-config", str(overrides_file), "--format", "json"],
            env,
            timeout=300,
        )
        try:
            run_id = json.loads(submitted.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError):
            print(f"flwr run failed:\n{submitted.stdout}\n{submitted.stderr}", file=sys.stderr)
            return 2
        print(f"run {run_id} submitted: {num_silos} simulated silos, strategy {cfg.strategy}")

        run_log = run_dir / "run.log"
        streamer = subprocess.Popen(
            [str(BIN / "flwr"), "log", run_id, CONNECTION, "--stream"],
            env=env,
            stdout=run_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stack.callback(stop_process, streamer, 2.0)
        tail = None if quiet else stack.enter_context(_follow(run_log))

        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            if tail:
                tail()
            status = run_status(run_id, env)
            if status.startswith("finished:"):
                break
            time.sleep(2)
        else:
            flwr(["stop", run_id, CONNECTION], env, timeout=60)
            status = f"timed out after {timeout:.0f} s"
        time.sleep(1)
        if tail:
            tail()
    print(f"run {run_id}: {status}; results in {run_dir}")
    return 0 if status == "finished:completed" else 1


class _follow:
    """Echo new lines of a log file each time it is called."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def __enter__(self) -> _follow:
        return self

    def __exit__(self, *exc: object) -> None:
        self()

    def __call__(self) -> None:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            self.offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--simulation", type=int, metavar="N", required=True, help="number of simulated silos"
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
    if args.simulation < 1:
        parser.error("--simulation needs at least 1 silo")
    try:
        return launch_simulation(
            args.app.resolve(), args.simulation, args.run_config, args.timeout, args.quiet
        )
    except (ConfigError, DatasetError, PartitionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
