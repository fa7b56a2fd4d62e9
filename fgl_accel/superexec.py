"""A SuperNode's SuperExec that starts each ClientApp as a fork of a process with Flower loaded.

Flower's SuperExec (1.41, 1.42) starts every message's ClientApp as a new `flwr-clientapp`
interpreter, which spends about 2 s (alone; 4-6 s with three nodes on two cores) importing Flower,
and the app's handler as long again importing PyTorch, before it reads its message. This is Flower's
own `flower-superexec` (the same flags, task polling, plugin, signals and parent watch) with one
part swapped: its executor keeps a fork server (`multiprocessing`'s forkserver, a single-threaded
process that imported Flower's ClientApp runtime and PyTorch once) and starts each ClientApp task as
a fork of it running Flower's `run_clientapp` with the task's token. The message, the app's loading
from its FAB, the reply, the exit status and the logs are Flower's; only the interpreter start and
those imports are gone. The app itself is never preloaded: each fork loads the FAB the run
installed, as `flwr-clientapp` does. Tasks of other types go to Flower's subprocess executor. On a
Flower release it was not checked against (`CHECKED_AGAINST`), it runs `flower-superexec` unchanged
(one warning line says so).

Run it beside a SuperNode started with `--isolation process` (the launcher does, unless given
`--flower-superexec`):

    flower-supernode --isolation process --port 9094 --insecure --superlink ... &
    python -P -m fgl_accel.superexec --runtime-api-address 127.0.0.1:9094 --insecure \
        --parent-pid $!
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import sys
from multiprocessing import forkserver
from typing import TYPE_CHECKING, Any

from fgl_accel import patch_applies

if TYPE_CHECKING:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

# loaded once into the fork server: what `flwr-clientapp` imports before its first request, and
# the heavy libraries an app's handlers import (absent ones are skipped); never the app itself
PRELOAD = ["flwr.supernode.runtime.run_clientapp", "flwr.supercore.tls", "numpy", "torch"]


def run_clientapp_task(
    address: str, token: str, insecure: bool, root_certificates: str | None, parent_pid: int | None
) -> None:
    """A fork's whole life: Flower's `flwr-clientapp` for one task (it exits with its status)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(
        runtime_api_address=address,
        token=token,
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


class ForkExecutor:
    """Flower's `Executor` protocol: ClientApp tasks forked from the fork server."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self._others = SubprocessExecutor()
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()  # pay the imports now, not at the first message

    def get_eligible_capacity(
        self, supported_task_types: set[TaskType], **tls: Any
    ) -> tuple[set[TaskType], set[str]]:
        return self._others.get_eligible_capacity(supported_task_types, **tls)

    def wait_for_capacity(self, task_type: TaskType | None = None, **options: Any) -> None:
        self._others.wait_for_capacity(task_type, **options)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return self._others.launch(spec)
        args = (
            spec.runtime_api_address,
            spec.token,
            spec.insecure,
            spec.root_certificates_path,
            spec.parent_pid,
        )
        process = self._context.Process(
            target=run_clientapp_task, args=args, name=f"clientapp-task-{spec.task_id}"
        )
        try:
            process.start()
        except OSError as err:
            return LaunchResult.failed(f"could not fork a ClientApp for task {spec.task_id}: {err}")
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        multiprocessing.active_children()  # reaps the forks that exited

    def close(self) -> None:
        self._others.close()


def use_fork_executor() -> None:
    """Make Flower's SuperExec loop run its tasks on a `ForkExecutor`. Flower builds its
    executor from a fixed list (subprocess, Kubernetes) and has no other hook: the loop is kept
    whole and only the name it builds its executor with is replaced."""
    flower = importlib.import_module("flwr.supercore.superexec.run_superexec")
    executor = ForkExecutor()
    flower.get_executor = lambda *args, **kwargs: executor
    logging.getLogger(__name__).info(
        "fgl_accel.superexec: each ClientApp is a fork of a process with Flower and PyTorch loaded"
    )


def main(argv: list[str] | None = None) -> None:
    """`flower-superexec` with these flags (all of them Flower's), on a `ForkExecutor`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flower_args = sys.argv[1:] if argv is None else argv
    if patch_applies("fgl_accel.superexec", "flower-superexec (a new interpreter per ClientApp)"):
        use_fork_executor()
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv = ["flower-superexec", *flower_args]
    flower_superexec()


if __name__ == "__main__":
    main()
