"""Run the app end to end on this machine, as a simulation or as a real local deployment.

    python -m deploy.launch --simulation 5 --run-config 'dataset="data/blood.npz" alpha=0.1'
    python -m deploy.launch --supernodes 3 --tls --run-config 'strategy="fgl"'
    python -m deploy.launch --node-data silo-a.npz --node-data silo-b/ --tls

`--simulation N` starts one SuperLink in simulation mode with N virtual silos. `--supernodes N`
starts a SuperLink and N `flower-supernode` processes on loopback, each with its own FLWR_HOME
and port, each given `partition-id`/`num-partitions`; `--node-data PATH` (repeatable) starts one
SuperNode per PATH that trains and embeds from that node-local dataset alone; the machine's cores
are split among them. Each SuperNode is Flower's, asking for work every `--node-poll` seconds
(default 0.2, `fgl_accel.supernode`; Flower's hard-coded 3 s with `--node-poll 3`, which starts
Flower's own `flower-supernode`), and its ClientApps are forks of a process with Flower and
PyTorch loaded (`fgl_accel.superexec`; `--flower-superexec`: Flower's SuperExec, a new
interpreter per message). `--stock-flower` is both: Flower's processes as Flower ships them, as
a real deployment runs them. `--tls` makes a CA,
a server certificate and one key pair per SuperNode (deploy/certs.py), starts the SuperLink with
TLS and `--enable-supernode-auth`, and registers every SuperNode's public key before it starts.

The launcher validates the run config before starting anything, waits until the SuperLink and
every SuperNode are up, submits the run with `flwr run`, prints a line per phase and per round
(`--log`: the run's whole log instead), polls `flwr ls` until the run is finished (`flwr run
--stream` exits 0 even when a run fails) or its ServerApp process has died, stops every process
it started (and everything they started) by PID, and exits 0 only when the run ended
`finished:completed`. Results land in `<output-dir>/<run-name>/`, with one log per process and
`launch.json`, which lists every PID as it starts and the PIDs stopped at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
import tomllib
from pathlib import Path

from flwr.common.config import parse_config_args

from deploy.federation import LocalFederation, LogEcho, Progress, Topology
from fgl_accel.supernode import FLOWER_POLL_SECONDS, POLL_SECONDS, poll_seconds
from fgl_core.config import ConfigError, RunConfig
from fgl_core.datasets import DatasetError, load_dataset
from fgl_core.hf_datasets import absolute_source
from fgl_core.partition import PartitionError, partition_dataset

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_run_config(app: Path, overrides: list[str]) -> tuple[RunConfig, dict]:
    """App defaults + overrides, validated; relative output/cache paths made absolute here."""
    defaults = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    values = {**defaults, **parse_config_args(overrides)}
    cfg = RunConfig.from_flower(values, where="--run-config")
    for key in ("output-dir", "cache-dir", "dataset", "model-weights"):
        if values[key]:
            values[key] = absolute_source(values[key])
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


def launch(
    app: Path, topology: Topology, overrides: list[str], timeout: float, output: str = "progress"
) -> int:
    """Start the federation, run the app on it, stop it; 0 when the run completed.

    `output`: "progress" (a line per phase and round), "log" (the run's whole log) or "quiet".
    """
    cfg, values = resolve_run_config(app, overrides)
    values["min-nodes"] = topology.num_silos
    check_silo_data(cfg, topology)
    run_dir = Path(values["output-dir"]) / values["run-name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    show = {
        "progress": Progress(run_dir / "results.json", cfg.num_server_rounds),
        "log": LogEcho(run_dir / "run.log"),
        "quiet": lambda: None,
    }[output]
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
        status = federation.follow(run_id, timeout, show)
    print(f"run {run_id}: {status}; results in {run_dir}")
    return 0 if status == "finished:completed" else 1


def launch_simulation(
    app: Path, num_silos: int, overrides: list[str], timeout: float, output: str = "progress"
) -> int:
    return launch(app, Topology(simulation=num_silos), overrides, timeout, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        help="one SuperNode with this node-local dataset (.npz, ImageFolder, hf:DIR); repeatable",
    )
    parser.add_argument(
        "--tls", action="store_true", help="TLS and SuperNode authentication (not --simulation)"
    )
    parser.add_argument(
        "--certs", type=Path, help="keep (or reuse) the CA and keys here instead of a temp dir"
    )
    parser.add_argument(
        "--node-poll",
        type=poll_seconds,
        default=POLL_SECONDS,
        metavar="SECONDS",
        help=f"an idle SuperNode asks the SuperLink for work every SECONDS (default "
        f"{POLL_SECONDS}); {FLOWER_POLL_SECONDS:g}: Flower's own flower-supernode, which waits 3 s",
    )
    parser.add_argument(
        "--flower-superexec",
        action="store_true",
        help="each SuperNode starts Flower's SuperExec (a new flwr-clientapp interpreter per "
        "message) instead of fgl_accel.superexec beside it (a fork per message)",
    )
    parser.add_argument(
        "--stock-flower",
        action="store_true",
        help=f"Flower's processes as Flower ships them: --flower-superexec --node-poll "
        f"{FLOWER_POLL_SECONDS:g}",
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
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--log", action="store_true", help="echo the run's whole log")
    shown.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C does, so that every process started so far is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    secure = {"tls": args.tls, "certs_dir": args.certs.resolve() if args.certs else None}
    if args.simulation is not None:
        if args.simulation < 1:
            parser.error("--simulation needs at least 1 silo")
        if args.tls or args.certs:
            parser.error("--tls and --certs apply to SuperNodes, not to --simulation")
        if args.stock_flower or args.flower_superexec:
            parser.error(
                "--stock-flower and --flower-superexec apply to SuperNodes, not to --simulation"
            )
        topology = Topology(simulation=args.simulation)
    elif args.supernodes is not None:
        if args.supernodes < 1:
            parser.error("--supernodes needs at least 1 SuperNode")
        topology = Topology.partitions(args.supernodes, **secure)
    else:
        topology = Topology.node_local(args.node_data, **secure)
    if args.stock_flower:
        args.flower_superexec, args.node_poll = True, FLOWER_POLL_SECONDS
    if args.simulation is None:
        topology = dataclasses.replace(
            topology, fork_clientapp=not args.flower_superexec, node_poll=args.node_poll
        )
    output = "log" if args.log else "quiet" if args.quiet else "progress"
    try:
        return launch(args.app.resolve(), topology, args.run_config, args.timeout, output)
    except (ConfigError, DatasetError, PartitionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
