"""The paper's class-level against instance-level comparison, in miniature: FGL on digits with
`fgl-mini` and `fgl-mini-captioner`, 5 silos, one-shot and after a few FedAvg rounds, at Dirichlet
alpha 0.01, 0.5 and IID, over seeds, the same images per class in both modes; with the bytes each
silo sent in round 0 and the label fidelity of the synthetic images the server trained on (the
share a digits classifier assigns to the class they were filed under, `fgl_mini.fidelity`).
Each run is the real ServerApp and ClientApps in one process (`deploy.inprocess`); every row is
written as soon as it is measured. Last, what the server can read back from each mode: the
privacy report's inversion (`fgl_privacy.report.inversion_rows`) of `--inversion-per-silo`
prompts of each silo, as sent and under noise, on the first cell's first seed.

    python -m benchmarks.class_vs_instance     # -> outputs/benchmarks/class_vs_instance.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import OUT, write
from deploy.inprocess import run_in_process
from fgl_core.run_results import Evaluation
from fgl_mini.fidelity import digits_judge, judged_as_label
from fgl_privacy.report import inversion_rows, read_results, run_silos
from fgl_server.synthetic_store import SyntheticStore

SILOS = 5
RUN = {
    "strategy": "fgl",
    "generator": "fgl-mini",
    "captioner": "fgl-mini-captioner",
    "images-per-class": 60,
    "steps": 12,
    "synthesis-batch-size": 60,
    "oneshot-epochs": 40,
    "min-partition-size": 5,
    "min-nodes": SILOS,
}


def partition(cell: str) -> dict:
    return (
        {"partition": "iid"} if cell == "iid" else {"partition": "dirichlet", "alpha": float(cell)}
    )


def cell_summary(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (partition, mode) cell."""
    cells = {}
    for row in rows:
        cells.setdefault((row["partition"], row["prompt-mode"]), []).append(row)
    out = []
    for (cell, mode), runs in cells.items():
        summary = {"partition": cell, "prompt-mode": mode, "seeds": len(runs)}
        for key in (
            "one-shot",
            "final",
            "label-fidelity",
            "bytes-up-per-silo",
            "embeddings-per-silo",
        ):
            values = np.array([r[key] for r in runs], np.float64)
            summary[key] = {
                "mean": round(float(values.mean()), 4),
                "std": round(float(values.std()), 4),
            }
        out.append(summary)
    return out


def inversion(run_dir: Path, per_silo: int) -> list[dict]:
    """The server's inversion of each mode's prompts for the run in `run_dir` (its silos)."""
    results, cfg = read_results(run_dir)
    rows = inversion_rows(cfg, run_silos(results, cfg), (0.0, 0.01, 0.1), per_silo)
    return [dataclasses.asdict(row) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", nargs="+", default=["0.01", "0.5", "iid"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--generator", default=RUN["generator"], help="a pipeline directory to try")
    parser.add_argument(
        "--captioner", default=RUN["captioner"], help="a captioner directory to try"
    )
    parser.add_argument("--inversion-per-silo", type=int, default=2)
    args = parser.parse_args()
    models = {"generator": args.generator, "captioner": args.captioner}
    rows: list[dict] = []
    judge = digits_judge()
    for cell in args.partitions:
        for seed in args.seeds:
            for mode in ("class", "instance"):
                name = f"cvi-{cell}-{seed}-{mode}"
                run = {**RUN, **models, **partition(cell), "seed": seed, "prompt-mode": mode}
                run |= {"num-server-rounds": args.rounds, "run-name": name}
                run |= {
                    "output-dir": str(OUT / "class_vs_instance"),
                    "cache-dir": str(OUT / "cache" / name),
                }
                start = time.perf_counter()
                run_in_process(run, SILOS)
                results = json.loads(
                    (OUT / "class_vs_instance" / name / "results.json").read_text()
                )
                embedding = results["embedding"]
                synthetic = SyntheticStore.open(results["synthesis"]["store"]).load()
                fidelity = np.nanmean(judged_as_label(judge, synthetic.images, synthetic.labels))
                rows.append(
                    {
                        "partition": cell,
                        "seed": seed,
                        "prompt-mode": mode,
                        "one-shot": Evaluation.of(results).test_accuracy,
                        "final": results["rounds"][-1]["test-accuracy"],
                        "label-fidelity": round(float(fidelity), 4),
                        "bytes-up-per-silo": float(
                            np.mean(list(embedding["bytes-per-node"].values()))
                        ),
                        "embeddings-per-silo": float(
                            np.mean(list(embedding["embeddings-per-node"].values()))
                        ),
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                )
                print(rows[-1], flush=True)
                record = {"run": RUN | models, "rounds": args.rounds, "rows": rows}
                write("class_vs_instance", record | {"cells": cell_summary(rows)}, echo=False)
    first = f"cvi-{args.partitions[0]}-{args.seeds[0]}-instance"
    record["inversion"] = {
        "run": first,
        "per-silo": args.inversion_per_silo,
        "rows": inversion(OUT / "class_vs_instance" / first, args.inversion_per_silo),
    }
    write("class_vs_instance", record | {"cells": cell_summary(rows)})


if __name__ == "__main__":
    main()
