"""A SuperNode's SuperExec that starts each ClientApp as a fork of a process with Flower loaded.

Flower 1.41's SuperExec starts every message's ClientApp as a new `flwr-clientapp` interpreter,
which spends about 2 s (alone; 4-6 s with three nodes on two cores) importing Flower before it
asks for its message. This SuperExec is Flower's own (`run_superexec`: the same task polling,
plugin, signals and parent watch) with one part swapped: its executor keeps a fork server
(`multiprocessing`'s forkserver, a single-threaded process that imported Flower's ClientApp
runtime once) and starts each ClientApp task as a fork of it running Flower's `run_clientapp`
with the task's token. The message, the app's loading from its FAB, the reply, the exit status and
the logs are Flower's; only the interpreter start and the imports are gone. Tasks of other types
go to Flower's subprocess executor. The app itself is not preloaded: each fork loads the FAB the
run installed, as `flwr-clientapp` does.

Run it beside a SuperNode started with `--isolation process` (the launcher does, unless given
`--flower-superexec`):

    flower-supernode --isolation process --port 9094 --insecure --superlink ... &
    python -P -m fgl_client.superexec --runtime-api-address 127.0.0.1:9094 --insecure \
        --parent-pid $!
"""

from __future__ import annotations

import argparse
import importlib
import logging
import multiprocessing
import sys
from multiprocessing import forkserver
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

# what `flwr-clientapp` imports before its first request, loaded once into the fork server
PRELOAD = ["flwr.supernode.runtime.run_clientapp", "flwr.supercore.tls"]
# all a fork imports of this project (not __name__'s: a fork runs this module as __mp_main__)
PACKAGE = "fgl_client"


def forget_this_project() -> None:
    """Drop this package from a fork's import cache (a fork imports this module to find its
    target), so that Flower loads the app from the run's FAB, as a new `flwr-clientapp` does,
    and not from the copy installed beside this SuperExec."""
    for name in [n for n in sys.modules if n.split(".")[0] == PACKAGE]:
        del sys.modules[name]


def run_clientapp_task(
    address: str, token: str, insecure: bool, root_certificates: str | None, parent_pid: int | None
) -> None:
    """A fork's whole life: Flower's `flwr-clientapp` for one task (it exits with its status)."""
    forget_this_project()
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


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fgl_client.superexec", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's, host:port")
    parser.add_argument("--insecure", action="store_true", help="the Runtime API has no TLS")
    parser.add_argument("--root-certificates", help="CA certificate of the Runtime API's TLS")
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process (the SuperNode) does"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.insecure == bool(args.root_certificates):
        parser.error("give exactly one of --insecure and --root-certificates")

    from flwr.supercore import log
    from flwr.supercore.utils import disable_process_dumping

    disable_process_dumping(strict=False)  # as flower-superexec: the task tokens stay private
    flower = importlib.import_module("flwr.supercore.superexec.run_superexec")
    executor = ForkExecutor()
    log(
        logging.INFO,
        "fgl_client.superexec: each ClientApp of the SuperNode at %s is a fork of a process "
        "with Flower loaded",
        args.runtime_api_address,
    )
    # Flower 1.41 builds its executor from a fixed list (subprocess, Kubernetes) and has no
    # other hook; the pinned version's loop is kept whole and only this name is replaced
    flower.get_executor = lambda *args, **kwargs: executor
    flower.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
