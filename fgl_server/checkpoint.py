"""Checkpoints of the global model, so a rerun of a run that did not finish (same `run-name`,
same config) goes on from where a crash stopped it, recomputing nothing it had finished.

`checkpoint-<phase>.pt` in the run folder holds the model after the last finished step of a
phase (`one-shot`, or `rounds` with the number of the last round), written to a temporary
name and renamed. `results.json` already holds the results so far; `RunRecorder` reloads it.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
from flwr.serverapp.strategy import Strategy
from torch import nn

log = logging.getLogger(__name__)


def checkpoint_path(run_dir: Path, phase: str) -> Path:
    return run_dir / f"checkpoint-{phase}.pt"


def save_checkpoint(run_dir: Path, phase: str, step: int, model: nn.Module) -> None:
    path = checkpoint_path(run_dir, phase)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"step": step, "model": state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: Path, phase: str, model: nn.Module) -> int:
    """Load the phase's checkpoint into `model`; return its step (0: none, start afresh)."""
    path = checkpoint_path(run_dir, phase)
    if not path.is_file():
        return 0
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        step = int(saved["step"])
    except Exception as err:  # a torn or foreign file: start the phase again
        log.warning("ignoring %s (%s: %s); the phase starts afresh", path, type(err).__name__, err)
        return 0
    log.info("resuming %s from %s: step %d done", phase, path.name, step)
    return step


def offset_rounds(strategy: Strategy, done: int) -> Strategy:
    """Make Flower's round loop, which counts from 1, continue after round `done`: the silos
    and the ledger see the rounds' true numbers (seeds derive from them)."""
    if done:
        for name in (
            "configure_train",
            "aggregate_train",
            "configure_evaluate",
            "aggregate_evaluate",
        ):
            method = getattr(strategy, name)
            setattr(strategy, name, functools.partial(_shifted, method, done))
    return strategy


def _shifted(method, done: int, server_round: int, *args, **kwargs):  # type: ignore[no-untyped-def]
    return method(server_round + done, *args, **kwargs)
