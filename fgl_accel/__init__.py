"""Faster stand-ins for two of Flower's runtime processes, for the loopback launcher and the tests.

A deployment as a user runs it (the compose files, docs/deployment.md's multi-machine commands) runs
Flower's own `flower-supernode` and `flower-superexec`. On one machine, where a round's work is
small, Flower's fixed costs per message dominate; this package swaps them out:

- `fgl_accel.superexec`: a SuperExec whose ClientApps are forks of a process that imported
  Flower's ClientApp runtime and PyTorch once, instead of a new interpreter per message;
- `fgl_accel.supernode`: Flower's SuperNode with the idle wait of its pull loop capped (Flower
  1.41 and 1.42 sleep 3 s whenever they find no message).

Both reach into Flower's internals, so each checks the installed Flower against the releases it has
been checked against when it starts (`CHECKED_AGAINST`; tests/test_accel.py checks that the
installed release's internals have the names and signatures these modules use), and on any other
release runs Flower's own process unchanged, after one warning line. This package is not part of the
app: `flwr run` never ships it (the FAB holds `fgl_core`, `fgl_client`, `fgl_server` and
`strategies` alone), and no app code imports it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys

# The Flower releases whose internals this package patches, compared file by file: what it touches
# (the SuperNode loop's `time`, the SuperExec loop's `get_executor`, the executor protocol and
# `run_clientapp`) is the same in both.
CHECKED_AGAINST = frozenset({"1.41.0", "1.42.0"})
log = logging.getLogger(__name__)


def installed_flower() -> str:
    return importlib.metadata.version("flwr")


def patch_applies(what: str, fallback: str) -> bool:
    """True when the installed Flower is one `what` was checked against; otherwise one warning
    line saying that Flower's own `fallback` runs instead, and False."""
    installed = installed_flower()
    if installed in CHECKED_AGAINST:
        return True
    log.warning(
        "%s was checked against flwr %s, and flwr %s is installed: running Flower's own %s "
        "instead",
        what,
        ", ".join(sorted(CHECKED_AGAINST)),
        installed,
        fallback,
    )
    return False


def module_command(module: str, python: str = sys.executable) -> list[str]:
    """The command that runs one of this package's modules in a new interpreter. -P: the working
    folder is not first on sys.path, where a same-named package could shadow the installed one."""
    return [python, "-P", "-m", module]
