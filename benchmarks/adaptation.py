"""FGL where the generator never saw the silos' domain: `fgl-mini` (digits only) on BloodMNIST,
with class-level text prompts against the generator adapted by the silos
(`generator-adaptation = "lora"`, with and without DP-SGD), one-shot and after FedAvg rounds,
beside FedAvg alone for the same rounds (row `fedavg`).

Each row is the real ServerApp and ClientApps in one process (`deploy.inprocess`), 5 silos; per
row: the one-shot model's test accuracy (last epoch, and at its best validation epoch), after the
rounds, the bytes each silo sent and received, each silo's adaptation and training seconds, the
phases' seconds, under DP each silo's epsilon, and the replication search's share of synthetic
images closer to a silo's training image than the calibrated threshold (the privacy report's).
Every row is written as soon as it is measured.

    python -m benchmarks.adaptation [--rows text lora] [--seeds 0 1 2] [--alpha 0.5]
        [--set guidance=1 'lr-schedule="cosine"']
    # -> outputs/benchmarks/adaptation.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import DATASETS, OUT, over_seeds, write
from deploy.inprocess import run_in_process
from fgl_core.datasets import load_dataset
from fgl_core.run_results import Evaluation, load_results
from fgl_privacy.report import _final_model as final_model
from fgl_privacy.report import _union as union
from fgl_privacy.report import read_results, replication_section, run_silos

SILOS = 5
RUN = {
    "strategy": "fgl",
    "generator": "fgl-mini",
    "steps": 12,
    "synthesis-batch-size": 50,
    "min-nodes": SILOS,
}
ADAPT = {
    "generator-adaptation": "lora",
    "adaptation-rounds": 6,
    "adaptation-steps": 250,
    "adaptation-rank": 16,
    "adaptation-lr": 0.002,
    "adaptation-batch-size": 32,
    "adapt-decoder": True,
}
ROWS = {
    "text": {},
    "lora": ADAPT,
    "lora-attention": {**ADAPT, "adaptation-layers": "attention"},
    "lora-null": {**ADAPT, "adaptation-null-share": 0.1},  # condition dropout, for guidance > 1
    "lora-no-decoder": {**ADAPT, "adapt-decoder": False},
    "lora-dp-1": {**ADAPT, "adaptation-noise": 1.0},
    "lora-dp-0.6": {**ADAPT, "adaptation-noise": 0.6},
    "learned": {"prompt-mode": "learned"},
    "lora+learned": {**ADAPT, "prompt-mode": "learned"},
    "instance": {"prompt-mode": "instance"},
    "lora+instance": {**ADAPT, "prompt-mode": "instance"},
    "fedavg": {"strategy": "fedavg"},  # no one-shot start: the rounds alone
}


def measure(row: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    run_config = {
        **RUN,
        **ROWS[row],
        "dataset": args.dataset,
        "partition": "dirichlet",
        "alpha": args.alpha,
        "images-per-class": args.images_per_class,
        "min-partition-size": 5,
        "seed": seed,
        "num-server-rounds": args.rounds,
        **dict(args.set),
        "output-dir": str(work),
        "run-name": f"{row}-{seed}",
        "cache-dir": str(work / "cache"),
    }
    start = time.perf_counter()
    run_in_process(run_config, num_silos=SILOS)
    wall = time.perf_counter() - start
    results = load_results(work / f"{row}-{seed}")
    one_shot = Evaluation.read(results)
    per_node: dict[str, dict] = {}
    for e in results["traffic"]["exchanges"]:
        node = per_node.setdefault(str(e["node-id"]), {"bytes-up": 0, "bytes-down": 0})
        node["bytes-up"] += e["bytes-received"]
        node["bytes-down"] += e["bytes-sent"]
        seconds = sum(e["metrics"].get(k, 0.0) for k in ("adapt-seconds", "embed-seconds",
                                                          "train-seconds"))  # fmt: skip
        node["compute-seconds"] = node.get("compute-seconds", 0.0) + seconds
    replication = replication_share(work / f"{row}-{seed}")
    rounds = results.get("rounds", [])
    adaptation = results.get("adaptation", {})
    return {
        "row": row,
        "seed": seed,
        "config": ROWS[row],
        "one-shot-test-accuracy": one_shot.test_accuracy if one_shot else None,  # FedAvg: none
        "one-shot-best-val-test-accuracy": best_val(results.get("one-shot-curve", [])),
        "after-rounds-test-accuracy": rounds[-1]["test-accuracy"] if args.rounds else None,
        "silos": per_node,
        "adapter-bytes": adaptation.get("adapter-bytes"),
        "epsilon-per-silo": adaptation.get("dp", {}).get("epsilon-per-silo"),
        "learned-distance-per-node": results.get("embedding", {}).get("learned-distance-per-node"),
        "replication": replication,
        "phase-seconds": results["phase-seconds"],
        "wall-seconds": wall,
    }


def replication_share(run_dir: Path) -> dict:
    """The privacy report's replication search on the run: each synthetic image's nearest
    training image of the silos by the final model's features, the threshold calibrated on the
    test split (`fgl_privacy.replication`)."""
    results, cfg = read_results(run_dir)
    data = load_dataset(cfg)
    train = union([silo.train for silo in run_silos(results, cfg)])
    model, unusable = final_model(run_dir, cfg, data)
    figures: dict = {}
    replication_section(run_dir, results, cfg, model, train, data, unusable, figures)
    return figures.get("replication", {"not-measured": unusable})


def config_value(text: str) -> tuple[str, object]:
    """`key=value` of `--set`, the value parsed as TOML (as a run config is)."""
    import tomllib

    key, _, value = text.partition("=")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=<TOML value>") from None


def best_val(curve: list[dict]) -> float | None:
    if not curve:
        return None
    return max(curve, key=lambda e: e["val-accuracy"])["test-accuracy"]


def summarize(rows: list[dict]) -> dict:
    """Per row: mean and standard deviation over its seeds of the one-shot and after-rounds
    test accuracy (where the row has them)."""
    return over_seeds(rows, lambda r: r["row"],
                      ("one-shot-test-accuracy", "after-rounds-test-accuracy"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["text", "lora"], choices=sorted(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=0, help="FedAvg rounds after one-shot")
    parser.add_argument("--images-per-class", type=int, default=200)
    blood = str(DATASETS / "bloodmnist_28.npz")
    parser.add_argument("--dataset", default=blood, help="as a run config names it: digits, a path")
    parser.add_argument("--name", default="adaptation", help="the JSON's name in " + str(OUT))
    parser.add_argument("--keep", type=Path, help="keep the runs' folders (adapters, stores) here")
    parser.add_argument("--set", nargs="+", type=config_value, default=[], metavar="KEY=VALUE",
                        help="run config keys for every row, e.g. guidance=1 "
                        'lr-schedule=\"cosine\" (values as TOML writes them)')  # fmt: skip
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        for seed in args.seeds:
            for row in args.rows:
                rows.append(measure(row, seed, args, work))
                shown = ("row", "seed", "one-shot-test-accuracy", "one-shot-best-val-test-accuracy",
                         "after-rounds-test-accuracy")  # fmt: skip
                print(json.dumps({k: rows[-1][k] for k in shown}), flush=True)
                arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                record = {"args": arguments, "run": RUN, "set": dict(args.set), "rows": rows,
                          "summary": summarize(rows)}  # fmt: skip
                write(args.name, record, echo=False)


if __name__ == "__main__":
    main()
