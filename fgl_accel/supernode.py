"""Flower's SuperNode, asking its SuperLink for work every `--poll` seconds instead of every 3 s.

Flower's SuperNode (1.41, 1.42) sleeps a hard-coded 3 s whenever it asks for a message and gets
none, and polls every 0.5 s for its ClientApp's reply. Between two FedAvg rounds every node finds
nothing and sleeps, so each round waits for the last node's wake-up: 1.5 s on average, up to 3 s,
and most of a short round (docs/measurements.md: deployed rounds, stock against accelerated). This
entry point runs Flower's own `flower-supernode` (same flags, same code) with every sleep of its
pull/push loop capped at `--poll` seconds. With a handful of silos the SuperLink serves a few more
requests a second; with thousands of nodes, keep Flower's 3 s. On a Flower release it was not
checked against, it runs `flower-supernode` unchanged (one warning line says so).

    python -P -m fgl_accel.supernode --poll 0.2 --superlink 127.0.0.1:9092 --insecure ...
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from typing import Any

from fgl_accel import patch_applies

POLL_SECONDS = 0.2  # the launcher's default; Flower's own SuperNode waits 3 s
FLOWER_POLL_SECONDS = 3.0


class CappedSleep:
    """The `time` module as one module of Flower's sees it: `sleep` waits at most `cap` s."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_sleeps(cap: float) -> None:
    """Cap the sleeps of Flower's SuperNode loop (`start_client_internal`) at `cap` s."""
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    if getattr(loop, "time", None) is not time and not isinstance(loop.time, CappedSleep):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer sleeps through `time`; "
            "this Flower release is not one fgl_accel.supernode was checked against"
        )
    loop.time = CappedSleep(cap)


def poll_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= FLOWER_POLL_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} s: give seconds in (0, {FLOWER_POLL_SECONDS:g}]")
    return value


def argument_parser() -> argparse.ArgumentParser:
    """`--poll`; `parse_known_args` leaves flower-supernode's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m fgl_accel.supernode",
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag is flower-supernode's.",
    )
    parser.add_argument("--poll", type=poll_seconds, default=POLL_SECONDS, metavar="SECONDS")
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, flower_args = argument_parser().parse_known_args(argv)
    if patch_applies("fgl_accel.supernode", "flower-supernode (a 3 s wait when idle)"):
        cap_supernode_sleeps(args.poll)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
