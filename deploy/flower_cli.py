"""The `flwr` command line, as the launcher drives it: one connection in a private FLWR_HOME.

Connections live in `$FLWR_HOME/config.toml` (Flower 1.42 has no federations in pyproject).
Every call has a timeout, and the calls that poll answer "not yet" (0 nodes, status
"unknown") when the machine is too busy to answer in time, so that the caller asks again.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

CONNECTION = "fgl-local"
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode of this environment


class FlowerCLI:
    def __init__(self, home: Path, env: dict[str, str], connection: str = CONNECTION) -> None:
        self.home, self.env, self.connection = home, env, connection

    def connect(
        self,
        port: int,
        root_certificates: Path | None,
        simulation: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        """Write the one connection: the SuperLink at `host:port`, TLS or insecure."""
        security = f'root-certificates = "{root_certificates}"' if root_certificates else ""
        lines = [
            f'[superlink]\ndefault = "{self.connection}"\n',
            f"[superlink.{self.connection}]",
            f'address = "{host}:{port}"',
            security or "insecure = true",
        ]
        if simulation:
            lines += [f"\n[superlink.{self.connection}.options]", f"num-supernodes = {simulation}"]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def __call__(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.home,
            text=True,
            capture_output=True,
            timeout=timeout,
        )

    def register(self, public_key: Path) -> str:
        """Register a SuperNode's public key with the SuperLink (auth mode); its node ID."""
        out = self(["supernode", "register", str(public_key), self.connection, "--format", "json"])
        try:
            return str(json.loads(out.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(
                f"could not register {public_key}: {out.stdout.strip()} {out.stderr.strip()}"
            ) from None

    def reachable(self) -> bool:
        """Whether the SuperLink answers the Control API (a published container port can be
        open before the SuperLink in the container listens)."""
        try:
            out = self(["supernode", "ls", self.connection, "--format", "json"], timeout=60)
            return bool(json.loads(out.stdout).get("success", True)) and "nodes" in out.stdout
        except (subprocess.TimeoutExpired, json.JSONDecodeError, AttributeError):
            return False

    def online_nodes(self) -> int:
        try:
            out = self(["supernode", "ls", self.connection, "--format", "json"], timeout=60)
            nodes = json.loads(out.stdout)["nodes"]
        except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError):
            return 0  # a busy machine or a SuperLink still starting: ask again
        return sum(node.get("status") == "online" for node in nodes)

    def submit(self, app: Path, values: dict) -> str:
        """`flwr run` the app with these run-config values; the run ID."""
        overrides = self.home / "run-config.toml"
        overrides.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n")
        out = self(
            ["run", str(app), self.connection, "--run-config", str(overrides), "--format", "json"],
            timeout=300,
        )
        try:
            return str(json.loads(out.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr run failed:\n{out.stdout}\n{out.stderr}") from None

    def run_info(self, run_id: str) -> dict:
        """`flwr ls` of one run: its status, wall time and bytes on the wire."""
        try:
            out = self(["ls", self.connection, "--run-id", run_id, "--format", "json"], timeout=60)
            return dict(json.loads(out.stdout)["runs"][0])
        except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError, IndexError):
            return {"status": "unknown"}  # a poll that timed out on a busy machine: ask again

    def stop(self, run_id: str) -> None:
        """Ask the SuperLink to stop the run; best effort: the launcher stops the SuperLink next,
        which ends the run either way."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self(["stop", run_id, self.connection], timeout=60)

    def log_command(self, run_id: str) -> list[str]:
        """The command that streams the run's log (the launcher runs it as a helper process)."""
        return [str(BIN / "flwr"), "log", run_id, self.connection, "--stream"]
