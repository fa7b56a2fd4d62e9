"""The silo's side of the app: its ClientApp and the processes a SuperNode runs it in."""

from __future__ import annotations

import sys


def app_module(module: str, python: str = sys.executable) -> list[str]:
    """The command that runs one of the app's modules in a new interpreter. -P: the working
    folder is not first on sys.path, where a same-named package could shadow the installed app."""
    return [python, "-P", "-m", module]
