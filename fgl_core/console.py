"""Logging set-up shared by the apps, the launcher and the benchmarks."""

from __future__ import annotations

import logging


def configure_logging(level: int = logging.INFO) -> None:
    """Send the project's log lines to stderr once, whatever process we are in."""
    logger = logging.getLogger("fgl")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("fgl", "fgl_core", "fgl_client", "fgl_server", "strategies"):
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).propagate = False
