"""docker-compose.yml, really up: the quickstart's FGL run on Flower's images, checked end to end.

    python -m deploy.compose_check                 # insecure
    python -m deploy.compose_check --tls           # + docker-compose.tls.yml (TLS, node auth)
    python -m deploy.compose_check --crash-drill   # a SuperNode's process killed mid-round

Makes sure a Docker engine runs (installs and starts one where none is, as root) and the images are
there (`deploy.images`: pulled, or built as stand-ins and offline from this machine's wheels),
starts the compose project exactly as the compose files say (the TLS variant as its header says:
certificates, the SuperLink, the SuperNodes' keys registered, the rest), submits the quickstart's
FGL run from this host with `flwr run . fgl-docker` (the SuperLink's port, published on loopback for
the operator), waits until Flower says it finished, checks what the run left in `./outputs/<run-
name>/`, and takes the project down, whatever happened. From a container on silo 1's network, as a
silo's host would, it tries what a silo must not do (deploy/silo_attempts.py: claim the run's task,
polled from before the run is submitted until it runs; the Runtime API; `flwr run`, `ls`, `supernode
register` through the proxy; the SuperLink's own port; with TLS, another node's messages and a
SuperNode with an unregistered key): each must be refused. `--crash-drill` kills one SuperNode
container's process once round 1 has finished (as a crash or the OOM killer would; `docker kill` is
a user's stop, which Docker's restart policy ignores): compose's `restart: on-failure` brings it
back and the run must complete. The containers' logs land in `compose.log` beside the results, and
`compose-check.json` holds the seconds of each step and what the drill saw. Exit status 0 only when
every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from deploy import images
from deploy.certs import Certificates, make_certificates
from deploy.flower_cli import FlowerCLI
from deploy.quickstart import RUNS
from fgl_core.polling import poll_until

ROOT = images.ROOT
SILOS = 3
PORT = 9091  # the SuperLink's, as docker-compose.yml publishes it on 127.0.0.1 for the operator
FLEET = "fleet-proxy:9093"  # the proxy, as the silos' containers reach it
ACQUIRE_POLL_SECONDS = 45
APP_USER = 49999  # Flower's images run as `app`
PROJECT = "fglcheck"  # the compose project's name: apart from a user's own `docker compose up`
# the quickstart's FGL run, smaller: this checks the deployment, not fgl-mini
RUN_CONFIG = {
    **dict(item.split("=", 1) for item in RUNS["fgl"].split()),
    "images-per-class": "10",
    "steps": "4",
    "num-server-rounds": "3",
    "local-epochs": "1",
    "evaluate-in-train": "true",
    "min-nodes": str(SILOS),
    "round-timeout": "600.0",
}


class CheckFailed(RuntimeError):
    pass


def compose_program() -> list[str]:
    """`docker compose` (Compose v2) where the plugin is there, else `docker-compose` (1.29)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise CheckFailed("neither `docker compose` nor `docker-compose` is installed")


class Compose:
    """The compose project, started from this checkout's compose files."""

    def __init__(self, tls: bool, state: Path) -> None:
        files = ["docker-compose.yml", *(["docker-compose.tls.yml"] if tls else [])]
        self.base = [*compose_program(), "-p", PROJECT, *(a for f in files for a in ("-f", f))]
        self.env = {**os.environ, "FGL_STATE": str(state)}  # the SuperLink's database, apart

    def __call__(self, *args: str, timeout: float = 600) -> str:
        return images.run(
            [*self.base, *args], f"compose {args[0]}", timeout=timeout, cwd=ROOT, env=self.env
        )

    def up(self, *services: str) -> None:
        self("up", "-d", "--no-build", *services)

    def container(self, service: str) -> str:
        (container,) = self("ps", "-q", service).split()
        return container

    def save_logs(self, path: Path) -> None:
        with suppress(images.ImageError):
            path.write_text(self("logs", "--no-color", "--timestamps", timeout=120))

    def down(self) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=300)


def inspect(container: str, field: str) -> str:
    return images.run(
        ["docker", "inspect", "--format", f"{{{{{field}}}}}", container], "docker inspect"
    ).strip()


def give_to_app_user(*paths: Path) -> None:
    """The containers run as UID 49999: make the files they read or write theirs."""
    if os.geteuid() != 0:
        raise CheckFailed(
            f"the containers' user (UID {APP_USER}) must own {', '.join(map(str, paths))}; "
            "run this as root, or chown them yourself first"
        )
    for path in paths:
        os.chown(path, APP_USER, APP_USER)


def read_results(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def crash_supernode(compose: Compose, service: str, wait: float = 60.0) -> dict:
    """SIGKILL the process of `service`'s container (as a crash would) and wait until Docker's
    restart policy has it running again; what happened."""
    container = compose.container(service)
    pid = int(inspect(container, ".State.Pid"))
    before = int(inspect(container, ".RestartCount"))
    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        state = inspect(container, ".State.Status")
        return int(inspect(container, ".RestartCount")) > before and state == "running"

    poll_until(restarted, wait, f"{service} was not restarted within {wait:.0f} s", 0.5)
    return {
        "service": service,
        "killed-pid": pid,
        "restart-count": int(inspect(container, ".RestartCount")),
        "running-again-after-seconds": round(time.monotonic() - start, 1),
    }


# what `flwr run` needs of the app and what deploy/silo_attempts.py imports, copied for the
# attempts' container (not the checkout: it may hold gigabytes of wheels and outputs)
ATTEMPT_FILES = ["pyproject.toml", "README.md", "fgl_core", "fgl_client", "fgl_server",
                 "strategies", "deploy/__init__.py", "deploy/certs.py", "deploy/flower_cli.py",
                 "deploy/silo_attempts.py"]  # fmt: skip


class SiloSide:
    """Containers of the app image on silo 1's network, making deploy/silo_attempts.py's tries
    as a silo's host would: with the CA certificate and silo 1's key where TLS is on."""

    def __init__(self, folder: Path, certs: Certificates | None) -> None:
        self.folder = folder
        for name in ATTEMPT_FILES:
            source, target = ROOT / name, folder / "app" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target)
        self.tls: list[str] = []
        if certs is not None:
            shutil.copy2(certs.ca, folder / "ca.crt")
            shutil.copy2(certs.node_key(0), folder / "supernode-0")
            self.tls = ["--ca", "/attempts/ca.crt"]
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, APP_USER, APP_USER)

    def command(self, detach: bool, *args: str) -> list[str]:
        return [
            "docker", "run", *(["-d"] if detach else ["--rm"]),
            "--network", f"{PROJECT}_silo-1", "-v", f"{self.folder}:/attempts",
            "-w", "/attempts/app", "--entrypoint", "python", images.APP_IMAGE,
            "-m", "deploy.silo_attempts", FLEET, *self.tls, *args,
        ]  # fmt: skip

    def start_acquire_poll(self, seconds: float) -> str:
        """Claim-task tries every 0.05 s for `seconds` s, in the background: its container."""
        out = "--out", "/attempts/acquire-poll.json"
        command = self.command(True, "--poll-acquire", str(seconds), *out)
        return images.run(command, "the claim-task poll's container").strip()

    def acquire_poll(self, container: str, wait: float) -> dict:
        images.run(["docker", "wait", container], "docker wait", timeout=wait)
        with suppress(images.ImageError):
            images.run(["docker", "rm", container], "docker rm")
        return json.loads((self.folder / "acquire-poll.json").read_text())["acquire-task-poll"]

    def attempts(self) -> dict:
        key = ["--key", "/attempts/supernode-0"] if self.tls else []
        args = [*key, "--app", "/attempts/app", "--direct", "superlink:9093"]
        proc = subprocess.run(
            [*self.command(False, *args, "--out", "/attempts/attempts.json")],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        path = self.folder / "attempts.json"
        if not path.is_file():
            raise CheckFailed(f"the silo's attempts did not run: {proc.stderr[-2000:]}")
        return json.loads(path.read_text())


def check_results(run_dir: Path, rounds: int) -> list[str]:
    """What is wrong with what the run left; empty when it is all there."""
    results = read_results(run_dir)
    if not results:
        return [f"{run_dir / 'results.json'} is missing or unreadable"]
    problems = []
    accepted = results.get("embedding", {}).get("nodes-accepted", [])
    if len(accepted) != SILOS:
        problems.append(f"{len(accepted)} of {SILOS} silos' embeddings were accepted")
    made = results.get("synthesis", {}).get("images", 0)
    if made != int(RUN_CONFIG["images-per-class"]) * 10:
        problems.append(f"{made} synthetic images, not {int(RUN_CONFIG['images-per-class']) * 10}")
    done = [r["round"] for r in results.get("rounds", [])]
    if done != list(range(rounds + 1)):
        problems.append(f"rounds {done}, not 0..{rounds}")
    elif results["rounds"][-1]["test-accuracy"] <= 0.3:  # digits: real rounds learn (chance 0.1)
        problems.append(f"final test accuracy {results['rounds'][-1]['test-accuracy']:.3f}")
    for name in ("model.pt", "synthetic_samples.png", "accuracy.png"):
        if not (run_dir / name).is_file():
            problems.append(f"no {name} in {run_dir}")
    return problems


def compose_check(tls: bool, crash_drill: bool, timeout: float) -> dict:
    """Up, run, check, down; the record of what happened (raises CheckFailed on a failure)."""
    run_name = "compose-check" + ("-tls" if tls else "") + ("-crash" if crash_drill else "")
    run_dir = ROOT / "outputs" / run_name
    record: dict = {"run-name": run_name, "tls": tls, "crash-drill": crash_drill, "seconds": {}}
    clock = time.monotonic()

    def lap(step: str) -> None:
        nonlocal clock
        record["seconds"][step] = round(time.monotonic() - clock, 1)
        print(f"[compose] {step}: {record['seconds'][step]:.0f} s", flush=True)
        clock = time.monotonic()

    made = images.ensure_images()
    record["images"] = made
    lap("images")
    shutil.rmtree(run_dir, ignore_errors=True)
    state = run_dir / "superlink-state"
    state.mkdir(parents=True)
    give_to_app_user(run_dir, state)
    home = Path(tempfile.mkdtemp(prefix="fgl-compose-home-"))
    connection = "fgl-docker-tls" if tls else "fgl-docker"  # as docs/deployment.md names them
    flwr = FlowerCLI(home, {**os.environ, "FLWR_HOME": str(home)}, connection)
    compose = Compose(tls, state)
    certs = None
    if tls:
        certs = make_certificates(ROOT / "certs", SILOS)
        give_to_app_user(certs.server_key, certs.superexec_secret,
                         *(certs.node_key(i) for i in range(SILOS)))  # fmt: skip
    flwr.connect(PORT, certs.ca if certs else None)
    silo = SiloSide(Path(tempfile.mkdtemp(prefix="fgl-compose-silo-")), certs)
    poller = None
    try:
        compose.down()  # what an interrupted check left
        if certs is not None:
            compose.up("superlink")
            poll_until(flwr.reachable, 120, f"the SuperLink did not answer on port {PORT}")
            for i in range(SILOS):
                flwr.register(certs.node_public_key(i))
        compose.up()
        poll_until(
            lambda: flwr.online_nodes() >= SILOS, 300, f"not all {SILOS} SuperNodes came online"
        )
        lap("up")
        poller = silo.start_acquire_poll(ACQUIRE_POLL_SECONDS)  # from before the run exists
        values = {**RUN_CONFIG, "run-name": f'"{run_name}"'}
        run_id = flwr.submit(ROOT, {k: json.loads(v) for k, v in values.items()})
        print(f"[compose] run {run_id} submitted", flush=True)
        rounds = int(RUN_CONFIG["num-server-rounds"])
        record["silo-attempts"] = silo.attempts()
        print(f"[compose] a silo's tries: {json.dumps(record['silo-attempts'])}", flush=True)
        lap("silo-attempts")

        def finished() -> str | None:
            round_1_done = len(read_results(run_dir).get("rounds", [])) >= 2  # with round 0
            if crash_drill and "crash" not in record and round_1_done:
                record["crash"] = crash_supernode(compose, f"supernode-{SILOS}")
                print(f"[compose] crash drill: {record['crash']}", flush=True)
            status = str(flwr.run_info(run_id).get("status", "unknown"))
            return status if status.startswith("finished:") else None

        status = poll_until(finished, timeout, f"run {run_id} did not finish within {timeout} s", 2)
        record["status"] = status
        record["acquire-poll"] = silo.acquire_poll(poller, ACQUIRE_POLL_SECONDS + 120)
        poller = None
        print(f"[compose] a silo claiming the task: {record['acquire-poll']}", flush=True)
        lap("run")
    finally:
        if poller is not None:  # a container on the project's network keeps it from going
            with suppress(images.ImageError):
                images.run(["docker", "rm", "-f", poller], "docker rm")
        shutil.rmtree(silo.folder, ignore_errors=True)
        compose.save_logs(run_dir / "compose.log")
        compose.down()
        shutil.rmtree(home, ignore_errors=True)
        lap("down")
        (run_dir / "compose-check.json").write_text(json.dumps(record, indent=2))
    problems = [] if status == "finished:completed" else [f"the run ended {status}"]
    problems += check_results(run_dir, rounds)
    problems += [
        f"a silo's try {name} was not refused: {outcome['answer']}"
        for name, outcome in record["silo-attempts"].items()
        if not outcome["refused"]
    ]
    poll = record["acquire-poll"]
    if poll["refused"] != poll["tries"] or poll["tries"] < 100:
        problems.append(f"a silo's claim-task tries: {poll}")
    if crash_drill:
        record["failed-nodes"] = read_results(run_dir).get("traffic", {}).get("failed-nodes", {})
        (run_dir / "compose-check.json").write_text(json.dumps(record, indent=2))
    if problems:
        raise CheckFailed(f"{run_name}: " + "; ".join(problems) + f" (logs: {run_dir})")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.compose_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tls", action="store_true", help="with docker-compose.tls.yml")
    parser.add_argument(
        "--crash-drill", action="store_true", help="kill a SuperNode's process during round 2"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the run")
    args = parser.parse_args(argv)
    try:
        with images.docker_engine():
            record = compose_check(args.tls, args.crash_drill, args.timeout)
    except (CheckFailed, images.ImageError, TimeoutError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    name = record["run-name"]
    print(f"[compose] {name}: {record['status']}; results in outputs/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
