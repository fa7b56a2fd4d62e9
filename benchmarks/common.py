"""Helpers for the benchmarks: run the launcher, read what the run left, write JSON."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs" / "benchmarks"
DATASETS = ROOT.parent / "shared" / "datasets"


def machine() -> dict:
    return {
        "host": platform.node(),
        "cpus": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def launch(
    num_silos: int, overrides: str, run_name: str, runtime: list[str] | None = None
) -> tuple[float, dict]:
    """Run the launcher; return its wall time and the run's results.json.

    `runtime` picks the launcher's mode (default: `--simulation num_silos`), for example
    `["--supernodes", "3", "--tls"]`.
    """
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "deploy" / "launch.py"),
            *(runtime or ["--simulation", str(num_silos)]),
            "--quiet",
            "--run-config",
            f'{overrides} run-name="{run_name}" output-dir="{OUT}"',
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run {run_name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, json.loads((OUT / run_name / "results.json").read_text())


def write(name: str, record: dict, out: Path = OUT, echo: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **record}, indent=2))
    if echo:
        print(json.dumps(record, indent=2))
        print(f"wrote {path}")
    return path
