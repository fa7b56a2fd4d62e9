"""Separate hosts on one machine: network namespaces on a switch, for deployment tests.

Each host is a network namespace with its own loopback and one interface, `eth0`, with an
address in 10.77.0.0/24; all are cabled to a bridge that lives in a namespace of its own (the
"switch"), so no packet between them touches this machine's own interfaces or firewall rules.
Unplugging a host's cable (`cut`) is a network partition; `mend` plugs it back. The namespaces
share this machine's file system and processes, so a host's processes are started with `ip
netns exec` and stopped by PID; on exit every process left in a namespace is killed and the
namespaces are deleted.

The "Run across machines" blocks of docs/deployment.md are what the hosts run
(`readme_block`): the test swaps in its own values for the variables a block sets on its
first lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import ROOT

SUBNET = "10.77.0"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespaces_work() -> str | None:
    """None where this machine can make network namespaces; else why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    return None


class Hosts:
    """Hosts `name -> last byte of its 10.77.0.x address`, on one switch."""

    def __init__(self, hosts: dict[str, int]) -> None:
        tag = os.getpid() % 100000
        self.switch = f"fgl{tag}-switch"
        self.namespace = {name: f"fgl{tag}-{name}" for name in hosts}
        self.address = {name: f"{SUBNET}.{last}" for name, last in hosts.items()}
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Hosts:
        try:
            ip("netns", "add", self.switch)
            ip("-n", self.switch, "link", "add", "switch", "type", "bridge")
            ip("-n", self.switch, "link", "set", "switch", "up")
            for name, namespace in self.namespace.items():
                ip("netns", "add", namespace)
                port = self.port(name)
                ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                   "netns", namespace)  # fmt: skip
                ip("-n", self.switch, "link", "set", port, "master", "switch", "up")
                ip("-n", namespace, "addr", "add", f"{self.address[name]}/24", "dev", "eth0")
                ip("-n", namespace, "link", "set", "eth0", "up")
                ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.processes:
            stop_group(proc)
        for namespace in [*self.namespace.values(), self.switch]:
            pids = ip("netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:  # anything a host left running
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "delete", namespace, check=False)

    @staticmethod
    def port(name: str) -> str:
        return f"to-{name}"[:15]

    def command(self, host: str, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace[host], *args]

    def run(self, host: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, args), capture_output=True, text=True, **kwargs)

    def start(self, host: str, script: str, log: Path, cwd: Path, env: dict) -> subprocess.Popen:
        """`script` (bash) on `host` in the background, in a process group of its own, its output
        in `log`; stopped on exit."""
        with log.open("a") as out:
            proc = subprocess.Popen(
                self.command(host, ["bash", "-euo", "pipefail", "-c", script]),
                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes.append(proc)
        return proc

    def cut(self, host: str) -> None:
        """Unplug the host's cable: nothing reaches it, or leaves it, until `mend`."""
        ip("-n", self.switch, "link", "set", self.port(host), "down")

    def mend(self, host: str) -> None:
        ip("-n", self.switch, "link", "set", self.port(host), "up")


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """SIGTERM the process group `proc` leads, SIGKILL after `grace` s; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (answer := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)
    return answer


# --- the deployment doc's blocks ---
# the hosts share this checkout's environment, and .ci/run installs Debian's packages
INSTALL = re.compile(r"^(python3 -m venv |sudo apt-get install )")
ASSIGNMENT = re.compile(r"^([A-Z_]+)=(\S+)(\s+#.*)?$")


def readme_block(name: str) -> str:
    """The fenced block that follows `<!-- host: name -->` in docs/deployment.md."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    match = re.search(rf"<!-- host: {re.escape(name)} -->\n```\w*\n(.*?)```", text, re.S)
    assert match, f"docs/deployment.md has no block marked <!-- host: {name} -->"
    return match.group(1)


def host_script(block: str, values: dict[str, str]) -> str:
    """A deployment-doc block as a host runs it: its variables set to `values` (each one the
    block sets must be given), its install lines left out."""
    lines, seen = [], set()
    for line in block.splitlines():
        if INSTALL.match(line):
            continue
        if (assigned := ASSIGNMENT.match(line)) is not None:
            variable = assigned.group(1)
            assert variable in values, f"the test gives no value for {variable}"
            seen.add(variable)
            line = f"{variable}={values[variable]}"
        lines.append(line)
    assert seen == set(values), f"the block sets {sorted(seen)}, the test gave {sorted(values)}"
    return "\n".join(lines) + "\n"
