"""A lent GPU's few minutes in one call: the GPU measurements the project still lacks, in
priority order, each part's JSON kept the moment it finishes, the whole inside a time budget.

    benchmarks/gpu_session.sh prepare                     # here: wheels and data for the machine
    benchmarks/gpu_session.sh run --out "$OUT"            # there (the device tool's command)
    python -m benchmarks.gpu_session --smoke --out DIR    # every part at its smallest (tests)

Each part is `python -m benchmarks.<module>` in its own process, so one that fails or hangs costs
only its own time. A part's time-out is its own limit or what the budget leaves after keeping the
least time of each later part, whichever is smaller; a part with less than its own least is
skipped, and the summary (`gpu_session.json`) and the log say so. The parts' JSON files are
copied to `--out` as each ends (the device tool brings back at most 8 files, so the runs' own
outputs stay in the work folder); back here, they go into `benchmarks/results/` with the figures
docs/measurements.md quotes from them (each names its commit and date). The parts, in order:

1. `sd21`: SD 2.1-base synthesis (random weights, real architecture), plain diffusers beside the
   engine at batch 32 and 64, compiled, and SD-Turbo's 1 and 4 unguided steps
   (`benchmarks.synthesis --sprint`);
2. `adapter`: what a silo pays to adapt the generator: one LoRA adapter training step on the
   SD 2.1-base UNet at 512 px, plain and under DP-SGD, at the largest batch that fits, its peak
   memory and the adapter's bytes (`benchmarks.adapter_step`);
3. `resnet-cells`: the ResNet-18 bloodmnist alpha 0.5 and 0.01 cells, shortened to fit;
4. `train-throughput`: ResNet-18 training throughput, bf16 and channels-last against float32;
5. `captioning`: captions/s with the BLIP-base architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import ROOT, machine


@dataclass(frozen=True)
class Part:
    name: str
    module: str  # benchmarks.<module>
    args: tuple[str, ...]  # on the GPU
    smoke: tuple[str, ...]  # at its smallest, on a CPU
    limit_s: float  # the most it may take on an H200
    least_s: float  # below this it is not started


PARTS = (
    Part(
        "sd21",
        "synthesis",
        ("--sprint", "--steps", "25", "--batch-sizes", "32", "64", "--images", "64"),
        ("--tiny", "--sprint", "--steps", "2", "--batch-sizes", "2", "4", "--images", "4"),
        limit_s=330,
        least_s=150,
    ),
    Part(
        "adapter",
        "adapter_step",
        ("--batch-sizes", "16", "8", "4", "1", "--steps", "3"),
        ("--tiny", "--batch-sizes", "2", "--steps", "1"),
        limit_s=150,
        least_s=60,
    ),
    Part(
        "resnet-cells",
        "resnet_gpu",
        ("--cells", "alpha-0.5", "alpha-0.01", "--jobs", "2", "--rounds", "10"),
        ("--model", "cnn", "--silos", "2", "--rounds", "1", "--cells", "alpha-0.5"),
        limit_s=150,
        least_s=100,
    ),
    Part(
        "train-throughput",
        "train_throughput",
        ("--model", "resnet18", "--epochs", "1"),
        ("--epochs", "1", "--train-subset", "400"),
        limit_s=90,
        least_s=45,
    ),
    Part(
        "captioning",
        "captioning",
        ("--base-size", "--images", "256"),
        ("--base-size", "--images", "2"),
        limit_s=60,
        least_s=30,
    ),
)
SPRINT_SETUP_S = 75  # sd21: imports, random weights, plain diffusers: before its own deadline


def command(part: Part, smoke: bool, device: str, timeout: float) -> list[str]:
    args = list(part.smoke if smoke else part.args)
    if part.module == "synthesis":
        args += ["--device", device, "--deadline-s", f"{max(0.0, timeout - SPRINT_SETUP_S):.0f}"]
        args += ["--no-compile"] if smoke else ["--compile-s", "150"]
    elif part.module == "resnet_gpu":
        args += ["--local-epochs", "1"] + (["--train-subset", "400"] if smoke else [])
    elif part.module in ("train_throughput", "captioning", "adapter_step"):
        args += ["--device", device]
    return [sys.executable, "-m", f"benchmarks.{part.module}", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON files go")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole session's time")
    parser.add_argument("--smoke", action="store_true", help="every part at its smallest")
    parser.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], default=None)
    args = parser.parse_args()
    import torch  # after argparse: --help stays quick

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts = [p for p in PARTS if args.parts is None or p.name in args.parts]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fgl-gpu-session-"))
    # the parts' scratch (models made to size, caches) goes under `work` too, which goes at the
    # end: a part stopped at its time-out cannot remove its own
    (work / "tmp").mkdir()
    env = {**os.environ, "FGL_BENCHMARK_OUT": str(work), "TMPDIR": str(work / "tmp"),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    log = (args.out / "gpu_session.log").open("a")
    summary = {"benchmark": "gpu_session", "machine": machine(), "smoke": args.smoke, "parts": {}}

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    start = time.monotonic()
    for i, part in enumerate(parts):
        left = args.budget_s - (time.monotonic() - start)
        reserve = sum(p.least_s for p in parts[i + 1 :])
        timeout = min(part.limit_s, left - reserve)
        if timeout < part.least_s and not args.smoke:
            summary["parts"][part.name] = {"status": "skipped", "left-s": round(left, 1)}
            say(f"== {part.name}: skipped ({left:.0f} s left, {part.least_s:.0f} s needed)")
            continue
        cmd = command(part, args.smoke, device, timeout)
        say(f"== {part.name} (time-out {timeout:.0f} s): {' '.join(cmd[1:])}")
        began = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group: a time-out stops the workers it spawned too
        )
        expired = threading.Event()

        def stop(proc: subprocess.Popen = proc, expired: threading.Event = expired) -> None:
            expired.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, stop)
        timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
        proc.wait()
        timer.cancel()
        log.flush()
        status = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        status = "timed out" if expired.is_set() else status
        seconds = time.monotonic() - began
        summary["parts"][part.name] = {"status": status, "seconds": round(seconds, 1)}
        for path in work.glob("*.json"):  # what the part wrote, even if it ended early
            shutil.copy(path, args.out / path.name)
        (args.out / "gpu_session.json").write_text(json.dumps(summary, indent=2))
        say(f"== {part.name}: {status} in {seconds:.0f} s")
    (args.out / "gpu_session.json").write_text(json.dumps(summary, indent=2))
    skipped = [n for n, p in summary["parts"].items() if p["status"] != "done"]
    say(f"== not done: {', '.join(skipped)}" if skipped else "== all parts done")
    log.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
