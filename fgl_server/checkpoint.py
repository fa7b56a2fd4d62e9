"""Checkpoints of the global model, so a rerun of a run that did not finish (same `run-name`,
same config) goes on from where a crash stopped it, recomputing nothing it had finished.

`checkpoint-<phase>.pt` in the run folder holds the model after the last finished step of a
phase (`one-shot`, or `rounds` with the number of the last round), written to a temporary
name and renamed, with the digest of its tensors and the fingerprint of the run's config.
`results.json` already holds the results so far; `RunRecorder` reloads it.

A checkpoint is resumed from only if it verifies: read into a copy, it must be this config's,
its step in the phase's range, its keys and shapes the model's, every value finite and its
digest unchanged (a flipped byte). Anything else is set aside beside it, renamed with the
reason logged, never deleted, and the phase starts again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def checkpoint_path(run_dir: Path, phase: str) -> Path:
    return run_dir / f"checkpoint-{phase}.pt"


def set_aside(path: Path) -> Path:
    """Rename resumed state that did not verify to `<name>.set-aside-<time>` beside it (never
    deleted: a person may want it); return the new path."""
    aside = path.with_name(f"{path.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    run_dir: Path, phase: str, step: int, model: nn.Module, fingerprint: str
) -> None:
    save_state(run_dir, phase, step, model.state_dict(), fingerprint)


def save_state(
    run_dir: Path, phase: str, step: int, state: Mapping[str, torch.Tensor], fingerprint: str
) -> None:
    """`save_checkpoint` of a state dict that is not a module's (the generator's adapter)."""
    path = checkpoint_path(run_dir, phase)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu() for k, v in state.items()}
    record = {"step": step, "model": state, "digest": state_digest(state)}
    torch.save({**record, "config-fingerprint": fingerprint}, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    run_dir: Path, phase: str, model: nn.Module, fingerprint: str, last_step: int
) -> int:
    """Load the phase's checkpoint into `model` if it verifies (see the module's docstring);
    return its step (0: none, or set aside: the phase starts afresh)."""
    step, state = load_state(run_dir, phase, model.state_dict(), fingerprint, last_step)
    if state is not None:
        model.load_state_dict(state)
    return step


def load_state(
    run_dir: Path,
    phase: str,
    expected: Mapping[str, torch.Tensor],
    fingerprint: str,
    last_step: int,
) -> tuple[int, dict[str, torch.Tensor] | None]:
    """The phase's checkpoint, if it verifies against `expected`'s keys and shapes: its step and
    state; (0, None) if there is none or it was set aside."""
    path = checkpoint_path(run_dir, phase)
    if not path.is_file():
        return 0, None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        problem = checkpoint_problem(saved, expected, fingerprint, last_step)
    except Exception as err:  # a torn or foreign file
        problem = f"unreadable ({type(err).__name__}: {str(err)[:200]})"
    if problem:
        aside = set_aside(path)
        log.warning("%s %s: set aside as %s; %s starts afresh", path, problem, aside.name, phase)
        return 0, None
    log.info("resuming %s from %s: step %d done", phase, path.name, saved["step"])
    return int(saved["step"]), saved["model"]


def checkpoint_problem(
    saved: object, expected: Mapping[str, torch.Tensor], fingerprint: str, last_step: int
) -> str:
    """Why a loaded checkpoint cannot be resumed from ("" if it can), checked on the loaded copy
    before anything of the model is replaced."""
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        return "holds no model state"
    if saved.get("config-fingerprint") != fingerprint:
        return "was written by another run config (or before checkpoints carried one)"
    step = saved.get("step")
    if not isinstance(step, int) or not 1 <= step <= last_step:
        return f"is at step {step!r}, outside this phase's 1..{last_step}"
    state = saved["model"]
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        return f"lacks {missing[:3]} and has {extra[:3]} beside the model's keys"
    for name, tensor in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            return f"has {name!r} of shape {getattr(got, 'shape', None)}, not {tuple(tensor.shape)}"
        if got.is_floating_point() and not torch.isfinite(got).all():
            return f"has NaN or infinite values in {name!r}"
    if saved.get("digest") != state_digest(state):
        return "does not match its digest (its bytes changed after it was written)"
    return ""
