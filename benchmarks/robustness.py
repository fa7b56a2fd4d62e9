"""Rounds no silo can poison: each `aggregation` clean and under each attack of
`benchmarks.attacks`, one or two lying silos of five; then DP rounds (`round-dp`): accuracy
against each silo's epsilon, with and without FGL's synthetic one-shot start.

Each run is the real ServerApp and ClientApps in one process (`deploy.inprocess`), 5 silos at
Dirichlet alpha 0.5. The attack rows are FGL runs (so that `synthetic-trust` has its synthetic
set; the runs of one seed share the store through `cache-dir`), the attack in the rounds after
the one-shot model; per row the final test accuracy and, for the backdoor, its success rate
(the share of triggered test images of other classes the final model puts in the target class).
The DP rows are FedAvg and FGL at each `round-dp-noise`, with the largest epsilon of a silo.
Every row is written as soon as it is measured.

    python -m benchmarks.robustness [--dataset digits] [--seeds 0 1 2] [--liars 1 2]
        [--aggregations fedavg median ...] [--attacks clean scale-100 ...] [--dp-noise 0.5 1]
    # -> outputs/benchmarks/robustness.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.attacks import UpdateAttack, backdoor_success, poisoned_data
from benchmarks.common import DATASETS, OUT, over_seeds, write
from deploy.inprocess import run_in_process
from fgl_client.silo import load_silo
from fgl_core.config import RunConfig
from fgl_core.datasets import ImageSet, load_dataset
from fgl_core.run_results import Summary, load_results
from fgl_core.training import InputSettings, model_outputs
from fgl_privacy.report import _final_model as final_model

SILOS = 5
AGGREGATIONS = ["fedavg", "median", "trimmed-mean", "krum", "multi-krum", "synthetic-trust"]
ATTACKS = ["clean", "scale-10", "scale-100", "sign", "noise", "label-flip", "backdoor"]
BACKDOOR_TARGET = 0
RUN = {
    "strategy": "fgl",
    "generator": "fgl-mini",
    "steps": 12,
    "images-per-class": 100,
    "partition": "dirichlet",
    "alpha": 0.5,
    "min-partition-size": 5,
    "min-nodes": SILOS,
    "oneshot-epochs": 30,
    "local-epochs": 2,
    "fraction-evaluate": 0.0,
}


def run(config: dict, work: Path, name: str, attack: str, liars: set[int]) -> dict:
    """One run under `attack` by the silos `liars` (node ids); its results and final model."""
    cfg = RunConfig.from_flower(config)
    on_reply, node_configs = (lambda reply, _: reply), {}
    if attack.startswith(("scale", "sign", "noise")):
        kind, _, factor = attack.partition("-")
        on_reply = UpdateAttack(kind, liars, float(factor or 100.0), seed=cfg.seed)
    elif attack != "clean":
        for node in liars:  # the liar's own partition, poisoned, as its node-local dataset
            silo = load_silo(cfg, {"partition-id": node - 1, "num-partitions": SILOS})
            path = work / "poisoned" / f"{name}-{node}.npz"
            poisoned_data(silo.train, silo.test, silo.class_names, attack, path,
                          target=BACKDOOR_TARGET, seed=cfg.seed)  # fmt: skip
            node_configs[node] = {"data-path": str(path)}
    start = time.perf_counter()
    run_in_process({**config, "run-name": name}, SILOS, on_reply=on_reply,
                   node_configs=node_configs)  # fmt: skip
    wall = time.perf_counter() - start
    summary = Summary.of(load_results(work / name))
    row = {"test-accuracy": summary.final_test_accuracy, "wall-seconds": wall}
    if attack == "backdoor":
        row["backdoor-success"] = backdoor_rate(work / name, cfg)
    return row


def backdoor_rate(run_dir: Path, cfg: RunConfig) -> float | None:
    data = load_dataset(cfg)
    model, _ = final_model(run_dir, cfg, data)
    if model is None:
        return None
    model.eval()
    inputs = InputSettings.from_config(cfg)

    def predict(images: np.ndarray) -> np.ndarray:
        stamped = ImageSet(images, np.zeros(len(images), np.int64))
        return model_outputs(model, stamped, torch.device("cpu"), inputs).argmax(1).numpy()

    return backdoor_success(predict, data.test, BACKDOOR_TARGET)


def privacy_epsilon(run_dir: Path) -> float | None:
    """The largest epsilon of a silo for the run (results.json `privacy`)."""
    silos = load_results(run_dir).get("privacy", {}).get("silos", {})
    values = [s["epsilon"] for s in silos.values() if s.get("epsilon") is not None]
    return max(values) if values else None


def summarize(rows: list[dict]) -> dict:
    """Mean and standard deviation over seeds per (part, strategy/aggregation, attack, liars,
    noise) of the test accuracy, the backdoor's success and epsilon where measured."""
    keys = ("part", "aggregation", "attack", "liars", "noise")
    return over_seeds(rows, lambda r: " ".join(str(r[k]) for k in keys),
                      ("test-accuracy", "backdoor-success", "epsilon"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits", help="as a run config names it")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--liars", nargs="+", type=int, default=[1], help="lying silos of five")
    parser.add_argument("--aggregations", nargs="+", default=AGGREGATIONS, choices=AGGREGATIONS)
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images-per-class", type=int, default=RUN["images-per-class"])
    parser.add_argument("--dp-noise", nargs="*", type=float, default=[0.01, 0.03, 0.1, 0.3],
                        help="round-dp-noise values of the DP rows (none: no DP rows)")  # fmt: skip
    parser.add_argument("--dp-clip", type=float, default=1.0, help="round-dp-clip (adaptive: "
                        "the clip it starts from)")  # fmt: skip
    parser.add_argument("--dp-mode", default="client-fixed",
                        choices=["client-fixed", "client-adaptive"])  # fmt: skip
    parser.add_argument("--name", default="robustness", help="the JSON's name in " + str(OUT))
    args = parser.parse_args()
    dataset = args.dataset
    if dataset != "digits" and not Path(dataset).exists():
        dataset = str(DATASETS / dataset)
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args.name, {"args": vars(args), "run": RUN, "rows": rows,
                          "summary": summarize(rows)}, echo=False)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in args.seeds:
            base = {**RUN, "images-per-class": args.images_per_class, "dataset": dataset,
                    "seed": seed, "num-server-rounds": args.rounds, "output-dir": str(work),
                    "cache-dir": str(work / "cache")}  # fmt: skip
            for aggregation in args.aggregations:
                for attack in args.attacks:
                    for liars in [0] if attack == "clean" else args.liars:
                        name = f"{aggregation}-{attack}-{liars}-{seed}"
                        keys = {"aggregation": aggregation}
                        measured = run({**base, **keys}, work, name, attack,
                                       set(range(1, liars + 1)))  # fmt: skip
                        record({"part": "attack", "seed": seed, "aggregation": aggregation,
                                "attack": attack, "liars": liars, "noise": 0,
                                **measured})  # fmt: skip
            for strategy in ("fedavg", "fgl"):
                for noise in args.dp_noise:
                    name = f"dp-{strategy}-{args.dp_mode}-{noise}-{seed}"
                    keys = {"strategy": strategy, "round-dp": args.dp_mode,
                            "round-dp-noise": noise, "round-dp-clip": args.dp_clip}  # fmt: skip
                    measured = run({**base, **keys}, work, name, "clean", set())
                    record({"part": "dp", "seed": seed, "aggregation": strategy,
                            "attack": "clean", "liars": 0, "noise": noise, **measured,
                            "epsilon": privacy_epsilon(work / name)})  # fmt: skip


if __name__ == "__main__":
    main()
