"""The processes a launch starts, and every process they start in turn, stopped by PID.

SuperLink and SuperNode start their SuperExec (and it the ServerApp and ClientApps) in sessions of
their own, and a child whose parent dies is re-parented away from the tree: so the tree is read
before anything is signalled, and every descendant seen while the launch ran is remembered (as a
`psutil.Process`, which tells it from a later process given the same PID).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and all its descendants, parents first; empty if `pid` is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_all(processes: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)  # psutil refuses a PID that now names another process


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> list[int]:
    """Stop a process we started and every process below it; return the PIDs stopped."""
    tree = process_tree(proc.pid) if proc.poll() is None else []
    signal_all(tree, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    time.sleep(0.5)
    signal_all(tree, signal.SIGKILL)
    proc.wait()
    return sorted({proc.pid, *(p.pid for p in tree)})


class Descendants:
    """Every process seen below some roots while they ran (call `refresh` often)."""

    def __init__(self) -> None:
        self.seen: dict[int, psutil.Process] = {}

    def refresh(self, roots: list[subprocess.Popen]) -> None:
        for root in roots:
            if root.poll() is None:
                for proc in process_tree(root.pid):
                    self.seen.setdefault(proc.pid, proc)

    def kill_survivors(self, stopped: list[int], grace: float = 2.0) -> list[int]:
        """Stop those seen, not stopped with their tree, and still the same process: SIGTERM
        (a process may clean up), SIGKILL after `grace` seconds."""
        survivors = [p for pid, p in self.seen.items() if pid not in stopped and p.is_running()]
        signal_all(survivors, signal.SIGTERM)
        _, alive = psutil.wait_procs(survivors, timeout=grace)
        signal_all(alive, signal.SIGKILL)
        return [p.pid for p in survivors]


SERVERAPP_COMMANDS = ("flwr-serverapp", "flwr-simulation")  # Flower's ServerApp processes


def alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie that its parent has yet to reap."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ServerAppWatch:
    """Notices that the process running the ServerApp (Flower's `flwr-serverapp`, or
    `flwr-simulation` in a simulation, below the SuperLink) is gone while its run is unfinished:
    killed, or out of memory. Flower's SuperLink notices only when the process's heartbeats
    lapse, a minute or more later; a ServerApp that ends on its own reports its status first."""

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self.processes: dict[int, psutil.Process] = {}
        self._looked_at: set[int] = set()  # the PIDs whose command line was read
        self._gone_since: float | None = None

    def died(self, seen: dict[int, psutil.Process]) -> str | None:
        """Call at each poll while the run is unfinished, with the processes seen so far
        (`Descendants.seen`): what died, once the ServerApp processes among them have all been
        gone for `grace` seconds; else None."""
        for pid in seen.keys() - self._looked_at:
            self._looked_at.add(pid)
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if any(part.endswith(SERVERAPP_COMMANDS) for part in seen[pid].cmdline()):
                    self.processes[pid] = seen[pid]
        if not self.processes or any(alive(proc) for proc in self.processes.values()):
            self._gone_since = None
            return None
        now = time.monotonic()
        if self._gone_since is None:
            self._gone_since = now
        if now - self._gone_since < self.grace:
            return None
        pids = ", ".join(str(pid) for pid in sorted(self.processes))
        return f"the ServerApp process (PID {pids}) exited before the run finished"
