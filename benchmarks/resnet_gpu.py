"""FedAvg and centralized training of ResNet-18 on bloodmnist_28, on one GPU, in one process.

The GPU table of docs/measurements.md: 5 silos, Dirichlet alpha 0.01 / 0.5 and IID, beside the
paper's FedAvg (200 rounds of 5 local epochs) and centralized figures. The silos run in this process
(`deploy.inprocess`, no Ray), one after another, on the same GPU. Each cell is written to the
JSON as soon as it ends, so a run stopped early keeps the cells it finished.

    python -m benchmarks.resnet_gpu --rounds 30  # -> outputs/benchmarks/resnet_gpu.json

One cell's loop is bound by the host (about 2,500 samples/s on an H100, the GPU mostly idle), so
`--jobs 3` runs three cells side by side in their own processes; their seconds then overlap.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from benchmarks.common import DATASETS, OUT, write
from deploy.inprocess import run_in_process
from fgl_core.run_results import Summary, load_results

PAPER = {"alpha-0.01": 64.86, "alpha-0.5": 83.14, "iid": 84.2, "centralized": 84.76}
CELLS = {  # name -> run config; the heterogeneous cells last, so a short run has the others
    "centralized": {"strategy": "centralized"},
    "iid": {"strategy": "fedavg", "partition": "iid"},
    "alpha-0.5": {"strategy": "fedavg", "partition": "dirichlet", "alpha": 0.5},
    "alpha-0.01": {"strategy": "fedavg", "partition": "dirichlet", "alpha": 0.01},
}


def run_cell(run_config: dict, silos: int, out: Path) -> dict:
    """Run one cell; return its accuracies (percent) and wall time."""
    start = time.perf_counter()
    run_in_process(run_config, silos)
    summary = Summary.of(load_results(out / "resnet_gpu" / run_config["run-name"]))
    return {
        "final-test-accuracy": round(100 * (summary.final_test_accuracy or 0.0), 2),
        "test-accuracy-at-best-val": round(100 * (summary.test_accuracy_at_best_val or 0.0), 2),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default=str(DATASETS / "bloodmnist_28.npz"))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side")
    parser.add_argument("--train-subset", type=int, default=0, help="0: the whole split")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    common = {
        "dataset": args.dataset,
        "model": args.model,
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "augment": "crop-flip",
        "min-partition-size": 20,
        "min-nodes": args.silos,
        "train-subset": args.train_subset,
        "output-dir": str(args.out / "resnet_gpu"),
    }
    record = {
        "model": args.model,
        "silos": args.silos,
        "rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "paper": "FedAvg 200 rounds x 5 local epochs; centralized",
        "jobs": args.jobs,
        "cells": {},
    }
    spawn = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
    with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
        futures = {
            pool.submit(
                run_cell, {**common, **CELLS[name], "run-name": name}, args.silos, args.out
            ): name
            for name in args.cells
        }
        for future in as_completed(futures):
            name = futures[future]
            record["cells"][name] = {**future.result(), "paper": PAPER[name]}
            print(name, record["cells"][name], flush=True)
            write("resnet_gpu", record, args.out, echo=False)
    print("\ncell | final test % | test % at best val | paper % | seconds")
    for name, cell in record["cells"].items():
        row = (cell["final-test-accuracy"], cell["test-accuracy-at-best-val"], cell["paper"])
        print(" | ".join(map(str, (name, *row, cell["seconds"]))))


if __name__ == "__main__":
    main()
