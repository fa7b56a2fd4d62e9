"""What a silo can try against the server, and what it got back: each try should be refused.

    python -m deploy.silo_attempts 10.77.0.1:9093 --ca ca.crt --key supernode-0 --app . \\
        --out attempts.json
    python -m deploy.silo_attempts 10.77.0.1:9093 --ca ca.crt --poll-acquire 120 \\
        --out poll.json          # claim-task tries every 0.05 s, while a run starts

A silo holds the deployment's CA certificate and its own SuperNode key, and reaches the server's
public address (it must, to take part). Against a SuperLink that serves every API on that port
(Flower 1.41/1.42), such a silo could claim the run's ServerApp task and act as the server, submit
code that runs on the server host, or register keys of its own (issue 42). Behind the Fleet proxy
(deploy/proxy.py) each of these tries must be refused; this module makes them with Flower's own
clients and the `flwr` CLI, and records each answer (an HTTP status, an exit code and the CLI's
last line, or the connection error) in JSON:

- `acquire-task`, `pull-task-input`, `get-nodes`, `push-messages`, `pull-messages`: the Runtime
  API, as a ServerApp (or a process that wants to be one) calls it; the task token a made-up one;
- `fleet-pull-as-another-node`: the Fleet API with the silo's own key, asking for another
  node's messages (Flower's SuperNode authentication must refuse it);
- `flwr-ls`, `flwr-run`, `flwr-supernode-register`: the Control API through Flower's CLI, with
  only the CA certificate in `config.toml`, as the docs once wrote it for the operator;
- `supernode-unregistered-key`: Flower's SuperNode with a key the server never registered;
- `superlink-direct` (with `--direct`): a TCP connection to the SuperLink's own port, past the
  proxy (on the server host it listens on loopback; in compose it is on a network of its own).

A try counts as refused when no part of it succeeded: an HTTP status of 400 or more (or no
connection), a non-zero exit code, or a SuperNode that gave up. The server host's operator runs
the same module against the SuperLink's loopback address to show what a local process without
the SuperExec secret gets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CONNECTION = "silo-attempt"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colours of Flower's log lines
SUPERNODE_WAIT = 90.0  # seconds an unregistered SuperNode is given to be let in or refused


def answer_of(call: Callable[[], object]) -> dict:
    """Make one HTTP try; what came back, and whether it was refused."""
    import httpx

    try:
        response = call()
    except httpx.HTTPStatusError as err:
        body = " ".join(re.sub(r"<[^>]*>", " ", err.response.text).split())[:160]
        return {"refused": True, "answer": f"HTTP {err.response.status_code} {body}".strip()}
    except (httpx.HTTPError, OSError) as err:
        return {"refused": True, "answer": f"{type(err).__name__}: {err}"[:200]}
    return {"refused": False, "answer": f"answered: {str(response)[:200]!r}"}


def clients(address: str, ca: Path | None, key: Path | None):  # type: ignore[no-untyped-def]
    """Flower's Runtime and Fleet HTTP clients for `address`, without retries; the Fleet client
    signs with the silo's `key` (None: no Fleet client)."""
    from flwr.supercore.interceptors.http.runtime_token import RuntimeTokenHttpInterceptor
    from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient

    certificates = str(ca) if ca is not None else None
    runtime = RuntimeHttpClient.from_server_address(
        address, ca is None, certificates, [RuntimeTokenHttpInterceptor("made-up-token")]
    )
    fleet = None
    if key is not None:
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        private = load_ssh_private_key(key.read_bytes(), None)  # as flower-supernode reads it
        fleet = FleetHttpClient.from_server_address(
            address,
            ca is None,
            certificates,
            [NodeAuthHttpInterceptor(private, private.public_key())],
        )
    return runtime, fleet


def acquire_task(runtime) -> dict:  # type: ignore[no-untyped-def]
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    request = AcquireTaskRequest(supported_task_types=[t.value for t in TaskType])
    outcome = answer_of(lambda: runtime.AcquireTask(request))
    if not outcome["refused"] and "token" not in outcome["answer"]:
        outcome["refused"] = True  # answered, with no task in it: nothing was claimed
    return outcome


def runtime_attempts(runtime) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    from flwr.proto.runtime_pb2 import (
        GetNodesRequest,
        PullAppMessagesRequest,
        PullTaskInputRequest,
        PushAppMessagesRequest,
    )

    return {
        "acquire-task": acquire_task(runtime),
        "pull-task-input": answer_of(lambda: runtime.PullTaskInput(PullTaskInputRequest())),
        "get-nodes": answer_of(lambda: runtime.GetNodes(GetNodesRequest())),
        "push-messages": answer_of(lambda: runtime.PushMessages(PushAppMessagesRequest())),
        "pull-messages": answer_of(lambda: runtime.PullMessages(PullAppMessagesRequest())),
    }


def fleet_pull_as_another_node(fleet) -> dict:  # type: ignore[no-untyped-def]
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node

    request = PullMessagesRequest(node=Node(node_id=1))  # not this silo's node
    return answer_of(lambda: fleet.PullMessages(request))


def cli_env(home: Path) -> dict[str, str]:
    """Flower's programs of this environment first on PATH, `home` as FLWR_HOME."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "FLWR_HOME": str(home), "PATH": path}


def flwr_cli(home: Path, address: str, ca: Path | None) -> Callable[..., dict]:
    """A `flwr` call through a connection to `address` (only the CA in it), as an outcome."""
    from deploy.flower_cli import FlowerCLI

    host, port = address.rsplit(":", 1)
    cli = FlowerCLI(home, cli_env(home), CONNECTION)
    cli.connect(int(port), ca, host=host)

    def call(*args: str) -> dict:
        try:
            proc = cli([*args, "--format", "json"])
        except subprocess.TimeoutExpired:
            return {"refused": True, "answer": "no answer within 120 s"}
        try:  # with --format json, flwr exits 0 and says "success": false on an error
            said = json.loads(proc.stdout)
        except ValueError:
            said = {"success": False, "error-message": proc.stdout + proc.stderr}
        if said.get("success", True) and proc.returncode == 0:
            return {"refused": False, "answer": f"answered: {proc.stdout.strip()[:200]}"}
        lines = str(said.get("error-message", "")).splitlines() or [""]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1])
        return {"refused": True, "answer": f"exit {proc.returncode}: {reason.strip()[:200]}"}

    return call


def control_attempts(home: Path, address: str, ca: Path | None, app: Path) -> dict[str, dict]:
    from deploy.certs import make_node_key

    call = flwr_cli(home, address, ca)
    make_node_key(home / "stranger", home / "stranger.pub")
    return {
        "flwr-ls": call("ls", CONNECTION),
        "flwr-run": call("run", str(app), CONNECTION),
        "flwr-supernode-register": call(
            "supernode", "register", str(home / "stranger.pub"), CONNECTION
        ),
    }


def free_port() -> int:
    """A free loopback port for the SuperNode's own Runtime API."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unregistered_supernode(home: Path, address: str, ca: Path) -> dict:
    """Flower's SuperNode with a fresh key: refused when it exits non-zero within the wait."""
    from deploy.certs import make_node_key

    key = home / "unregistered"
    make_node_key(key, home / "unregistered.pub")
    supernode = Path(sys.executable).parent / "flower-supernode"
    command = [
        str(supernode),
        "--superlink",
        address,
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(key),
        "--port",
        str(free_port()),
        "--isolation",
        "process",
        "--max-retries",
        "2",
    ]
    log = home / "unregistered-supernode.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, env=cli_env(home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        code = proc.wait(SUPERNODE_WAIT)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
    said = [ANSI.sub("", line).strip() for line in log.read_text().splitlines() if line.strip()]
    reason = next((line for line in said if line.startswith("[code:")), said[-1] if said else "")
    if code is None:
        return {
            "refused": False,
            "answer": f"still running after {SUPERNODE_WAIT:.0f} s: {reason[:200]}",
        }
    return {"refused": code != 0, "answer": f"exit {code}: {reason[:200]}"}


def connect_directly(address: str) -> dict:
    """A TCP connection to `address`: refused when it cannot be made."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except OSError as err:
        return {"refused": True, "answer": f"{type(err).__name__}: {err}"[:200]}
    return {"refused": False, "answer": f"connected to {address}"}


def poll_acquire(address: str, ca: Path | None, seconds: float, every: float = 0.05) -> dict:
    """Try to claim a task every `every` s for `seconds` s (start it before the run is
    submitted): how many tries, how many were refused, each distinct answer."""
    runtime, _ = clients(address, ca, None)
    tries = refused = 0
    answers: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        outcome = acquire_task(runtime)
        tries += 1
        refused += outcome["refused"]
        answers[outcome["answer"]] = answers.get(outcome["answer"], 0) + 1
        time.sleep(every)
    return {"tries": tries, "refused": refused, "answers": answers}


def all_attempts(
    address: str,
    ca: Path | None,
    key: Path | None,
    app: Path,
    unregistered: bool = True,
    direct: str | None = None,
) -> dict[str, dict]:
    runtime, fleet = clients(address, ca, key)
    outcomes = runtime_attempts(runtime)
    if direct is not None:
        outcomes["superlink-direct"] = connect_directly(direct)
    if fleet is not None:
        outcomes["fleet-pull-as-another-node"] = fleet_pull_as_another_node(fleet)
    with tempfile.TemporaryDirectory(prefix="fgl-silo-attempts-") as tmp:
        home = Path(tmp)
        outcomes |= control_attempts(home, address, ca, app)
        if unregistered and ca is not None:
            outcomes["supernode-unregistered-key"] = unregistered_supernode(home, address, ca)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.silo_attempts",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("address", help="the server's address as the silo reaches it, host:port")
    parser.add_argument(
        "--ca", type=Path, help="the deployment's CA certificate (omit: plain HTTP)"
    )
    parser.add_argument("--key", type=Path, help="this silo's SuperNode private key")
    parser.add_argument("--app", type=Path, default=Path("."), help="the app `flwr run` submits")
    parser.add_argument(
        "--poll-acquire",
        type=float,
        metavar="SECONDS",
        help="only try to claim a task, every 0.05 s for this long",
    )
    parser.add_argument(
        "--no-supernode",
        action="store_true",
        help="skip the unregistered SuperNode (it takes up to 90 s)",
    )
    parser.add_argument(
        "--runtime-only",
        action="store_true",
        help="only the Runtime API's tries (the server host's own check)",
    )
    parser.add_argument(
        "--direct", metavar="HOST:PORT", help="also try the SuperLink's own port, past the proxy"
    )
    parser.add_argument("--out", type=Path, help="write the outcomes here as JSON")
    args = parser.parse_args(argv)
    if args.poll_acquire is not None:
        record: dict = {"acquire-task-poll": poll_acquire(args.address, args.ca, args.poll_acquire)}
        let_in = record["acquire-task-poll"]["tries"] - record["acquire-task-poll"]["refused"]
    elif args.runtime_only:
        record = runtime_attempts(clients(args.address, args.ca, None)[0])
        let_in = sum(not outcome["refused"] for outcome in record.values())
    else:
        record = all_attempts(
            args.address,
            args.ca,
            args.key,
            args.app.resolve(),
            unregistered=not args.no_supernode,
            direct=args.direct,
        )
        let_in = sum(not outcome["refused"] for outcome in record.values())
    text = json.dumps(record, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 1 if let_in else 0


if __name__ == "__main__":
    sys.exit(main())
