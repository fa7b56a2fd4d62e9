"""Helpers for the benchmarks: run the launcher, read what the run left, write JSON.

JSON goes to outputs/benchmarks/ (FGL_BENCHMARK_OUT: another folder), each file naming the
benchmark, its arguments, the commit, the date and the machine; the ones docs/measurements.md
quotes are kept in benchmarks/results/. The datasets are read from ../shared/datasets/ beside the
checkout (FGL_DATASETS: another folder).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("FGL_BENCHMARK_OUT") or ROOT / "outputs" / "benchmarks")
DATASETS = Path(os.environ.get("FGL_DATASETS") or ROOT.parent / "shared" / "datasets")


def provenance() -> dict:
    """The commit the benchmark ran at (with "-dirty" when the tree had changes) and when."""
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"  # not a git checkout (an installed copy)
    return {"commit": commit, "date": time.strftime("%Y-%m-%d", time.gmtime())}


def machine() -> dict:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class PeakMemory:
    """The peak memory of a process and all its descendants, sampled by a thread.

    `rss` sums resident set sizes (shared pages count once per process, so it overstates);
    `pss` sums proportional set sizes (each shared page split among its sharers: the honest
    total for a federation of processes on one machine).
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.root, self.interval = psutil.Process(pid), interval
        self.peak = {"rss-bytes": 0, "pss-bytes": 0, "processes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            for proc in tree:
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            now = {"rss-bytes": rss, "pss-bytes": pss, "processes": len(tree)}
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def launch(
    num_silos: int,
    overrides: str,
    run_name: str,
    runtime: list[str] | None = None,
    memory: dict | None = None,
) -> tuple[float, dict]:
    """Run the launcher; return its wall time and the run's results.json.

    `runtime` picks the launcher's mode (default: `--simulation num_silos`), for example
    `["--supernodes", "3", "--tls"]`. A `memory` dict receives the peak memory of the
    launcher and every process below it (`PeakMemory`).
    """
    start = time.perf_counter()
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.launch",
            *(runtime or ["--simulation", str(num_silos)]),
            "--quiet",
            "--run-config",
            f'{overrides} run-name="{run_name}" output-dir="{OUT}"',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        sampler = PeakMemory(proc.pid) if memory is not None else None
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if sampler is not None:
        memory.update(sampler.stop())
    if proc.returncode != 0:
        raise RuntimeError(f"run {run_name} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return wall, json.loads((OUT / run_name / "results.json").read_text())


def write(name: str, record: dict, out: Path = OUT, echo: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    header = {"benchmark": name, **provenance(), "argv": sys.argv[1:], "machine": machine()}
    path.write_text(json.dumps({**header, **record}, indent=2))
    if echo:
        print(json.dumps(record, indent=2))
        print(f"wrote {path}")
    return path


def over_seeds(rows: list[dict], group: Callable[[dict], str], fields: Sequence[str]) -> dict:
    """Per group of rows (`group(row)`, in the order groups first appear): how many rows (one a
    seed), and each field's mean and standard deviation over the rows that measured it."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(group(row), []).append(row)
    summary: dict[str, dict] = {}
    for name, members in groups.items():
        entry: dict = summary.setdefault(name, {"seeds": len(members)})
        for field in fields:
            values = [r[field] for r in members if r.get(field) is not None]
            if values:
                entry[f"{field}-mean"] = float(np.mean(values))
                entry[f"{field}-std"] = float(np.std(values))
    return summary
