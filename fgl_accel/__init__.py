"""Faster stand-ins for two of Flower's runtime processes, for the loopback launcher and the tests.

A deployment as a user runs it (the compose files, docs/deployment.md's multi-machine commands) runs
Flower's own `flower-supernode` and `flower-superexec`. On one machine, where a round's work is
small, Flower's fixed costs per message dominate; this package swaps them out:

- `fgl_accel.superexec`: a SuperExec whose ClientApps are forks of a process that imported
  Flower's ClientApp runtime and PyTorch once, instead of a new interpreter per message;
- `fgl_accel.supernode`: Flower's SuperNode with the idle wait of its pull loop capped (Flower
  1.41 sleeps 3 s whenever it finds no message).

Both reach into Flower's internals, so each checks the installed Flower against the version it
was written for when it starts, and on any other version runs Flower's own process unchanged,
after one warning line. This package is not part of the app: `flwr run` never ships it (the FAB
holds `fgl_core`, `fgl_client`, `fgl_server` and `strategies` alone), and no app code imports it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys

WRITTEN_FOR = "1.41.0"  # the Flower release whose internals this package patches
log = logging.getLogger(__name__)


def installed_flower() -> str:
    return importlib.metadata.version("flwr")


def patch_applies(what: str, fallback: str) -> bool:
    """True when the installed Flower is the one `what` was written for; otherwise one warning
    line saying that Flower's own `fallback` runs instead, and False."""
    installed = installed_flower()
    if installed == WRITTEN_FOR:
        return True
    log.warning(
        "%s was written for flwr %s, and flwr %s is installed: running Flower's own %s instead",
        what,
        WRITTEN_FOR,
        installed,
        fallback,
    )
    return False


def module_command(module: str, python: str = sys.executable) -> list[str]:
    """The command that runs one of this package's modules in a new interpreter. -P: the working
    folder is not first on sys.path, where a same-named package could shadow the installed one."""
    return [python, "-P", "-m", module]
