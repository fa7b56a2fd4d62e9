"""What a run leaves in `outputs/<run-name>/`: results.json, model.pt and accuracy.png.

results.json is rewritten after every round, so a run that dies keeps what it had done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgl_core.config import ConfigError, RunConfig
from fgl_core.plotting import plot_accuracy
from fgl_core.progress import Snapshot
from fgl_core.run_results import RESULTS_VERSION, VERSION_KEY, Summary
from fgl_server.checkpoint import set_aside
from fgl_server.tracking import Tracker

log = logging.getLogger(__name__)
SILO_PREFIX = "silo-"  # a round row's keys for the silos' aggregated train and evaluate metrics

# how a run's accuracy is reported: the last model; the model the validation split picks (the
# default: the test split only reports); the best test accuracy over epochs and rounds (the
# paper's authors' protocol: it selects on the test split, so it flatters)
PROTOCOLS = {
    "validation-selected": "test-accuracy-at-best-val",
    "final": "final-test-accuracy",
    "best-test": "best-test-accuracy",
}


class RunRecorder:
    def __init__(self, cfg: RunConfig) -> None:
        name = cfg.run_name or cfg.default_run_name(time.strftime("%Y%m%d-%H%M%S"))
        self.dir = Path(cfg.output_dir).expanduser() / name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # output-dir is a file, or not writable
            raise ConfigError(
                f"output-dir {cfg.output_dir!r}: cannot create the run folder {str(self.dir)!r} "
                f"({type(err).__name__}: {err.strerror or err})"
            ) from None
        self._start = time.perf_counter()
        config = cfg.to_flower()
        # what a checkpoint must carry to be resumed from (`fgl_server.checkpoint`)
        self.fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        self.results: dict[str, Any] = {
            VERSION_KEY: RESULTS_VERSION,
            "run-name": name,
            "config": config,
            "config-fingerprint": self.fingerprint,
            "host": platform.node(),
            "started-at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "phase-seconds": {},
            "rounds": [],
        }
        self._resume_or_clear()
        log.info("results go to %s", self.dir)
        self.tracker = Tracker(cfg, self.dir, name)

    def _resume_or_clear(self) -> None:
        """A rerun of a run that did not finish (same folder, same config) goes on from its
        results and checkpoints; a finished run, or one of another config, starts afresh. A
        results.json that cannot be read or is malformed is set aside (renamed, never deleted)
        and the checkpoints are kept: each verifies against the config on its own."""
        previous = self.dir / "results.json"
        if not previous.is_file():
            return
        try:
            earlier = json.loads(previous.read_text())
            problem = results_problem(earlier)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problem = f"is not readable JSON ({type(err).__name__}: {str(err)[:200]})"
        if problem:
            aside = set_aside(previous)
            log.warning(
                "%s %s: set aside as %s; the checkpoints, which verify on their own, are kept "
                "(the rounds before them are not in the new results)",
                previous,
                problem,
                aside.name,
            )
            return
        if "finished-at" not in earlier and earlier["config"] == self.results["config"]:
            self.results = {**earlier, "resumed-at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self.results["config-fingerprint"] = self.fingerprint
            self.results.setdefault("rounds", [])
            self.results.setdefault("phase-seconds", {})
            ended = [r.get("end-seconds", 0.0) for r in self.results["rounds"]]
            self._start -= max(ended, default=0.0)  # round end times go on from the last
            log.info("resuming the run in %s", self.dir)
        else:
            for stale in self.dir.glob("checkpoint-*.pt"):
                stale.unlink()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = self.results["phase-seconds"].get(name, 0.0)
            self.results["phase-seconds"][name] = seconds + time.perf_counter() - start

    def set(self, key: str, value: Any) -> None:
        self.results[key] = value
        self.write_json()
        if key == "one-shot-curve":
            self.tracker.curve(value)
        elif key == "synthesis" and isinstance(value, dict):
            self.tracker.scalars("synthesis", 0, value)

    def progress(self, snapshot: Snapshot) -> None:
        """Where a running phase stands (`fgl_core.progress`), for the launcher to print."""
        self.set("progress", snapshot.to_json())
        rate = {f"{snapshot.unit}-per-second": snapshot.per_second, "done": snapshot.done}
        self.tracker.scalars(f"progress/{snapshot.phase}", snapshot.done, rate)

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        rounds = [r for r in self.results["rounds"] if r["round"] != server_round]
        # when the round ended, from the recorder's start: differences give per-round wall time
        row = {"round": server_round, "end-seconds": time.perf_counter() - self._start, **metrics}
        self.results["rounds"] = sorted([*rounds, row], key=lambda r: r["round"])
        self.write_json()
        earlier = [r["end-seconds"] for r in rounds if r["round"] < server_round]
        seconds = {"seconds": row["end-seconds"] - max(earlier, default=0.0)}
        self.tracker.round(server_round, {**row, **seconds}, self.results.get("traffic"))

    def merge_round_metrics(self, per_round: dict[int, dict[str, float]], prefix: str) -> None:
        """Add metrics (e.g. the silos' aggregated evaluation) to the rows of their rounds."""
        for row in self.results["rounds"]:
            for key, value in per_round.get(row["round"], {}).items():
                row[f"{prefix}{key}"] = value
        self.write_json()
        for step, metrics in sorted(per_round.items()):
            self.tracker.scalars("round", step, {f"{prefix}{k}": v for k, v in metrics.items()})

    def summarize(self) -> Summary | None:
        """The test accuracy under each protocol (`PROTOCOLS`), over every evaluated model: the
        rounds and, for FGL, the one-shot step's epochs. The first model wins a tie. None before
        any round."""
        rounds = self.results["rounds"]
        if not rounds:
            return None
        candidates = [
            (f"one-shot epoch {row['epoch']}", row)
            for row in self.results.get("one-shot-curve", [])
        ] + [(f"round {row['round']}", row) for row in rounds]

        def best(key: str) -> tuple[str, dict]:
            return max(candidates, key=lambda c: c[1].get(key, 0.0))  # max keeps the first

        by_val, by_test = best("val-accuracy"), best("test-accuracy")
        summary = Summary(
            final_test_accuracy=rounds[-1].get("test-accuracy"),
            test_accuracy_at_best_val=by_val[1].get("test-accuracy"),
            best_val_at=by_val[0],
            best_test_accuracy=by_test[1].get("test-accuracy"),
            best_test_at=by_test[0],
        )
        self.results[Summary.KEY] = summary.to_json()
        return summary

    def write_json(self) -> None:
        tmp = self.dir / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=_jsonable))
        tmp.replace(self.dir / "results.json")

    def finish(self, model: nn.Module) -> Path:
        self.summarize()
        self.results["finished-at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write_json()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, self.dir / "model.pt")
        plot_accuracy(self.results["rounds"], self.dir / "accuracy.png", self.results["run-name"])
        log.info("wrote results.json, model.pt and accuracy.png to %s", self.dir)
        self.tracker.scalars("phase-seconds", 0, self.results["phase-seconds"])
        self.tracker.scalars("summary", 0, self.results.get(Summary.KEY, {}))
        self.tracker.image("synthetic-samples", self.dir / "synthetic_samples.png")
        self.tracker.image("accuracy", self.dir / "accuracy.png")
        self.tracker.close()
        return self.dir


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def results_problem(results: object) -> str:
    """Why an earlier results.json cannot be resumed from ("" if it can): its shape, as
    `RunRecorder` writes it."""
    if not isinstance(results, dict):
        return f"holds a {type(results).__name__}, not a run's results"
    if results.get(VERSION_KEY, 1) != RESULTS_VERSION:
        return f"is of results-version {results.get(VERSION_KEY)!r}, not {RESULTS_VERSION}"
    if not isinstance(results.get("config"), dict):
        return "holds no run config"
    rounds = results.get("rounds", [])
    if not isinstance(rounds, list) or not all(
        isinstance(r, dict)
        and isinstance(r.get("round"), int)
        and isinstance(r.get("end-seconds", 0.0), (int, float))
        for r in rounds
    ):
        return "has rounds that are not a list of rows with a round number"
    if not isinstance(results.get("phase-seconds", {}), dict):
        return "has phase-seconds that are not a mapping"
    return ""
